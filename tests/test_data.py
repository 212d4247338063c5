"""Data beyond CoLA: your own TSV/CSV/JSONL files (any number of classes), the IMDB sample, seeded
subsets, and the multi-class MCC."""
import json

import numpy as np
import pytest
import torch

import data
from conftest import SHARED, TOKENIZER_DIR, needs, needs_tokenizer, ok, run, run_here, user_error
from train_utils import classification_metrics
from utils import UserError

IMDB_DIR = SHARED / "imdb-sentences"


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name,text", [
    ("a.tsv", "text\tlabel\nGood film.\tpos\nBad film.\tneg\nSo so.\tmeh\n"),
    ("a.txt", "Good film.\tpos\nBad film.\tneg\nSo so.\tmeh\n"),  # no header: text, label
    ("a.csv", 'id,label,text\n1,pos,"Good film."\n2,neg,Bad film.\n3,meh,"So so."\n'),
    ("a.jsonl", '{"text": "Good film.", "label": "pos"}\n{"text": "Bad film.", "label": "neg"}\n\n'
                '{"text": "So so.", "label": "meh"}\n'),
])
def test_read_table_formats(name, text, tmp_path):
    texts, labels, skipped = data.read_table(write(tmp_path / name, text))
    assert texts == ["Good film.", "Bad film.", "So so."] and labels == ["pos", "neg", "meh"] and skipped == 0


def test_bad_rows_name_file_and_line_or_are_skipped(tmp_path):
    path = write(tmp_path / "a.tsv", "text\tlabel\nGood.\t1\nno label here\nBad.\t\n\nFine.\t0\n")
    with pytest.raises(UserError, match=r"a.tsv, line 3: 1 columns instead of 2"):
        data.read_table(path)
    texts, labels, skipped = data.read_table(path, skip_bad_rows=True)
    assert texts == ["Good.", "Fine."] and skipped == 2
    with pytest.raises(UserError, match=r"line 2: no text \(column 'text'\)"):
        data.read_table(write(tmp_path / "b.jsonl", '{"text": "x", "label": 1}\n{"label": 0}\n'))
    with pytest.raises(UserError, match=r"line 1: not a JSON object"):
        data.read_table(write(tmp_path / "c.jsonl", "[1, 2]\n"))
    (tmp_path / "d.tsv").write_bytes(b"caf\xe9\t1\n")
    with pytest.raises(UserError, match="not UTF-8"):
        data.read_table(tmp_path / "d.tsv")


def test_labels_classes_and_the_held_out_share(tmp_path):
    assert data.label_names(["10", "2", "1"]) == ["1", "2", "10"] and data.label_names(["b", "a"]) == ["a", "b"]
    train = write(tmp_path / "t.tsv", "".join(f"text {i}\t{i % 3}\n" for i in range(50)))
    out = data.load_files(train, seed=5)
    assert out["labels"] == ["0", "1", "2"] and len(out["train"][0]) == 40 and len(out["dev"][0]) == 10
    assert out["dev"] == data.load_files(train, seed=5)["dev"] != data.load_files(train, seed=6)["dev"]
    assert not set(out["train"][0]) & set(out["dev"][0])
    with pytest.raises(UserError, match=r"labels \['7'\] do not occur in"):
        data.load_files(train, write(tmp_path / "e.tsv", "x\t7\n"))
    with pytest.raises(UserError, match="a classifier needs two classes"):
        data.load_files(write(tmp_path / "one.tsv", "x\t1\ny\t1\n"))


def test_subsample_is_seeded_and_keeps_the_order():
    texts, labels = [f"t{i}" for i in range(100)], list(range(100))
    a = data.subsample(texts, labels, 10, seed=1)
    assert a == data.subsample(texts, labels, 10, seed=1) != data.subsample(texts, labels, 10, seed=2)
    assert a[1] == sorted(a[1]) and [f"t{i}" for i in a[1]] == a[0]
    assert data.subsample(texts, labels, None, 1) == (texts, labels) == data.subsample(texts, labels, 500, 1)


@needs(IMDB_DIR / "imdb_labelled.txt")
def test_the_imdb_sample_offline():
    out = data.load_imdb(IMDB_DIR, seed=3)
    assert out["labels"] == ["negative", "positive"]
    assert len(out["train"][0]) == 800 and len(out["dev"][0]) == 200
    assert set(out["train"][1]) == {0, 1} and out["train"][0][0].startswith("A very, very, very slow-moving")


def test_multiclass_mcc_is_the_correlation_of_the_one_hot_codes():
    """Gorodkin's R_K equals the Pearson correlation of the one-hot prediction and truth matrices."""
    rng = np.random.default_rng(0)
    for k in (2, 3, 5):
        labels = rng.integers(0, k, 200)
        preds = np.where(rng.random(200) < 0.6, labels, rng.integers(0, k, 200))
        x, y = np.eye(k)[preds], np.eye(k)[labels]
        x, y = x - x.mean(0), y - y.mean(0)
        expected = (x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum())
        got = classification_metrics(torch.tensor(preds), torch.tensor(labels))
        # float64 both, from integer counts and from a Pearson sum over 200 x k numbers: ~1e-15 apart. The
        # accuracy is a count over 200 either way: exactly equal.
        assert got["mcc"] == pytest.approx(expected, rel=0, abs=1e-12) and got["acc"] == (preds == labels).mean()
    assert classification_metrics(torch.tensor([2, 2, 2]), torch.tensor([0, 1, 2]))["mcc"] == 0.0


@needs_tokenizer
def test_own_three_class_file_trains_and_predicts(tiny_dir, tmp_path):
    rows = [("What a great and fun film.", "pos"), ("Awful, boring and long.", "neg"), ("It was a film.", "meh")] * 10
    train = write(tmp_path / "train.jsonl", "".join(json.dumps({"review": t, "y": y}) + "\n" for t, y in rows))
    out = tmp_path / "out"
    proc = run("LoRA", 4, "--model", tiny_dir, "--tokenizer", TOKENIZER_DIR, "--train-file", train, "--text-column",
               "review", "--label-column", "y", "--epochs", 1, "--out-dir", out, "--plots-dir", tmp_path / "plots")
    wrong_column = run_here("LoRA", 4, "--model", tiny_dir, "--tokenizer", TOKENIZER_DIR, "--train-file", train,
                            "--epochs", 1, "--out-dir", tmp_path / "out2")
    proc = ok(proc)
    assert "train: 24 training and 6 dev examples, 3 classes" in proc.stdout
    config = json.loads((out / "run_config.json").read_text())
    assert config["labels"] == ["meh", "neg", "pos"] and config["task"] == "train"
    write(tmp_path / "in.txt", "A great film.\n")
    verdict = ok(run_here("predict", 4, "--adapter", out, "--input", tmp_path / "in.txt")).stdout
    assert verdict.split(" (")[0] in ("meh", "neg", "pos")
    msg = user_error(wrong_column)
    assert "line 1: no text (column 'text')" in msg and "--text-column" in msg


def test_a_header_that_names_other_columns_is_not_a_row(tmp_path):
    path = write(tmp_path / "sst.tsv", "sentence\tlabel\nA fine film.\t1\nDull.\t0\nGood.\t1\n")
    with pytest.raises(UserError, match=r"line 1: .* looks like a header.*--text-column sentence --label-column label"):
        data.read_table(path)
    assert data.read_table(path, text_column="sentence")[0] == ["A fine film.", "Dull.", "Good."]


def test_expected_labels_are_checked(tmp_path):
    with pytest.raises(UserError, match=r"labels \['neg', 'pos'\] are not among the expected"):
        data.load_imdb(write(tmp_path / "imdb.txt", "Good.\tpos\nBad.\tneg\n"))


def test_eval_file_without_train_file_is_refused(tmp_path):
    msg = user_error(run_here("LoRA", 1, "--eval-file", tmp_path / "x.tsv", "--out-dir", tmp_path / "o"))
    assert "--eval-file, --text-column and --label-column go with --train-file" in msg
