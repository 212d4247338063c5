"""train_utils.fit with LoRA on the tiny random GPT-2: it learns, it leaves the base alone, it is
reproducible, and a resumed run is the uninterrupted run. Also atomic writes."""
import json
import os

import pytest
import torch

from model import GPT2_TARGETS, GPTClassifier, inject_adapters, mark_trainable
from train_utils import TrainConfig, fit, trainable_state
from data import Examples
from machine import seed_everything
from utils import UserError, atomic_write, load_gpt

CPU = torch.device("cpu")
TIMING = ("train_sentences_per_s", "train_seconds")  # wall-clock: not reproducible
HISTORY_KEYS = {"epoch", "train_loss", "train_acc", "dev_loss", "dev_acc", "dev_mcc", "lr", *TIMING}


@pytest.fixture(autouse=True)
def one_thread(one_thread):
    """The tiny model gains nothing from a second thread, and two threads slow to a crawl whenever another
    process holds a core (their barriers wait on a descheduled thread): conftest's one thread, for every test."""


def numbers(history):
    """Everything in a metrics history except the wall-clock throughput."""
    assert all(set(row) == HISTORY_KEYS for row in history)
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


def separable(n, seed, tokens_per_class=10):
    """Sentences of 3-9 tokens drawn from one of two disjoint token sets; the label is which set."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for _ in range(n):
        y = int(torch.randint(2, (1,), generator=g))
        length = int(torch.randint(3, 10, (1,), generator=g))
        first = 1000 if y == 0 else 2000
        ids.append((first + torch.randint(0, tokens_per_class, (length,), generator=g)).tolist())
        labels.append(y)
    return Examples(ids, labels, pad_id=50256)


def lora_model(tiny_dir, seed, dropout=0.1):
    seed_everything(seed)
    model = load_gpt(tiny_dir, cls=GPTClassifier, num_labels=2)
    inject_adapters(model, "lora", GPT2_TARGETS, r=4, alpha=4.0, dropout=dropout)
    mark_trainable(model)
    return model


def test_lora_learns_a_separable_task_and_leaves_the_base_alone(tiny_dir, tmp_path):
    train, dev = separable(256, seed=1), separable(128, seed=2)
    model = lora_model(tiny_dir, seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = ({f"transformer.h.{i}.{t}.lora_{ab}" for i in range(2) for t in GPT2_TARGETS for ab in "AB"}
                | {f"transformer.h.{i}.{ln}.{w}" for i in range(2) for ln in ("ln_1", "ln_2") for w in ("weight", "bias")}
                | {"transformer.ln_f.weight", "transformer.ln_f.bias", "score.weight"})
    assert trainable == expected
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []
    history = fit(model, train, dev, TrainConfig(epochs=3, lr=2e-2, batch_size=32, seed=0), CPU, tmp_path,
                  on_best=lambda m, row: seen.append(row["epoch"]))
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["dev_acc"] >= 0.95, history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["lr"] == 0.0  # linear decay ends at zero
    assert seen and seen[0] == 1
    # metrics.jsonl holds exactly the history.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == history
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed == trainable  # every adapter, layer norm and head tensor moved; nothing else did
    for n in set(before) - trainable:
        assert torch.equal(before[n], after[n].detach()), n  # bit-identical base weights
    assert torch.equal(model.lm_head.weight, before["transformer.wte.weight"])


def test_same_seed_same_numbers_other_seed_other_numbers(tiny_dir, tmp_path):
    train, dev = separable(96, seed=3), separable(48, seed=4)
    cfg = lambda seed: TrainConfig(epochs=2, lr=1e-2, batch_size=16, seed=seed)
    runs = []
    for i, seed in enumerate([11, 11, 12]):
        model = lora_model(tiny_dir, seed)  # dropout 0.1: the random stream matters too
        history = fit(model, train, dev, cfg(seed), CPU, tmp_path / str(i))
        runs.append((numbers(history), trainable_state(model)))
    (h1, s1), (h2, s2), (h3, s3) = runs
    assert h1 == h2  # exactly, not approximately
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert all(a["train_loss"] != b["train_loss"] and a["dev_loss"] != b["dev_loss"] for a, b in zip(h1, h3))
    assert not torch.equal(s1["score.weight"], s3["score.weight"])


def test_resumed_run_equals_uninterrupted_run(tiny_dir, tmp_path):
    train, dev = separable(96, seed=5), separable(48, seed=6)
    cfg = TrainConfig(epochs=3, lr=1e-2, batch_size=16, seed=21)

    full_model = lora_model(tiny_dir, 21)
    full = fit(full_model, train, dev, cfg, CPU, tmp_path / "full")

    first = fit(lora_model(tiny_dir, 21), train, dev, cfg, CPU, tmp_path / "cut", stop_after_epoch=1)
    assert len(first) == 1 and numbers(first) == numbers(full[:1])
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 1
    # A new process: its own fresh adapter (another seed even); everything must come from last.pt.
    resumed_model = lora_model(tiny_dir, 999)
    resumed = fit(resumed_model, train, dev, cfg, CPU, tmp_path / "cut", resume=True)
    assert numbers(resumed) == numbers(full)
    assert resumed[0] == first[0]  # epoch 1's row, throughput included, comes from the checkpoint
    a, b = trainable_state(full_model), trainable_state(resumed_model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert numbers([json.loads(line) for line in lines]) == numbers(full)


def test_resume_with_other_settings_is_refused(tiny_dir, tmp_path):
    train, dev = separable(32, seed=7), separable(16, seed=8)
    fit(lora_model(tiny_dir, 1), train, dev, TrainConfig(epochs=2, seed=1), CPU, tmp_path, stop_after_epoch=1)
    with pytest.raises(UserError, match="other settings"):
        fit(lora_model(tiny_dir, 1), train, dev, TrainConfig(epochs=2, seed=1, lr=5e-3), CPU, tmp_path, resume=True)
    # Settings outside the loop's config (here the LoRA alpha) are compared too ...
    with pytest.raises(UserError, match="differ in: settings"):
        fit(lora_model(tiny_dir, 1), train, dev, TrainConfig(epochs=2, seed=1), CPU, tmp_path, resume=True,
            run_settings={"lora_alpha": 32})
    # ... and so are the adapter shapes (another rank), which must not surface as a load_state_dict traceback.
    seed_everything(1)
    other_rank = load_gpt(tiny_dir, cls=GPTClassifier, num_labels=2)
    inject_adapters(other_rank, "lora", GPT2_TARGETS, r=8, alpha=8.0)
    mark_trainable(other_rank)
    with pytest.raises(UserError, match="differ in: shapes"):
        fit(other_rank, train, dev, TrainConfig(epochs=2, seed=1), CPU, tmp_path, resume=True)


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old contents\n")

    def crashing(tmp):
        with open(tmp, "w") as f:
            f.write("half of the new")
            f.flush()
        raise RuntimeError("killed midway")

    with pytest.raises(RuntimeError, match="killed midway"):
        atomic_write(path, crashing)
    assert path.read_text() == "old contents\n"
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]  # no temporary file left behind

    atomic_write(path, lambda tmp: open(tmp, "w").write("new contents\n"))
    assert path.read_text() == "new contents\n"
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's private 0600

    new_file = tmp_path / "sub" / "fresh.json"  # parents are created
    atomic_write(new_file, lambda tmp: open(tmp, "w").write("{}"))
    assert new_file.read_text() == "{}"


def test_group_by_length_serves_every_sentence_once_with_less_padding():
    """--group-by-length: the same sentences, each once, in batches of similar lengths (far less padding),
    seeded: the same order for a seed, another for another seed, and the batch order still shuffled."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 60, (1000,), generator=g).tolist()
    ex = Examples([[7] * n for n in lengths], list(range(1000)), 0)

    def epoch(seed, grouped):
        return [b for b in ex.batches(16, shuffle=True, seed=seed, group_by_length=grouped)]

    def padding(batches):
        return sum(int((b["attention_mask"] == 0).sum()) for b in batches) / sum(b["attention_mask"].numel()
                                                                                  for b in batches)

    grouped, plain = epoch(1, True), epoch(1, False)
    assert sorted(torch.cat([b["labels"] for b in grouped]).tolist()) == list(range(1000))
    assert padding(grouped) < 0.1 < 0.4 < padding(plain)
    same, other = epoch(1, True), epoch(2, True)
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(grouped, same))
    assert not all(torch.equal(a["labels"], b["labels"]) for a, b in zip(grouped, other))
    longest = [b["input_ids"].shape[1] for b in grouped]
    assert longest != sorted(longest, reverse=True) and longest != sorted(longest)  # not one long-to-short sweep


# --------------------------------------------------------------------------- half precision on the CPU

def test_a_half_precision_the_cpu_computes_slowly_is_refused(monkeypatch):
    import machine
    monkeypatch.setattr(machine, "cpu_matmul_seconds", lambda dtype: 0.150 if dtype == torch.float16 else 0.008)
    with pytest.raises(UserError, match=r"--precision fp16 on this CPU: its matrix products take 19x as long as in "
                                        r"float32 \(150.0 ms against 8.0 ms, measured now\).*Use --precision fp32"):
        machine.autocast_dtype("fp16", CPU)
    assert machine.autocast_dtype("fp32", CPU) is None and machine.autocast_dtype("auto", CPU) is None
    monkeypatch.setattr(machine, "cpu_matmul_seconds", lambda dtype: 0.001 if dtype == torch.bfloat16 else 0.008)
    assert machine.autocast_dtype("bf16", CPU) is torch.bfloat16


def test_the_teachers_auto_precision_follows_the_cpus_flags_not_a_timing(monkeypatch):
    """--teacher-precision auto: bf16 exactly where the CPU has bf16 instructions, whatever a timing would say
    (a timed choice made two runs of one command differ on a busy machine)."""
    import distil
    import machine
    from types import SimpleNamespace
    monkeypatch.setattr(machine, "cpu_matmul_seconds", lambda dtype: 1 / 0)  # never consulted
    auto = SimpleNamespace(teacher_precision="auto")
    for has, want in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(distil, "cpu_has_bf16", lambda: has)
        assert distil.teacher_precision(auto, CPU, None) is want
    assert distil.teacher_precision(SimpleNamespace(teacher_precision="fp32"), CPU, None) is None


def test_bf16_training_on_the_cpu_agrees_with_fp32(tiny_dir, tmp_path):
    """Where this CPU computes bf16 fast (else the CLI refuses it, and so does this test): the same run in
    bf16 autocast learns what the fp32 run learns, to within a few dev sentences."""
    from machine import autocast_dtype
    try:
        autocast_dtype("bf16", CPU)
    except UserError as e:
        pytest.skip(str(e))
    train, dev = separable(256, seed=1), separable(128, seed=2)
    cfg = TrainConfig(epochs=3, lr=5e-3, batch_size=32, seed=0)
    runs = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        runs[name] = fit(lora_model(tiny_dir, seed=0), train, dev, cfg, CPU, tmp_path / name, amp_dtype=dtype)
    fp32, bf16 = runs["fp32"][-1], runs["bf16"][-1]
    assert fp32["dev_acc"] >= 0.95 and bf16["dev_acc"] >= 0.95
    assert abs(fp32["dev_acc"] - bf16["dev_acc"]) <= 3 / 128
    assert bf16["dev_loss"] == pytest.approx(fp32["dev_loss"], abs=0.05)
