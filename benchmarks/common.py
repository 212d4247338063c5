"""What every benchmark shares: the random-weight checkpoints, timing in turns, CoLA's training batches and the
two LoRA models (ours, transformers+peft) that lora and precision train.

Project modules, transformers and peft are imported inside the functions that need them, here and in lora.py and
serve.py: a worker process (`bench.py _lora_worker`, `_serve_memory`) reports its own resident memory, which an
import it does not need would inflate.
"""
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench.py"  # the command, which a benchmark runs again as a worker (`bench.py _lora_worker ...`)
LORA_TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def quiet_transformers():
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def checkpoint(workdir, name="gpt2-random", make=None):
    """WORKDIR/NAME: a random-weight model written by transformers' save_pretrained, seeded, once (reused
    if already there). make() builds it; by default a GPT-2 of the real gpt2 shape."""
    path = Path(workdir) / name
    if not (path / "model.safetensors").is_file():
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(0)
        (make or (lambda: GPT2LMHeadModel(GPT2Config())))().save_pretrained(path)
    return path


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def seconds_in_turns(ways, rounds):
    """{name: [seconds of each round]} of ways {name: a call without arguments}, each round calling every way
    once, in turns, so that a slow spell of a shared machine hits them alike (warm-ups are the caller's)."""
    times = {k: [] for k in ways}
    for _ in range(rounds):
        for k, way in ways.items():
            times[k].append(timed(way))
    return times


def matmul_seconds(a, b):
    a @ b  # untimed: the first call may allocate
    return timed(lambda: a @ b)


def rss_mb():
    """This process's resident memory now (not its peak), in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def cola_batches(args):
    """The first warmup+steps shuffled batches of CoLA's training set, dynamically padded, as `run.py LoRA`
    makes them (same tokenizer, max length 128, utils.Examples)."""
    from data import Examples, load_cola
    from utils import load_tokenizer
    sentences, labels = load_cola(args.data_dir)["train"]
    train = Examples.encode(load_tokenizer(args.tokenizer), sentences, labels, 128, "train")
    batches = []
    for batch in train.batches(args.batch_size, shuffle=True, seed=0):
        batches.append(batch)
        if len(batches) == args.warmup + args.steps:
            break
    return batches


def long_batches(args):
    """1 + --long-steps batches of --long-batch rows of --long-tokens tokens each, no padding: CoLA's training
    sentences (shuffled with seed 0) one after the other, cut into rows, labels alternating."""
    import random
    from data import load_cola
    from utils import load_tokenizer
    sentences, _ = load_cola(args.data_dir)["train"]
    sentences = list(sentences)
    random.Random(0).shuffle(sentences)
    need = (1 + args.long_steps) * args.long_batch * args.long_tokens
    ids = []
    tok = load_tokenizer(args.tokenizer)
    for s in sentences:
        ids.extend(tok(" " + s)["input_ids"])
        if len(ids) >= need:
            break
    rows = torch.tensor(ids[:need]).view(1 + args.long_steps, args.long_batch, args.long_tokens)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": torch.arange(len(r)) % 2} for r in rows]


def build_ours(ckpt, kind="lora"):
    """GPT-2 with LoRA (or DoRA) r=4 on LORA_TARGETS, or 20 virtual tokens of prompt tuning; layer norms and
    head trained."""
    from model import GPTClassifier, inject_adapters, mark_trainable
    from prompts import add_virtual_tokens
    from utils import load_gpt
    model = load_gpt(str(ckpt), cls=GPTClassifier, num_labels=2)
    if kind == "prompt":
        add_virtual_tokens(model, "prompt", 20)
    else:
        inject_adapters(model, kind, LORA_TARGETS, r=4, alpha=4.0, dropout=0.1)
    mark_trainable(model, head_names=("score", "prompt_encoder"))  # adapters, layer norms and the head
    return model


def build_peft(ckpt, kind="lora"):
    """The same configuration in transformers + peft."""
    from peft import LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import GPT2ForSequenceClassification
    model = GPT2ForSequenceClassification.from_pretrained(ckpt, num_labels=2, pad_token_id=50256)
    keep = ["score", "ln_1", "ln_2", "ln_f"]
    if kind == "prompt":
        return get_peft_model(model, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=20,
                                                        modules_to_save=keep))
    config = LoraConfig(r=4, lora_alpha=4, lora_dropout=0.1, target_modules=LORA_TARGETS, fan_in_fan_out=True,
                        modules_to_save=keep, task_type="SEQ_CLS", use_dora=kind == "dora")
    return get_peft_model(model, config)


def logits(model, side, batch):
    """The classification logits of a batch, by ours' call (side "ours") or transformers' (any other)."""
    if side == "ours":
        return model(batch["input_ids"], batch["attention_mask"])
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
