"""The command line of the LoRA issue, as a user runs it: `python run.py LoRA|predict|gen ...` in a
subprocess on the tiny random GPT-2 (with the real tokenizer) and the real CoLA files; commands that stop at bad input
or train nothing in this process (conftest.run_here, run.main)."""
import json
import re

import pytest
import torch

from conftest import COLA_DIR, ROOT, make_adapter, needs_cola, needs_tokenizer, ok, run, run_here, together, user_error

COLA_LABELS = ["unacceptable", "acceptable"]
TIMING = ("train_sentences_per_s", "train_seconds")  # wall-clock, not reproducible
SENTENCES = ["The cat sat on the mat.", "Mat the on sat cat the.", "Colorless green ideas sleep furiously."]


def lora_args(tiny_dir, out, plots, data_dir=COLA_DIR, seed=7, *extra):
    return ["LoRA", seed, "--model", tiny_dir, "--data-dir", data_dir, "--limit-train", 200, "--epochs", 1,
            "--out-dir", out, "--plots-dir", plots, *extra]


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def load_tensors(path):
    from safetensors.torch import load_file
    return load_file(path)


@pytest.fixture(scope="module")
def lora_run(lora_7):
    """conftest's `run.py LoRA 7` (lora_args with --export-peft; 200 CoLA sentences), shared by the tests below:
    (directory, process)."""
    return lora_7[:2]


def write_cola(data_dir, bad_train_row=None, train_rows=24, dev_rows=12):
    """A CoLA-format data dir in data_dir (real sentences), with an optional bad row as line 5 of the train file."""
    data_dir.mkdir(parents=True, exist_ok=True)
    source = COLA_DIR / "in_domain_train.tsv"
    real = source.read_bytes().splitlines(keepends=True) if source.is_file() else None
    if real is None:  # without the real files, simple made-up rows
        real = [f"x\t{i % 2}\t\tThe sentence number {i} is here.\n".encode() for i in range(train_rows + dev_rows)]
    rows = real[:train_rows]
    if bad_train_row is not None:
        rows.insert(4, bad_train_row)
    (data_dir / "in_domain_train.tsv").write_bytes(b"".join(rows))
    (data_dir / "in_domain_dev.tsv").write_bytes(b"".join(real[train_rows:train_rows + dev_rows]))
    return data_dir


# --------------------------------------------------------------------------- run.py LoRA

@needs_tokenizer
@needs_cola
def test_lora_writes_adapter_metrics_plots_and_counts(lora_run, tiny_dir):
    tmp, proc = lora_run
    out = tmp / "out"
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "run_config.json", "last.pt"):
        assert (out / name).is_file(), name
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 4.0
    assert config["target_modules"] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert config["modules_to_save"] == ["score", "ln_1", "ln_2", "ln_f"]
    extras = json.loads((out / "run_config.json").read_text())
    assert extras["model"] == str(tiny_dir) and extras["labels"] == COLA_LABELS and extras["seed"] == 7
    rows = metrics(out)
    assert len(rows) == 1 and rows[0]["epoch"] == 1
    assert 0.0 <= rows[0]["dev_acc"] <= 1.0 and -1.0 <= rows[0]["dev_mcc"] <= 1.0
    assert extras["best"] == rows[0]
    # The tiny model: 2 layers of width 64, r=4: LoRA 8,192 + layer norms 640 + head 128.
    tensors = load_tensors(out / "adapter_model.safetensors")
    assert sum(t.numel() for t in tensors.values()) == 8_960
    assert "trainable with LORA: 8,960 (" in proc.stdout
    assert "CoLA: 200 training and 527 dev sentences" in proc.stdout
    assert any(t.abs().max() > 0 for k, t in tensors.items() if k.endswith("lora_B.weight"))  # it trained
    for kind in ("loss", "acc"):
        png = (tmp / "plots" / f"LoRA_7_{kind}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
        from PIL import Image
        with Image.open(tmp / "plots" / f"LoRA_7_{kind}.png") as img:
            img.verify()
    # --export-peft: the same two files, and peft loads them to the same logits as ours.
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp / "peft" / name).read_bytes() == (out / name).read_bytes()


@needs_tokenizer
@needs_cola
def test_exported_adapter_loads_in_peft_with_our_logits(lora_run, tiny_dir):
    from peft import PeftModel
    from transformers import GPT2ForSequenceClassification
    from model import GPTClassifier
    from utils import attach_adapter, load_gpt, load_tokenizer, read_adapter
    tmp, _ = lora_run
    tok = load_tokenizer(tiny_dir)
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    theirs = PeftModel.from_pretrained(
        GPT2ForSequenceClassification.from_pretrained(tiny_dir, num_labels=2, pad_token_id=tok.pad_token_id),
        tmp / "peft").eval()
    ours = load_gpt(tiny_dir, cls=GPTClassifier, num_labels=2).eval()
    attach_adapter(ours, *read_adapter(tmp / "out")[:2])
    with torch.no_grad():
        a = ours(enc["input_ids"], enc["attention_mask"])
        b = theirs(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    # logits ~1 of the tiny model, ours and peft's sums in other orders: ~1e-7 apart; an adapter loaded wrongly
    # moves them by > 1e-3
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    # The saved adapter is the one whose dev numbers metrics.jsonl reports.
    from train_utils import evaluate
    from data import Examples, load_cola
    dev = Examples.encode(tok, *load_cola(COLA_DIR)["dev"], 128)
    got = evaluate(ours, dev, torch.device("cpu"))
    row = metrics(tmp / "out")[0]
    # Accuracy and MCC are counts over the same predictions (a prediction would flip only at a logit margin within
    # the ~1e-7 of other batches); the loss, a mean of 527 float32 cross-entropies ~0.6, to a few ulps.
    assert got["acc"] == row["dev_acc"] and got["mcc"] == pytest.approx(row["dev_mcc"], rel=0, abs=1e-9)
    assert got["loss"] == pytest.approx(row["dev_loss"], rel=1e-5, abs=0)


@needs_tokenizer
@needs_cola
def test_lora_cli_same_seed_same_run(lora_7):
    tmp, _, _ = lora_7  # the same run twice (again/: without --export-peft)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    assert strip(metrics(tmp / "again" / "out")) == strip(metrics(tmp / "out"))  # exactly: the same computation
    a = load_tensors(tmp / "out" / "adapter_model.safetensors")
    b = load_tensors(tmp / "again" / "out" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- run.py predict and gen

LINE = re.compile(r"^(acceptable|unacceptable) \((\d\.\d{3})\)\t(.+)$")


def expected_probs(tiny_dir, adapter_dir, sentences):
    """What predict should print for these sentences with this adapter: (label, probability) each."""
    from model import GPTClassifier
    from utils import attach_adapter, load_gpt, load_tokenizer, read_adapter
    settings, tensors, extras = read_adapter(adapter_dir)
    model = load_gpt(tiny_dir, cls=GPTClassifier, num_labels=2).eval()
    attach_adapter(model, settings, tensors)
    tok = load_tokenizer(tiny_dir)
    out = []
    with torch.no_grad():
        for s in sentences:
            p = model(tok(s, return_tensors="pt")["input_ids"]).softmax(-1)[0]
            out.append((COLA_LABELS[int(p.argmax())], float(p.max())))
    return out


@needs_tokenizer
@needs_cola
def test_predict_prints_a_verdict_per_sentence(lora_run, tiny_dir, tmp_path):
    tmp, _ = lora_run
    (tmp_path / "in.txt").write_text("\n".join(SENTENCES) + "\n\n")  # a blank line is not a sentence
    proc = ok(run("predict", 7, "--adapter", tmp / "out", "--input", tmp_path / "in.txt", fresh=True))  # a new interpreter
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(SENTENCES), proc.stdout
    for line, sentence, (label, prob) in zip(lines, SENTENCES, expected_probs(tiny_dir, tmp / "out", SENTENCES)):
        m = LINE.match(line)
        assert m, line
        assert m.group(3) == sentence and m.group(1) == label
        # printed to 3 decimals (off by <= 0.0005), computed there in other batches and threads (~1e-7)
        assert abs(float(m.group(2)) - prob) <= 0.0006 and 0.5 <= prob <= 1.0


@needs_tokenizer
@needs_cola
def test_predict_with_several_adapters_in_one_process(lora_run, tiny_dir, tmp_path):
    """Adapters a (the CLI's LoRA), b (IA3 with its own layer norms and head) and c (LoRA on c_attn only, no
    layer norms) over one base model in one process. Each one's numbers must be its own alone: the one
    before must be taken out completely, its layer norms included (c runs on the base's)."""
    tmp, _ = lora_run
    adapters = {"a": tmp / "out",
                "b": make_adapter(tiny_dir, tmp_path / "b", "ia3", ["attn.c_attn", "mlp.c_proj"], ["mlp.c_proj"], seed=1),
                "c": make_adapter(tiny_dir, tmp_path / "c", "lora", ["attn.c_attn"], layernorms=False, seed=2)}
    routed = "Only adapter b sees this one."
    (tmp_path / "in.txt").write_text("\n".join(SENTENCES) + f"\nb\t{routed}\n")
    proc = ok(run_here("predict", 7, *[a for name, d in adapters.items() for a in ("--adapter", f"{name}={d}")],
                  "--input", tmp_path / "in.txt"))
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(SENTENCES) + 1, proc.stdout
    expected = {name: expected_probs(tiny_dir, d, SENTENCES + [routed]) for name, d in adapters.items()}
    for i, line in enumerate(lines):
        verdicts, sentence = line.split("\t")
        names = ["b"] if i == len(SENTENCES) else ["a", "b", "c"]
        assert sentence == (SENTENCES + [routed])[i]
        pieces = verdicts.split("  ")
        assert len(pieces) == len(names), line
        for name, piece in zip(names, pieces):
            m = re.fullmatch(r"(\w+): (acceptable|unacceptable) \((\d\.\d{3})\)", piece)
            assert m and m.group(1) == name, line
            label, prob = expected[name][i]
            # 3 decimals as above: <= 0.0005 of rounding, ~1e-7 of other batches and threads
            assert m.group(2) == label and abs(float(m.group(3)) - prob) <= 0.0006, (name, line, expected[name][i])
    probs = {name: [p for _, p in e[:3]] for name, e in expected.items()}
    assert probs["a"] != probs["b"] != probs["c"] != probs["a"]  # the adapters really differ


@needs_tokenizer
@needs_cola
def test_gen_with_the_adapter(lora_run, tiny_dir):
    from model import merge_adapters
    from flags import DEFAULT_PROMPT
    from utils import attach_adapter, load_gpt, load_tokenizer, read_adapter
    tmp, _ = lora_run
    proc = ok(run("gen", 7, "--model", tiny_dir, "--adapter", tmp / "out", "--max-new-tokens", 5,
                  "--temperature", 0))
    assert f"[adapter {tmp / 'out'} merged into {tiny_dir}]" in proc.stdout
    # Greedy decoding: the same five tokens as our GPT with the adapter merged in, computed here.
    model = load_gpt(tiny_dir).eval()
    attach_adapter(model, *read_adapter(tmp / "out")[:2])
    merge_adapters(model)
    tok = load_tokenizer(tiny_dir)
    ids = tok(DEFAULT_PROMPT, return_tensors="pt")["input_ids"]
    new = [int(t[0]) for t in model.generate(ids, 5, temperature=0, eos_token_id=tok.eos_token_id)]
    assert new
    text = tok.decode(new)
    while text.endswith("\ufffd"):  # the CLI holds back an unfinished multi-byte character
        new.pop()
        text = tok.decode(new)
    assert proc.stdout.endswith(DEFAULT_PROMPT + text + "\n"), proc.stdout


# --------------------------------------------------------------------------- --peft dora

@needs_tokenizer
@needs_cola
def test_dora_trains_exports_resumes_predicts_and_generates(tiny_dir, tmp_path):
    """`run.py LoRA --peft dora` with LoRA's flags: peft's files (use_dora, the magnitudes under peft's key), which
    peft loads to predict's numbers; --resume continues it; gen merges it. Flags that do not apply are refused."""
    from peft import PeftModel
    from transformers import GPT2ForSequenceClassification
    from utils import load_gpt, load_tokenizer
    out, peft_dir = tmp_path / "out", tmp_path / "peft"
    args = lora_args(tiny_dir, out, tmp_path / "plots", COLA_DIR, 7, "--peft", "dora", "--lora-alpha", 8, "--rslora",
                     "--export-peft", peft_dir)
    proc = ok(run(*args))
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True and config["use_rslora"] is True
    assert config["lora_alpha"] == 8.0 and config["target_modules"] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                        "mlp.c_proj"]
    tensors = load_tensors(peft_dir / "adapter_model.safetensors")
    # LoRA's 8,960 (test_lora_writes_adapter_metrics_plots_and_counts) + a magnitude per output: 2 x (192+64+256+64).
    assert sum(t.numel() for t in tensors.values()) == 10_112 and "trainable with DORA: 10,112 (" in proc.stdout
    m = tensors["base_model.model.transformer.h.0.mlp.c_fc.lora_magnitude_vector"]
    w = load_gpt(tiny_dir).transformer.h[0].mlp.c_fc.weight
    assert m.shape == (256,) and (m - w.norm(dim=1)).abs().max() > 1e-4  # it trained the magnitudes
    (tmp_path / "in.txt").write_text("\n".join(SENTENCES) + "\n")
    generated, resumed = together(
        lambda: run("gen", 7, "--model", tiny_dir, "--adapter", peft_dir, "--max-new-tokens", 3, "--temperature", 0),
        lambda: run(*args, "--resume"))  # the same flags: the finished run's checkpoint reads back
    predicted = run_here("predict", 7, "--adapter", out, "--input", tmp_path / "in.txt")
    bad_ff = run_here(*args, "--feedforward-modules", "mlp.c_proj")
    bad_alpha = run_here(*lora_args(tiny_dir, tmp_path / "ia3", tmp_path / "plots"), "--peft", "ia3", "--rslora")
    # predict (merged) against peft's own model of the exported files.
    tok = load_tokenizer(tiny_dir)
    theirs = PeftModel.from_pretrained(
        GPT2ForSequenceClassification.from_pretrained(tiny_dir, num_labels=2, pad_token_id=tok.pad_token_id),
        peft_dir).eval()
    lines = ok(predicted).stdout.strip().splitlines()
    assert len(lines) == len(SENTENCES)
    for line, sentence in zip(lines, SENTENCES):
        with torch.no_grad():
            p = theirs(**tok(sentence, return_tensors="pt")).logits.softmax(-1)[0]
        label, prob, text = LINE.match(line).groups()
        assert text == sentence and label == COLA_LABELS[int(p.argmax())]
        assert abs(float(prob) - float(p.max())) <= 0.0006  # printed to 3 decimals
    assert f"[adapter {peft_dir} merged into {tiny_dir}]" in ok(generated).stdout
    assert f"resumed from {out / 'last.pt'} after epoch 1 of 1" in ok(resumed).stdout
    msg = user_error(bad_ff)
    assert "--feedforward-modules applies to --peft ia3 only" in msg and "DoRA" in msg
    assert "--peft lora and dora only" in user_error(bad_alpha)


# --------------------------------------------------------------------------- bad input: exit 2, a clear message

BAD_ROWS = {
    "columns": (b"gj04\t1\tThe cat sat.\n", "3 tab-separated columns instead of 4"),
    "label": (b"gj04\t2\t\tThe cat sat.\n", "label '2' is not 0 or 1"),
    "utf8": (b"gj04\t1\t\tThe caf\xe9 \xff sat.\n", "not UTF-8"),
}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_cola_row_names_file_and_line(kind, tiny_dir, tmp_path):
    row, problem = BAD_ROWS[kind]
    data = write_cola(tmp_path / "cola", bad_train_row=row)
    msg = user_error(run_here(*lora_args(tiny_dir, tmp_path / "out", tmp_path / "plots", data)))
    assert f"{data / 'in_domain_train.tsv'}, line 5: " in msg and problem in msg
    assert "--skip-bad-rows" in msg
    assert not (tmp_path / "out").exists()


@needs_tokenizer
def test_skip_bad_rows_runs_and_counts(tiny_dir, tmp_path):
    data = write_cola(tmp_path / "cola", bad_train_row=b"gj04\t2\t\tThe cat sat.\n")
    with open(data / "in_domain_train.tsv", "ab") as f:
        f.write(b"only\ttwo\n" + b"gj04\t1\t\t\xff\xfe\n")
    proc = ok(run(*lora_args(tiny_dir, tmp_path / "out", tmp_path / "plots", data), "--skip-bad-rows"))
    assert f"skipped 3 bad rows in {data / 'in_domain_train.tsv'}" in proc.stdout
    assert "CoLA: 24 training and 12 dev sentences" in proc.stdout
    assert len(metrics(tmp_path / "out")) == 1


def test_missing_data_dir_names_the_dir_and_the_hub(tiny_dir, tmp_path):
    missing = tmp_path / "no-cola-here"
    msg = user_error(run_here(*lora_args(tiny_dir, tmp_path / "out", tmp_path / "plots", missing),
                         env={"HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}))
    assert str(missing) in msg and "in_domain_train.tsv" in msg
    assert "hub" in msg and "nyu-mll/glue" in msg and "--data-dir" in msg


@needs_tokenizer
def test_target_modules_matching_nothing(tiny_dir, tmp_path):
    data = write_cola(tmp_path / "cola")
    msg = user_error(run_here(*lora_args(tiny_dir, tmp_path / "out", tmp_path / "plots", data),
                              "--target-modules", "query", "value"))
    assert "--target-modules query value" in msg and "no nn.Linear matches" in msg and "c_attn" in msg
    assert not (tmp_path / "out").exists()


@needs_tokenizer
def test_adapter_that_is_not_an_adapter(tiny_dir, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not an adapter\n")
    (tmp_path / "in.txt").write_text("A sentence.\n")
    # A real peft adapter, but for another architecture (BERT's layer names).
    from utils import adapter_settings, write_json
    from safetensors.torch import save_file
    bert = tmp_path / "bert-adapter"
    write_json(bert / "adapter_config.json", adapter_settings("lora", target_modules=["query", "value"]))
    save_file({"base_model.model.encoder.layer.0.attention.self.query.lora_A.weight": torch.zeros(4, 32)},
              bert / "adapter_model.safetensors")
    predict_notes = run_here("predict", 7, "--model", tiny_dir, "--adapter", tmp_path / "notes", "--input",
                             tmp_path / "in.txt")
    gen_notes = run_here("gen", 7, "--model", tiny_dir, "--adapter", tmp_path / "notes", "--max-new-tokens", 2)
    predict_bert = run_here("predict", 7, "--model", tiny_dir, "--adapter", bert, "--input", tmp_path / "in.txt")
    msg = user_error(predict_notes)
    assert f"--adapter {tmp_path / 'notes'}" in msg and "adapter_config.json" in msg
    msg = user_error(gen_notes)
    assert f"--adapter {tmp_path / 'notes'}" in msg and "adapter_model.safetensors" in msg
    msg = user_error(predict_bert)
    assert "another architecture" in msg and "['query', 'value']" in msg


# --------------------------------------------------------------------------- run.py sweep

@pytest.fixture(scope="module")
def sweeps(tiny_dir, tmp_path_factory):
    """The first sweep of each of the two tests below, made at the same time: {name: (directory, args, process)}."""
    configs = {"table": ("configs.yaml", 2,
                         "- {name: small, r: 2, alpha: 4, dropout: 0.0, target_modules: [attn.c_attn]}\n"
                         "- {peft: ia3, target_modules: [attn.c_attn, mlp.c_proj], feedforward_modules: [mlp.c_proj]}\n"
                         "- {name: d, peft: dora, r: 2, target_modules: [attn.c_attn]}\n"
                         "- {name: p, peft: prompt, num_virtual_tokens: 3, prompt_init: a fine film, lr: 0.03}\n"
                         "- {name: x, peft: prefix, num_virtual_tokens: 2, prefix_projection: true, "
                         "encoder_hidden_size: 8}\n"),
               "refuses": ("configs.json", 1, '[{"name": "one", "peft": "ia3", "target_modules": ["attn.c_attn"]}]')}
    runs = {}
    for name, (file, epochs, text) in configs.items():
        tmp = tmp_path_factory.mktemp(f"sweep-{name}")
        data = tmp / "data.tsv"
        data.write_text("".join(f"{'a fine film' if i % 2 else 'a dull film'} number {i}\t{i % 2}\n"
                                for i in range(40)))
        (tmp / file).write_text(text)
        runs[name] = (tmp, ["sweep", 5, "--model", tiny_dir, "--train-file", data, "--epochs", epochs, "--configs",
                            tmp / file, "--models-dir", tmp / "models", "--plots-dir", tmp / "plots"])
    procs = together(*(lambda args=args: run(*args) for _, args in runs.values()))
    return {name: (tmp, args, proc) for (name, (tmp, args)), proc in zip(runs.items(), procs)}


@needs_tokenizer
def test_sweep_writes_its_table_and_does_not_rerun_finished_configs(sweeps):
    tmp_path, args, proc = sweeps["table"]
    proc = ok(proc)
    assert "sweep: configuration 1/5 small: lora_rank=2, lora_alpha=4.0, lora_dropout=0.0" in proc.stdout
    table = (tmp_path / "plots" / "sweep_5.md").read_text().splitlines()
    assert table[-5].startswith("| small | LORA | attn.c_attn | 2 | 4.0 | 0.0 | 1,792 | ")
    assert table[-4].startswith("| 2_ia3 | IA3 | attn.c_attn mlp.c_proj |  |  |  | ")
    assert table[-3].startswith("| d | DORA | attn.c_attn | 2 | ")
    assert table[-2].startswith("| p | PROMPT_TUNING (3 tokens) |  |  |  |  | ")
    assert table[-1].startswith("| x | PREFIX_TUNING (2 tokens) |  |  |  |  | ")
    assert json.loads((tmp_path / "models" / "sweep_5" / "d" / "adapter_config.json").read_text())["use_dora"]
    prompt = json.loads((tmp_path / "models" / "sweep_5" / "p" / "adapter_config.json").read_text())
    assert prompt["prompt_tuning_init"] == "TEXT" and prompt["prompt_tuning_init_text"] == "a fine film"
    assert json.loads((tmp_path / "models" / "sweep_5" / "x" / "adapter_config.json").read_text())["prefix_projection"]
    rows = (tmp_path / "plots" / "sweep_5.csv").read_text().splitlines()
    assert rows[0].startswith("name,method,targets,r,alpha,dropout,trainable,") and len(rows) == 6
    assert (tmp_path / "plots" / "sweep_5.png").stat().st_size > 0
    assert len(metrics(tmp_path / "models" / "sweep_5" / "small")) == 2
    again = ok(run_here(*args))  # trains nothing (unless it wrongly would): in this process
    assert again.stdout.count("finished earlier") == 5 and "epoch 1/2" not in again.stdout
    assert (tmp_path / "plots" / "sweep_5.csv").read_text().splitlines() == rows


def test_the_shipped_sweep_files_are_valid():
    """Every configuration file in sweeps/ passes the checks a sweep makes before it trains."""
    from argparse import Namespace
    from sweep import read_sweep
    files = sorted((ROOT / "sweeps").glob("*.yaml"))
    assert len(files) >= 4
    methods = set()
    for path in files:
        configs = read_sweep(path, Namespace(peft="lora", lora_rank=4))
        methods |= {flags.get("peft", "lora") for _, flags in configs}
    assert methods == {"lora", "dora", "ia3", "prompt", "prefix"}


def test_sweep_configs_are_checked_before_anything_trains(tiny_dir, tmp_path):
    cases = [('[{"r": 0}]', "configuration 1: r = 0 is not valid"),
             ('[{"peft": "lora"}, {"rank": 4}]', "configuration 2: unknown keys ['rank']"),
             ('{"r": 4}', "expected a non-empty list"), ("[{", "not valid JSON"),
             ('[{"name": "a/b"}]', "not a plain directory name")]
    for i, (text, _) in enumerate(cases):
        (tmp_path / f"bad{i}.json").write_text(text)
    procs = [run_here("sweep", 5, "--model", tiny_dir, "--configs", tmp_path / f"bad{i}.json", "--models-dir",
                      tmp_path / "m") for i in range(len(cases))]
    for proc, (_, expected) in zip(procs, cases):
        msg = user_error(proc)
        assert expected in msg, msg
    assert not (tmp_path / "m").exists()


@needs_tokenizer
def test_sweep_refuses_a_finished_config_run_with_other_settings(sweeps):
    tmp_path, args, proc = sweeps["refuses"]
    ok(proc)
    config = json.loads((tmp_path / "models" / "sweep_5" / "one" / "adapter_config.json").read_text())
    assert config["feedforward_modules"] == []  # the default mlp.c_proj is not a target here: peft would refuse it
    msg = user_error(run_here(*args, "--lr", 0.01))
    assert "configuration one in" in msg and "differ in: lr" in msg
