"""`run.py distil` and `run.py rnn` as a user runs them: a LoRA teacher on the tiny random GPT-2 (with the
real tokenizer and the real CoLA files), the two students, the teacher-logit cache, the comparison, predict
with a student, fairness (distil with alpha 0 is rnn) and the clean errors."""
import json
import shutil

import pytest

from conftest import COLA_DIR, needs_cola, needs_tokenizer, ok, run, run_here, together, user_error

pytestmark = [needs_tokenizer, needs_cola]
TIMING = ("train_sentences_per_s", "train_seconds")
SMALL = ["--data-dir", COLA_DIR, "--limit-train", 160, "--epochs", 2, "--emb-dim", 16, "--hidden", 16]


def metrics(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher(lora_7, tmp_path_factory):
    """models/LoRA_7: conftest's `run.py LoRA 7` on the tiny model and 200 CoLA sentences, the teacher of every
    test here."""
    tmp = tmp_path_factory.mktemp("distil-cli")
    shutil.copytree(lora_7[0] / "out", tmp / "models" / "LoRA_7")
    return tmp


@pytest.fixture(scope="module")
def students(teacher):
    """distil 7 (with a transfer set), then rnn 7 with the same flags: the comparison appears."""
    models, plots = teacher / "models", teacher / "plots"
    common = ["--models-dir", models, "--plots-dir", plots, *SMALL]
    first = ok(run("distil", 7, *common, "--augment", 1))
    scratch = ok(run("rnn", 7, *common))
    return models, plots, first, scratch


def test_distil_writes_student_metrics_plots_and_compares(students):
    models, plots, first, scratch = students
    out = models / "distil_7"
    for name in ("student.safetensors", "run_config.json", "metrics.jsonl", "last.pt"):
        assert (out / name).is_file(), name
    config = json.loads((out / "run_config.json").read_text())
    assert config["student"]["rnn_type"] == "gru" and config["teacher"]["dir"].endswith("LoRA_7")
    assert config["labels"] == ["unacceptable", "acceptable"] and config["tokenizer_fingerprint"]
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all({"dev_acc", "dev_mcc", "train_loss", "dev_loss"} <= set(r) for r in rows)
    for mode in ("distil", "rnn"):
        for kind in ("loss", "acc"):
            assert (plots / f"{mode}_7_{kind}.png").stat().st_size > 1000
    # the log: teacher computed once, the teacher's own dev figures, parameters and the ratio to the teacher
    assert "computed in" in first.stdout and "the teacher did not run" not in first.stdout
    assert "teacher " in first.stdout and "dev accuracy" in first.stdout and "MCC" in first.stdout
    assert "majority-class baseline on dev: accuracy 0.6926, MCC 0.0000" in first.stdout
    assert "parameters (" in first.stdout and "than the teacher" in first.stdout
    assert "transfer set: 160 augmented sentences" in first.stdout
    # rnn: no teacher anywhere, the same student
    log = [line for line in scratch.stdout.split("comparison:")[0].splitlines() if not line.startswith("configuration:")]
    assert not any("teacher" in line for line in log)  # (its configuration line says teacher=None)
    assert json.loads((models / "rnn_7" / "run_config.json").read_text())["student"] == config["student"]
    # the comparison, once the teacher and both students exist
    md = (plots / "compare_7.md").read_text()
    assert (plots / "compare_7.png").stat().st_size > 1000
    table = [line for line in md.split("## Speed/accuracy frontier")[0].splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [line.split("|")[1].strip().split(":")[0].split(" (")[0] for line in table] == \
        ["teacher", "KD student", "scratch student"]
    best = max(metrics(models / "rnn_7"), key=lambda r: r["dev_mcc"])
    assert f"{best['dev_acc']:.4f} | {best['dev_mcc']:.4f}" in table[2]  # read from the run's files
    assert "0.6926, MCC 0" in md


def test_second_distil_run_reads_the_cache_and_never_runs_the_teacher(students, tiny_dir):
    models, plots, _, _ = students
    # Another SR, other student flags: the log says the cache was used, and nothing was computed.
    again = ok(run("distil", 8, "--teacher", models / "LoRA_7", "--models-dir", models, "--plots-dir", plots,
                   *SMALL, "--rnn-type", "lstm", "--pool", "mean"))
    assert "read from the cache" in again.stdout and "the teacher did not run" in again.stdout
    assert "computed in" not in again.stdout
    assert "dev accuracy" in again.stdout.split("student (seed 8)")[0]  # teacher's figures, from the cache


def test_corrupt_cache_is_recomputed_with_a_warning(students):
    models, plots, _, _ = students
    cache = models / "teacher_cache"
    files = sorted(cache.glob("teacher_*.safetensors"))
    assert len(files) == 2  # train+dev, and the transfer set of seed 7
    backup = {f: f.read_bytes() for f in files}
    for f in files:
        f.write_bytes(f.read_bytes()[:-40])  # truncated
    try:
        out = ok(run("distil", 9, "--teacher", models / "LoRA_7", "--models-dir", models, "--plots-dir", plots,
                     *SMALL))
        assert "warning: teacher-logit cache" in out.stdout and "computed in" in out.stdout
    finally:
        for f, data in backup.items():
            f.write_bytes(data)


def test_distil_with_alpha_zero_is_the_rnn_run(students):
    """Fairness: with the teacher's term off and no transfer set, distil and rnn train the same student
    identically (same init, data order, dropout, schedule). The rnn run is the students' `rnn 7`: the same flags.
    This distil run is a fresh interpreter, the rnn run a fork of the fork server (conftest.run): equal across both."""
    models, plots, _, _ = students
    fair = models.parent / "fair"
    shutil.copytree(models / "LoRA_7", fair / "LoRA_7")
    ok(run("distil", 7, "--models-dir", fair, "--plots-dir", plots.parent / "fair-plots", *SMALL, "--alpha", 0, fresh=True))
    assert metrics(fair / "distil_7") == metrics(models / "rnn_7")  # exactly: the same computation


def test_seeds_runs_several_students_and_reports_mean_and_std(teacher):
    models, plots = teacher / "seeds", teacher / "seeds-plots"
    shutil.copytree(teacher / "models" / "LoRA_7", models / "LoRA_7")
    common = ["--models-dir", models, "--plots-dir", plots, *SMALL, "--epochs", 1, "--seeds", 2]
    ok(run("distil", 7, *common))
    ok(run("rnn", 7, *common))
    assert (models / "distil_8" / "metrics.jsonl").is_file() and (models / "rnn_8" / "metrics.jsonl").is_file()
    md = (plots / "compare_7.md").read_text()
    rows = [line for line in md.split("## Speed/accuracy frontier")[0].splitlines()
            if line.startswith("| KD") or line.startswith("| scratch")]
    assert len(rows) == 2 and all("±" in r and r.rstrip().endswith("| 2 |") for r in rows), md


def test_predict_with_a_student(students, tmp_path):
    models, _, _, _ = students
    sentences = tmp_path / "s.txt"
    sentences.write_text("The cat sat on the mat.\nMat the on sat cat the.\n")
    out = ok(run("predict", 7, "--adapter", models / "distil_7", "--adapter", f"t={models / 'LoRA_7'}",
                 "--input", sentences))
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("distil_7: ") and "  t: " in line for line in lines)


def test_predict_refuses_a_student_with_another_tokenizer(students, tmp_path):
    models, _, _, _ = students
    other = tmp_path / "other-tokenizer"
    other.mkdir()
    shutil.copy(COLA_DIR.parent.parent / "gpt2-tokenizer" / "merges.txt", other / "merges.txt")
    vocab = json.loads((COLA_DIR.parent.parent / "gpt2-tokenizer" / "vocab.json").read_text())
    vocab["the"], vocab["The"] = vocab["The"], vocab["the"]  # two ids swapped: another tokenizer
    (other / "vocab.json").write_text(json.dumps(vocab))
    sentences = tmp_path / "s.txt"
    sentences.write_text("The cat sat on the mat.\n")
    msg = user_error(run_here("predict", 7, "--adapter", models / "rnn_7", "--tokenizer", other, "--input", sentences))
    assert "another tokenizer" in msg


def test_shared_transfer_set_is_labelled_once_for_all_seeds(teacher):
    """--shared-transfer: one transfer set (seeded by SR) for the seeds of --seeds: the teacher labels it once,
    and every seed trains on the same sentences."""
    models, plots = teacher / "shared", teacher / "shared-plots"
    shutil.copytree(teacher / "models" / "LoRA_7", models / "LoRA_7")
    shared, own = together(  # the second: without the flag
        lambda: run("distil", 7, "--models-dir", models, "--plots-dir", plots, *SMALL, "--epochs", 1, "--seeds", 2,
                    "--augment", 2, "--shared-transfer"),
        lambda: run("distil", 7, "--models-dir", teacher / "own", "--teacher", models / "LoRA_7", "--plots-dir",
                    teacher / "own-plots", *SMALL, "--epochs", 1, "--seeds", 2, "--augment", 2))
    out = ok(shared).stdout
    assert out.count("teacher logits for the transfer set") == 1 and "computed in" in out, out
    assert "of seed 8" not in out
    assert out.count("unlabelled sentences, taught by the teacher") == 1
    # without the flag each seed has its own transfer set, labelled by the teacher each time
    out = ok(own).stdout
    assert out.count("teacher logits for the transfer set") == 2 and "of seed 8" in out


def test_predict_with_a_data_vocabulary_student_gives_the_training_evaluation(teacher, tmp_path):
    """--student-vocab data: the id -> row mapping travels in student.safetensors, so `run.py predict` gives the
    dev accuracy that training's evaluation recorded, and the probabilities of the student loaded in-process."""
    import torch
    from backbones import load_any_tokenizer
    from data import Examples, load_cola
    from train_utils import predict_logits
    from utils import load_student
    models, plots = teacher / "vocab", teacher / "vocab-plots"
    shutil.copytree(teacher / "models" / "LoRA_7", models / "LoRA_7")
    out = ok(run("distil", 7, "--models-dir", models, "--plots-dir", plots, *SMALL, "--epochs", 1,
                 "--student-vocab", "data", "--augment", 1)).stdout
    assert "vocabulary of the data" in out
    config = json.loads((models / "distil_7" / "run_config.json").read_text())
    assert 0 < config["student"]["rows"] < config["student"]["vocab_size"]
    sentences, labels = load_cola(COLA_DIR)["dev"]
    (tmp_path / "dev.txt").write_text("\n".join(sentences) + "\n")
    lines = ok(run_here("predict", 7, "--adapter", models / "distil_7", "--input", tmp_path / "dev.txt")).stdout.splitlines()
    names = config["labels"]
    predicted = [names.index(line.split(" (")[0]) for line in lines]
    acc = sum(p == y for p, y in zip(predicted, labels)) / len(labels)
    assert acc == pytest.approx(config["best"]["dev_acc"], abs=1e-12)
    student, _ = load_student(models / "distil_7")
    tok = load_any_tokenizer(config["tokenizer"])
    probs = predict_logits(student, Examples.encode(tok, sentences, labels, config["max_length"]),
                           torch.device("cpu"), 64, progress=False).softmax(-1)
    shown = [float(line.split(" (")[1].split(")")[0]) for line in lines]
    # printed to 3 decimals (<= 5e-4 off), computed there in other batches (~1e-7): near a rounding boundary, 1e-9
    # of slack would not do
    assert all(abs(float(p.max()) - q) <= 5e-4 + 1e-6 for p, q in zip(probs, shown))


def test_no_teacher_names_the_command_and_writes_nothing(tmp_path):
    msg = user_error(run_here("distil", 7, "--models-dir", tmp_path / "models", "--plots-dir", tmp_path / "plots",
                         *SMALL))
    assert "python run.py LoRA 7" in msg and "--teacher" in msg
    assert not (tmp_path / "models").exists() and not (tmp_path / "plots").exists()


def test_corrupt_teacher_is_a_clean_error_and_writes_nothing(teacher, tmp_path):
    bad = tmp_path / "models" / "LoRA_7"
    shutil.copytree(teacher / "models" / "LoRA_7", bad)
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 100)
    msg = user_error(run_here("distil", 7, "--models-dir", tmp_path / "models", "--plots-dir", tmp_path / "plots",
                         *SMALL))
    assert "python run.py LoRA 7" in msg
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["LoRA_7"]


def test_teacher_for_another_model_is_a_clean_error_and_writes_nothing(teacher, tmp_path):
    from conftest import save_hf_gpt2
    wider = save_hf_gpt2(tmp_path / "wider", n_layer=2, n_head=4, n_embd=128, n_positions=256)
    msg = user_error(run_here("distil", 7, "--teacher", teacher / "models" / "LoRA_7", "--model", wider,
                         "--models-dir", tmp_path / "models", "--plots-dir", tmp_path / "plots", *SMALL))
    assert "does not fit" in msg and "python run.py LoRA 7" in msg
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("flags, message", [
    (["--alpha", "1.5"], "--alpha 1.5"),
    (["--augment", "-1"], "--augment -1"),
    (["--transfer-lm", "-1"], "--transfer-lm -1"),
    (["--kd-loss", "l1"], "argument --kd-loss"),
    (["--student-vocab", "tiny"], "argument --student-vocab"),
    (["--seeds", "0"], "argument --seeds"),
    (["--rnn-type", "transformer"], "argument --rnn-type"),
])
def test_bad_student_flags(flags, message, tmp_path):
    out = run_here("distil", 7, "--models-dir", tmp_path, *flags)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


# --------------------------------------------------------------------------- transformer students

TF = ["--data-dir", COLA_DIR, "--limit-train", 160, "--student", "transformer", "--student-layers", 1, "--epochs", 2,
      "--lr", 1e-3, "--student-vocab", "data"]


@pytest.fixture(scope="module")
def transformer_students(students, tmp_path_factory):
    """Beside the RNN pair (a copy of `students`' models directory): a transformer student of the tiny teacher's
    bottom layer with KD, the hidden-state loss and a --transfer-lm set that the random language model leaves
    empty, then the same student on the labels alone (rnn mode, --teacher for its starting weights)."""
    models, plots, _, _ = students
    tmp = tmp_path_factory.mktemp("tf-students")
    shutil.copytree(models, tmp / "models", ignore=shutil.ignore_patterns("teacher_cache"))
    common = ["--models-dir", tmp / "models", "--plots-dir", tmp / "plots", *TF]
    kd_flags = ["--kd-hidden", 1, "--transfer-lm", 0.1]
    resumed = ["--models-dir", tmp / "resumed", "--plots-dir", tmp / "resumed-plots", "--teacher",
               tmp / "models" / "LoRA_7", *TF, *kd_flags]
    kd, (killed, again) = together(lambda: ok(run("distil", 7, *common, *kd_flags)),  # beside it: killed, resumed
                                   lambda: (run("distil", 7, *resumed, env={"RUN_PY_STOP_AFTER_EPOCH": "1"}),
                                            run("distil", 7, *resumed, "--resume")))
    scratch = ok(run("rnn", 7, *common, "--teacher", tmp / "models" / "LoRA_7"))
    return tmp / "models", tmp / "plots", kd, scratch, (ok(killed), ok(again), tmp / "resumed")


def test_transformer_students_train_compare_and_draw_the_frontier(transformer_students):
    models, plots, kd, scratch, _ = transformer_students
    name = "tf1-bottom-base"
    for mode, proc in (("distil", kd), ("rnn", scratch)):
        config = json.loads((models / f"{mode}_{name}_7" / "run_config.json").read_text())
        assert config["student"]["kind"] == "transformer" and config["student"]["layers"] == [0]
        assert config["student"]["teacher_layers"] == 2 and 0 < config["student"]["rows"] < 50257
        assert config["inference_sentences_per_s"] > 0 and [r["epoch"] for r in metrics(models / f"{mode}_{name}_7")] == [1, 2]
        assert "gpt2 transformer, 1 of the teacher's 2 layers (bottom: 0) from the pretrained base" in proc.stdout
    # the language model kept nothing: said, and the run goes on without those sentences
    assert "0 sentences written by" in kd.stdout and "this run goes on without them" in kd.stdout
    assert "teacher logits for the training and dev sentences" in kd.stdout  # the logit cache was not copied
    assert "teacher logits" not in scratch.stdout  # rnn mode reads the teacher's weights, never its logits
    md = (plots / "compare_7.md").read_text()
    table = md.split("## Speed/accuracy frontier")[0]
    for row in ("teacher: LoRA", "KD student (distil)", "scratch student (rnn)", f"KD student {name} (distil)",
                f"scratch student {name} (rnn)"):
        assert f"| {row}" in table, row
    frontier = [line for line in md.split("## Speed/accuracy frontier")[1].splitlines() if line.startswith("| ")][1:]
    assert len(frontier) == 5 and any(line.startswith("| teacher: LoRA") and "| 1.0 |" in line for line in frontier)
    speeds = [float(line.split("|")[4].strip().replace(",", "")) for line in frontier]
    assert speeds == sorted(speeds, reverse=True)  # fastest first
    assert (plots / "frontier_7.png").stat().st_size > 1000


def test_a_killed_transformer_student_resumes_to_the_uninterrupted_run(transformer_students):
    """Killed after epoch 1 (hidden-state loss and all), --resume gives the uninterrupted run's numbers and weights."""
    from safetensors.torch import load_file
    models, _, _, _, (killed, again, resumed) = transformer_students
    name = "distil_tf1-bottom-base_7"
    assert "resumed from" in again.stdout
    assert metrics(resumed / name) == metrics(models / name)
    a, b = load_file(resumed / name / "student.safetensors"), load_file(models / name / "student.safetensors")
    assert a.keys() == b.keys() and all(torch_equal(a[k], b[k]) for k in a)


def torch_equal(a, b):
    import torch
    return torch.equal(a, b)


def test_predict_and_report_with_a_transformer_student(transformer_students, tmp_path):
    """predict loads the transformer student like any student and gives the dev accuracy its training
    recorded; the report holds the transformer rows and the frontier."""
    from data import load_cola
    models, plots, *_ = transformer_students
    student = models / "distil_tf1-bottom-base_7"
    config = json.loads((student / "run_config.json").read_text())
    sentences, labels = load_cola(COLA_DIR)["dev"]
    (tmp_path / "dev.txt").write_text("\n".join(sentences) + "\n")
    lines = ok(run_here("predict", 7, "--adapter", student, "--input", tmp_path / "dev.txt")).stdout.splitlines()
    predicted = [config["labels"].index(line.split(" (")[0]) for line in lines]
    assert sum(p == y for p, y in zip(predicted, labels)) / len(labels) == pytest.approx(config["best"]["dev_acc"],
                                                                                         abs=1e-12)
    ok(run_here("report", 7, "--models-dir", models, "--plots-dir", plots, "--out-dir", tmp_path / "reports"))
    md = (tmp_path / "reports" / "report_7.md").read_text()
    assert "Speed/accuracy frontier" in md and "KD student tf1-bottom-base (distil)" in md
    assert "distil_tf1-bottom-base_7" in md and "frontier_7.png" in md


@pytest.mark.parametrize("mode", ["distil", "rnn"])
def test_more_student_layers_than_the_teacher_has_is_a_clean_error(teacher, tmp_path, mode):
    out = run_here(mode, 7, "--models-dir", tmp_path / "models", "--plots-dir", tmp_path / "plots", "--teacher",
              teacher / "models" / "LoRA_7", "--data-dir", COLA_DIR, "--limit-train", 16, "--student", "transformer",
              "--student-layers", 3)
    assert "--student-layers 3: the teacher's model" in user_error(out) and "has 2 layers" in out.stderr
    assert "teacher logits" not in out.stdout  # said before the teacher runs
    assert not list((tmp_path / "models").glob("*_7"))  # no run directory


def test_a_named_layer_past_the_teachers_last_is_a_clean_error(teacher, tmp_path, capsys):
    """--student-init names the layers; one the teacher does not have is said before the teacher runs."""
    import run as cli
    code = cli.main(["rnn", "7", "--models-dir", str(tmp_path / "models"), "--plots-dir", str(tmp_path / "plots"),
                     "--teacher", str(teacher / "models" / "LoRA_7"), "--data-dir", str(COLA_DIR), "--limit-train",
                     "16", "--threads", "1", "--student", "transformer", "--student-init", "0,2"])
    out = capsys.readouterr()
    assert code == 2 and "--student-init 0,2: the teacher has layers 0 to 1" in out.err
    assert "teacher logits" not in out.out
    assert not list((tmp_path / "models").glob("*_7"))


@pytest.mark.parametrize("flags, message", [
    (["--student-layers", "2"], "--student-layers 2 is for --student transformer"),
    (["--kd-hidden", "1"], "--kd-hidden 1.0 matches a transformer student's layers"),
    (["--student", "transformer", "--kd-hidden", "-1"], "--kd-hidden -1.0"),
    (["--student", "transformer", "--init-embeddings-from-teacher"], "--init-embeddings-from-teacher"),
    (["--student-init", "0,1"], "--student-init 0,1 names a transformer student's layers"),
    (["--student", "transformer", "--student-init", "0,5", "--student-layers", "3"],
     "--student-layers 3 with --student-init 0,5, which names 2 layers"),
])
def test_bad_transformer_student_flags_are_clean_errors(flags, message, tmp_path, capsys):
    """Checked before anything loads: in this process (run.main), as the command line runs it."""
    import run as cli
    assert cli.main(["distil", "7", "--threads", "1", "--models-dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.strip().count("\n") == 0
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit:
        cli.main(["rnn", "7", "--student", "transformer", "--student-layers", "0"])
    assert exit.value.code == 2 and "argument --student-layers" in capsys.readouterr().err
    for bad in ("3,1", "0,0", "-1,2", "0,x", ""):  # rising, distinct, non-negative indices
        with pytest.raises(SystemExit) as exit:
            cli.main(["rnn", "7", "--student", "transformer", f"--student-init={bad}"])
        assert exit.value.code == 2 and "comma-separated (0,1,2,3,16,17)" in capsys.readouterr().err


def test_a_transformer_student_without_teacher_names_the_command(tmp_path):
    msg = user_error(run_here("rnn", 7, "--student", "transformer", "--models-dir", tmp_path / "models",
                         "--plots-dir", tmp_path / "plots", "--data-dir", COLA_DIR, "--limit-train", 16))
    assert "python run.py LoRA 7" in msg and "--teacher" in msg
