"""torchrun + DDP on the CPU (gloo): two processes train what one process trains with the same global batch
(dropout off), only rank 0 writes, --resume under two processes is the uninterrupted run, the teacher-logit
cache of distil is computed by both, and a failure ends the run at once with its error shown once."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import COLA_DIR, ROOT, needs_cola, needs_tokenizer, ok, run, save_hf_gpt2

pytestmark = [needs_tokenizer, needs_cola]

NO_DROPOUT = dict(n_layer=2, n_head=4, n_embd=64, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
# 97 sentences in batches of 16: the last batch holds one sentence, so one process's part of it is empty.
DATA = ["--data-dir", COLA_DIR, "--limit-train", 97, "--batch-size", 16]


def torchrun(*args, nproc=2, script=ROOT / "run.py", env=None):
    """torchrun --standalone --nproc_per_node NPROC SCRIPT ARGS, as conftest.run runs run.py."""
    return run(*args, env=env, script=script, timeout=300,
               launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)))


@pytest.fixture(scope="module")
def quiet_gpt2(tmp_path_factory):
    """A tiny GPT-2 without dropout: then one process and two compute the same sums."""
    return save_hf_gpt2(tmp_path_factory.mktemp("tiny-gpt2-no-dropout"), **NO_DROPOUT)


def tensors(path):
    return load_file(str(path))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def same_metrics(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["dev_acc"] == y["dev_acc"] and x["dev_mcc"] == y["dev_mcc"] and x["train_acc"] == y["train_acc"]
        for key in ("train_loss", "dev_loss", "lr"):
            assert x[key] == pytest.approx(y[key], abs=1e-5), key


@pytest.fixture(scope="module")
def lora_runs(quiet_gpt2, tmp_path_factory):
    """LoRA, dropout off, on one process and on two."""
    tmp = tmp_path_factory.mktemp("ddp-lora")
    common = ["--model", quiet_gpt2, *DATA, "--epochs", 2, "--lora-dropout", 0, "--plots-dir", tmp / "plots"]
    one = ok(run("LoRA", 3, *common, "--out-dir", tmp / "one"))
    two = ok(torchrun("LoRA", 3, *common, "--out-dir", tmp / "two"))
    return tmp, one, two


def test_two_processes_train_the_adapter_one_process_trains(lora_runs):
    tmp, one, two = lora_runs
    diff = max_diff(tensors(tmp / "one" / "adapter_model.safetensors"), tensors(tmp / "two" / "adapter_model.safetensors"))
    assert diff <= 1e-5
    same_metrics(metrics(tmp / "one" / "metrics.jsonl"), metrics(tmp / "two" / "metrics.jsonl"))
    assert "2 processes (torchrun), --batch-size split among them" in two.stdout


def test_only_rank_0_speaks_and_writes(lora_runs):
    tmp, one, two = lora_runs
    names = lambda d: sorted(p.name for p in d.iterdir())
    assert names(tmp / "two") == names(tmp / "one")  # no file of a second writer (temporary files included)
    for line in ("epoch 1/2 ", "epoch 2/2 ", "configuration: ", "done in "):
        assert two.stdout.count(line) == 1, line
    assert "Traceback" not in two.stderr


def test_resume_under_two_processes_is_the_uninterrupted_run(quiet_gpt2, tmp_path):
    # LoRA dropout on: resuming must give each process its own random stream back.
    common = ["--model", quiet_gpt2, *DATA, "--epochs", 3, "--lora-dropout", 0.1, "--plots-dir", tmp_path / "plots"]
    ok(torchrun("LoRA", 4, *common, "--out-dir", tmp_path / "full"))
    ok(torchrun("LoRA", 4, *common, "--out-dir", tmp_path / "cut", env={"RUN_PY_STOP_AFTER_EPOCH": "1"}))
    assert len(metrics(tmp_path / "cut" / "metrics.jsonl")) == 1
    resumed = ok(torchrun("LoRA", 4, *common, "--out-dir", tmp_path / "cut", "--resume"))
    assert "resumed from" in resumed.stdout
    full, cut = tensors(tmp_path / "full" / "adapter_model.safetensors"), tensors(tmp_path / "cut" / "adapter_model.safetensors")
    assert max_diff(full, cut) == 0.0
    numbers = lambda rows: [{k: v for k, v in r.items() if k not in ("train_sentences_per_s", "train_seconds")}
                            for r in rows]
    assert numbers(metrics(tmp_path / "full" / "metrics.jsonl")) == numbers(metrics(tmp_path / "cut" / "metrics.jsonl"))


def test_distil_under_two_processes(lora_runs, tmp_path):
    """The teacher-logit cache is computed by both processes (each its share), the KD loss with a transfer
    set (sentences without labels) averages over the whole batch: the same student as one process."""
    tmp, _, _ = lora_runs
    common = [*DATA, "--epochs", 2, "--dropout", 0, "--hidden", 16, "--emb-dim", 16, "--augment", 1,
              "--teacher", tmp / "one", "--plots-dir", tmp_path / "plots"]
    ok(run("distil", 3, *common, "--models-dir", tmp_path / "one"))
    two = ok(torchrun("distil", 3, *common, "--models-dir", tmp_path / "two"))
    assert two.stdout.count("teacher logits for the training and dev sentences") == 1
    a = tensors(tmp_path / "one" / "distil_3" / "student.safetensors")
    b = tensors(tmp_path / "two" / "distil_3" / "student.safetensors")
    assert max_diff(a, b) <= 1e-5
    same_metrics(metrics(tmp_path / "one" / "distil_3" / "metrics.jsonl"),
                 metrics(tmp_path / "two" / "distil_3" / "metrics.jsonl"))
    cached_one = sorted(p.name for p in (tmp_path / "one" / "teacher_cache").iterdir())
    cached_two = sorted(p.name for p in (tmp_path / "two" / "teacher_cache").iterdir())
    assert cached_one == cached_two
    for name in cached_one:  # the same logits, gathered from the two processes' shares
        assert torch.allclose(tensors(tmp_path / "one" / "teacher_cache" / name)["logits"],
                              tensors(tmp_path / "two" / "teacher_cache" / name)["logits"], atol=1e-5)


FAIL_ON_RANK_1 = """
import os, sys
sys.path.insert(0, {root!r})
import run, train_utils
evaluate = train_utils.local_logits
def fail(*args, **kwargs):
    if os.environ["RANK"] == "1":
        raise RuntimeError("rank 1 fails here")
    return evaluate(*args, **kwargs)
train_utils.local_logits = fail
sys.argv = ["run.py", *sys.argv[1:]]
sys.exit(run.main())
"""


def test_a_failure_on_one_rank_ends_the_run_with_its_error_shown_once(quiet_gpt2, tmp_path):
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(FAIL_ON_RANK_1.format(root=str(ROOT)))
    proc = torchrun("LoRA", 3, "--model", quiet_gpt2, *DATA, "--epochs", 2, "--out-dir", tmp_path / "out",
                    "--plots-dir", tmp_path / "plots", script=script)  # the timeout of 300 s would be a hang
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert out.count("RuntimeError: rank 1 fails here") == 1
    assert "error: [rank 0] stopped: another process of this torchrun run failed" in out
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # no epoch finished: nothing half-written


def test_a_bad_input_under_torchrun_is_said_once(quiet_gpt2, tmp_path):
    proc = torchrun("LoRA", 3, "--model", quiet_gpt2, "--data-dir", tmp_path / "nowhere", "--epochs", 1,
                    "--out-dir", tmp_path / "out")
    assert proc.returncode != 0
    assert proc.stderr.count("error: ") == 1 and "no CoLA" in proc.stderr or "CoLA" in proc.stderr
    assert "]: Traceback" not in proc.stderr  # no process of ours crashed (torchrun's own report follows)
    assert not (tmp_path / "out").exists()


def test_gen_is_refused_under_torchrun(quiet_gpt2):
    proc = torchrun("gen", 1, "--model", quiet_gpt2)
    assert proc.returncode != 0
    assert proc.stderr.count("error: `run.py gen` runs in one process; start it without torchrun") == 1
