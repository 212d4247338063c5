"""torchrun + DDP on the CPU (gloo): two processes train what one process trains with the same global batch
(dropout off), only rank 0 writes, --resume under two processes is the uninterrupted run, the teacher-logit
cache of distil is computed by both, and a failure ends the run at once with its error shown once."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import COLA_DIR, ROOT, copy_checkpoint, needs_cola, needs_tokenizer, ok, run, together

pytestmark = [needs_tokenizer, needs_cola]

NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
# 97 sentences in batches of 16: the last batch holds one sentence, so one process's part of it is empty.
DATA = ["--data-dir", COLA_DIR, "--limit-train", 97, "--batch-size", 16]


def torchrun(*args, nproc=2, script=ROOT / "run.py", env=None):
    """torchrun --standalone --nproc_per_node NPROC SCRIPT ARGS, as conftest.run runs run.py."""
    return run(*args, env=env, script=script, timeout=300,
               launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)))


@pytest.fixture(scope="module")
def quiet_gpt2(tiny_dir, tmp_path_factory):
    """The tiny GPT-2 without dropout: then one process and two compute the same sums."""
    return copy_checkpoint(tiny_dir, tmp_path_factory.mktemp("tiny-gpt2-no-dropout") / "model", with_tokenizer=True,
                           **NO_DROPOUT)


def tensors(path):
    return load_file(str(path))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def same_metrics(a, b):
    """The metrics of one process and of two. Counts of right predictions are equal (the logits are ~1e-7 apart, a
    prediction would flip only at a margin that small); losses ~0.5, means over batches summed in another order, are
    ~1e-8 apart (measured 1.5e-8): 1e-5 absolute is far from a wrong batch split (~1e-2)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["dev_acc"] == y["dev_acc"] and x["dev_mcc"] == y["dev_mcc"] and x["train_acc"] == y["train_acc"]
        for key in ("train_loss", "dev_loss", "lr"):
            assert x[key] == pytest.approx(y[key], rel=0, abs=1e-5), key


@pytest.fixture(scope="module")
def lora_runs(quiet_gpt2, tmp_path_factory):
    """LoRA, dropout off, on one process and on two."""
    tmp = tmp_path_factory.mktemp("ddp-lora")
    common = ["--model", quiet_gpt2, *DATA, "--epochs", 2, "--lora-dropout", 0, "--plots-dir", tmp / "plots"]
    one, two = together(lambda: run("LoRA", 3, *common, "--out-dir", tmp / "one"),
                        lambda: torchrun("LoRA", 3, *common, "--out-dir", tmp / "two"))
    return tmp, ok(one), ok(two)


def test_two_processes_train_the_adapter_one_process_trains(lora_runs):
    tmp, one, two = lora_runs
    diff = max_diff(tensors(tmp / "one" / "adapter_model.safetensors"), tensors(tmp / "two" / "adapter_model.safetensors"))
    # Weights <= 1 after 14 AdamW steps from gradients summed in another order (gloo's all-reduce): an ulp or so
    # apart (measured 1.2e-7); 1e-5 leaves room for Adam's division by small second moments on another CPU.
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
    for proc in together(lambda: torchrun("LoRA", 4, *common, "--out-dir", tmp_path / "full"),
                         lambda: torchrun("LoRA", 4, *common, "--out-dir", tmp_path / "cut",
                                          env={"RUN_PY_STOP_AFTER_EPOCH": "1"})):
        ok(proc)
    assert len(metrics(tmp_path / "cut" / "metrics.jsonl")) == 1
    resumed = ok(torchrun("LoRA", 4, *common, "--out-dir", tmp_path / "cut", "--resume"))
    assert "resumed from" in resumed.stdout
    full, cut = tensors(tmp_path / "full" / "adapter_model.safetensors"), tensors(tmp_path / "cut" / "adapter_model.safetensors")
    assert max_diff(full, cut) == 0.0
    numbers = lambda rows: [{k: v for k, v in r.items() if k not in ("train_sentences_per_s", "train_seconds")}
                            for r in rows]
    assert numbers(metrics(tmp_path / "full" / "metrics.jsonl")) == numbers(metrics(tmp_path / "cut" / "metrics.jsonl"))


def test_a_transformer_student_under_two_processes(lora_runs, tmp_path):
    """A transformer student with the hidden-state loss: the same student from two processes as from one, with a
    float32 teacher on every CPU (auto picks bf16 only where the CPU has it). Within 1e-4, not 1e-5: the two sum
    the same gradients in another order, and Adam turns that rounding into up to 5.9e-5 at three embedding weights
    whose gradients sit near its eps (1e-8) (docs/torchrun.md); a wrong reduction of the loss is 5.1e-3 off."""
    tmp, _, _ = lora_runs
    common = [*DATA, "--epochs", 1, "--student", "transformer", "--student-layers", 1, "--lr", 1e-3,
              "--kd-hidden", 1, "--teacher-precision", "fp32", "--teacher", tmp / "one", "--plots-dir", tmp_path / "plots"]
    one, two = together(lambda: run("distil", 3, *common, "--models-dir", tmp_path / "one"),
                        lambda: torchrun("distil", 3, *common, "--models-dir", tmp_path / "two"))
    ok(one), ok(two)
    name = "distil_tf1-bottom-base_3"
    a, b = tensors(tmp_path / "one" / name / "student.safetensors"), tensors(tmp_path / "two" / name / "student.safetensors")
    assert max_diff(a, b) <= 1e-4
    same_metrics(metrics(tmp_path / "one" / name / "metrics.jsonl"), metrics(tmp_path / "two" / name / "metrics.jsonl"))


def test_distil_under_two_processes(lora_runs, tmp_path):
    """The teacher-logit cache is computed by both processes (each its share), the KD loss with a transfer
    set (sentences without labels) averages over the whole batch: the same student as one process."""
    tmp, _, _ = lora_runs
    common = [*DATA, "--epochs", 2, "--dropout", 0, "--hidden", 16, "--emb-dim", 16, "--augment", 1,
              "--teacher", tmp / "one", "--plots-dir", tmp_path / "plots"]
    one, two = together(lambda: run("distil", 3, *common, "--models-dir", tmp_path / "one"),
                        lambda: torchrun("distil", 3, *common, "--models-dir", tmp_path / "two"))
    ok(one), ok(two)
    assert two.stdout.count("teacher logits for the training and dev sentences") == 1
    a = tensors(tmp_path / "one" / "distil_3" / "student.safetensors")
    b = tensors(tmp_path / "two" / "distil_3" / "student.safetensors")
    assert max_diff(a, b) <= 1e-5  # weights <= 5: an ulp or so apart (measured 1.2e-7), as the adapter above
    same_metrics(metrics(tmp_path / "one" / "distil_3" / "metrics.jsonl"),
                 metrics(tmp_path / "two" / "distil_3" / "metrics.jsonl"))
    cached_one = sorted(p.name for p in (tmp_path / "one" / "teacher_cache").iterdir())
    cached_two = sorted(p.name for p in (tmp_path / "two" / "teacher_cache").iterdir())
    assert cached_one == cached_two
    for name in cached_one:  # the same logits, gathered from the two processes' shares
        # each process computes whole batches of one process (predict_logits): the same bits, in fp32 too (when it
        # split each batch, the fp32 teacher's logits differed in 139 of 624 rows, by up to 9e-8)
        assert torch.equal(tensors(tmp_path / "one" / "teacher_cache" / name)["logits"],
                           tensors(tmp_path / "two" / "teacher_cache" / name)["logits"])


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


@pytest.fixture(scope="module")
def failed_runs(quiet_gpt2, tmp_path_factory):
    """Three torchrun runs that fail, made at the same time: a failure on rank 1, a bad input, gen."""
    tmp = tmp_path_factory.mktemp("ddp-failures")
    script = tmp / "fail_on_rank_1.py"
    script.write_text(FAIL_ON_RANK_1.format(root=str(ROOT)))
    procs = together(
        lambda: torchrun("LoRA", 3, "--model", quiet_gpt2, *DATA, "--epochs", 2, "--out-dir", tmp / "failure" / "out",
                         "--plots-dir", tmp / "failure" / "plots", script=script),  # a timeout of 300 s: a hang
        lambda: torchrun("LoRA", 3, "--model", quiet_gpt2, "--data-dir", tmp / "nowhere", "--epochs", 1,
                         "--out-dir", tmp / "bad-input" / "out"),
        lambda: torchrun("gen", 1, "--model", quiet_gpt2))
    return tmp, dict(zip(["failure", "bad input", "gen"], procs))


def test_a_failure_on_one_rank_ends_the_run_with_its_error_shown_once(failed_runs):
    tmp, procs = failed_runs
    proc = procs["failure"]
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert out.count("RuntimeError: rank 1 fails here") == 1
    assert "error: [rank 0] stopped: another process of this torchrun run failed" in out
    assert not (tmp / "failure" / "out" / "metrics.jsonl").exists()  # no epoch finished: nothing half-written


def test_a_bad_input_under_torchrun_is_said_once(failed_runs):
    tmp, procs = failed_runs
    proc = procs["bad input"]
    assert proc.returncode != 0
    assert proc.stderr.count("error: ") == 1 and "CoLA" in proc.stderr, proc.stderr
    assert "]: Traceback" not in proc.stderr  # no process of ours crashed (torchrun's own report follows)
    assert not (tmp / "bad-input" / "out").exists()


def test_gen_is_refused_under_torchrun(failed_runs):
    proc = failed_runs[1]["gen"]
    assert proc.returncode != 0
    assert proc.stderr.count("error: `run.py gen` runs in one process; start it without torchrun") == 1
