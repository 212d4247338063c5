"""lora: LoRA training on CoLA, ours against transformers+peft, each side in its own worker process so that
its peak memory is its own; ours' FLOP/s against this machine's matmul peak, and its evaluation merged vs not.

The worker is `bench.py _lora_worker ours|peft`, which prints its figures as one JSON line. Its imports stay
inside the functions: ours' process must not load peft, whose memory it would count as its own.
"""
import json
import resource
import statistics
import subprocess
import sys
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F

from benchmarks.common import (BENCH, LORA_TARGETS, ROOT, build_ours, build_peft, cola_batches, logits,
                               long_batches, matmul_seconds, timed)

MATMUL_SIZE = 2048  # the machine's peak: a 2048^3 float32 matmul


# --------------------------------------------------------------------------- the worker: one side

def lora_worker(side, args, ckpt):
    """One side's training figures (and, for ours, the machine's matmul peak measured between the steps,
    and evaluation merged vs unmerged) as one JSON line on stdout. Sides ours-dora and peft-dora: DoRA's
    training alone; ours-long and peft-long: LoRA's training on the long inputs (long_batches), one untimed step
    first."""
    torch.manual_seed(0)
    side, _, kind = side.partition("-")
    batches = long_batches(args) if kind == "long" else cola_batches(args)
    if kind == "long":
        args.warmup = 1
    method = "lora" if kind == "long" else kind or "lora"
    model = build_ours(ckpt, method) if side == "ours" else build_peft(ckpt, method)
    params = [p for p in model.parameters() if p.requires_grad]
    step = partial(train_step, model, side, params, torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01))
    model.train()
    for batch in batches[:args.warmup]:
        step(batch)
    work = batches[args.warmup:]
    result = time_training(side, model, step, work, diagnostics=kind in ("", "long"))
    if not kind:
        result["saved_mb"] = saved_activations_mb(model, side, max(work, key=lambda b: b["input_ids"].numel()))
    if side == "ours" and not kind:
        result.update(time_evaluation(args, model, work))
    print(json.dumps(result))


def train_step(model, side, params, opt, batch):
    """One training step, as train_utils.fit does per batch, less the learning-rate schedule."""
    loss = F.cross_entropy(logits(model, side, batch), batch["labels"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def saved_activations_mb(model, side, batch):
    """What autograd keeps for the backward of one training forward of `batch`, in MB: the tensors handed to
    torch.autograd.graph.saved_tensors_hooks, each storage counted once, the model's own weights not at all."""
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    kept = {}

    def keep(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        logits(model, side, batch)
    return sum(kept.values()) / 2 ** 20


@contextmanager
def dropout_off(model):
    """Every dropout rate of `model` (nn.Dropout modules, attention's `dropout` float) at 0 for a while."""
    saved = [(m, name, getattr(m, name)) for m in model.modules() for name in ("p", "dropout")
             if isinstance(getattr(m, name, None), float)]
    for m, name, _ in saved:
        setattr(m, name, 0.0)
    try:
        yield
    finally:
        for m, name, rate in saved:
            setattr(m, name, rate)


def time_training(side, model, step, work, diagnostics=True):
    """The timed steps' seconds, their tokens, and the process's peak memory; for ours (with diagnostics)
    also the matmul peak and the same steps with dropout off."""
    n = MATMUL_SIZE
    a, b = torch.randn(n, n), torch.randn(n, n)
    step_s, matmul_s, no_dropout_s = [], [], []
    for batch in work:
        step_s.append(timed(lambda: step(batch)))
        if side == "ours" and diagnostics:
            # The machine's peak, measured in the same spells of the machine as the steps; and, as a
            # diagnostic of what dropout's random numbers cost, the same step with every dropout off.
            matmul_s.append(matmul_seconds(a, b))
            with dropout_off(model):
                no_dropout_s.append(timed(lambda: step(batch)))
    result = {"side": side, "train_s": sum(step_s), "sentences": sum(len(b["labels"]) for b in work),
              "real_tokens": sum(int(b["attention_mask"].sum()) for b in work),
              "padded_tokens": sum(b["input_ids"].numel() for b in work),
              "padded_tokens_max": max(b["input_ids"].numel() for b in work),
              "attention_scores": sum(b["input_ids"].shape[0] * b["input_ids"].shape[1] ** 2 for b in work),
              "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KB on Linux
    if side == "ours" and diagnostics:
        result["matmul_flops"] = 2 * n ** 3 / statistics.median(matmul_s)
        result["train_no_dropout_s"] = sum(no_dropout_s)
    return result


def time_evaluation(args, model, work):
    """Ours' evaluation of the first --eval-batches timed batches, adapters merged and unmerged in turns."""
    from model import merge_adapters
    model.eval()
    evaluation = work[:args.eval_batches]

    def evaluate():
        with torch.no_grad():
            for batch in evaluation:
                logits(model, "ours", batch)

    evaluate()  # warm-up
    unmerged = merged = 0.0
    for _ in range(args.eval_repeats):  # alternate, as the steps
        unmerged += timed(evaluate)
        merge_adapters(model)
        merged += timed(evaluate)
        merge_adapters(model, merge=False)
    return {"eval_sentences": args.eval_repeats * sum(len(b["labels"]) for b in evaluation),
            "eval_unmerged_s": unmerged, "eval_merged_s": merged}


# --------------------------------------------------------------------------- the benchmark: both sides

# The other methods' worker sides: their training alone, on the same steps; and LoRA on long inputs.
SIDES = ("ours-dora", "peft-dora", "ours-prompt", "peft-prompt")
LONG = ("ours-long", "peft-long")


def bench_lora(args, ckpt):
    results = {side: run_worker(args, side) for side in ("ours", "peft", *SIDES, *(LONG if args.long_tokens else ()))}
    ours, peft = results["ours"], results["peft"]
    n = ours["sentences"]
    print(f"lora: {args.steps} AdamW steps (after {args.warmup} untimed) on the same batches of {args.batch_size} "
          f"CoLA training sentences, dynamically padded: {ours['real_tokens']} tokens, {ours['padded_tokens']} with "
          f"the padding; LoRA r=4 alpha=4 dropout 0.1 on {' '.join(LORA_TARGETS)}, layer norms and head trained")
    o_sps, p_sps = n / ours["train_s"], n / peft["train_s"]
    print(f"lora train: ours {o_sps:.1f} sent/s | transformers+peft {p_sps:.1f} sent/s | ratio "
          f"{o_sps / p_sps:.2f}x (target >= 3x)")
    for kind, what, target in (("dora", "DoRA (the same steps, use_dora)", 1.5),
                               ("prompt", "prompt tuning (20 virtual tokens, no adapter in the layers)", 1.0)):
        o_sps, p_sps = n / results[f"ours-{kind}"]["train_s"], n / results[f"peft-{kind}"]["train_s"]
        print(f"lora train {what}: ours {o_sps:.1f} sent/s | transformers+peft {p_sps:.1f} sent/s | ratio "
              f"{o_sps / p_sps:.2f}x (target >= {target}x)")
    print_flops(args, ours)
    if args.long_tokens:
        print_long(args, results["ours-long"], results["peft-long"])
    print(f"lora peak memory: ours {ours['max_rss_mb']:.0f} MB | transformers+peft {peft['max_rss_mb']:.0f} MB | "
          f"ratio {ours['max_rss_mb'] / peft['max_rss_mb']:.2f}x (target <= 0.45x) (ru_maxrss of each side's own "
          f"process: loading the model, then training)")
    places = ours["padded_tokens_max"]
    print(f"lora saved activations (what autograd keeps for the backward of the largest batch, {places} token "
          f"places with the padding, by torch.autograd.graph.saved_tensors_hooks): ours {ours['saved_mb']:.0f} MB | "
          f"transformers+peft {peft['saved_mb']:.0f} MB | ratio {ours['saved_mb'] / peft['saved_mb']:.2f}x")
    m = ours["eval_sentences"]
    um_sps, m_sps = m / ours["eval_unmerged_s"], m / ours["eval_merged_s"]
    print(f"lora eval (ours, eval mode, no_grad, {args.eval_batches} of the same batches {args.eval_repeats} times, "
          f"merged and unmerged in turn): merged {m_sps:.1f} sent/s | unmerged {um_sps:.1f} sent/s | ratio "
          f"{m_sps / um_sps:.2f}x", flush=True)


def run_worker(args, side):
    """`bench.py _lora_worker SIDE` with this run's flags: its JSON figures."""
    cmd = [sys.executable, str(BENCH), "_lora_worker", side, "--workdir", str(args.workdir),
           "--tokenizer", args.tokenizer, "--data-dir", args.data_dir, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
           "--eval-batches", str(args.eval_batches), "--eval-repeats", str(args.eval_repeats),
           "--long-tokens", str(args.long_tokens), "--long-batch", str(args.long_batch),
           "--long-steps", str(args.long_steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"bench.py _lora_worker {side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_flops(args, ours):
    """Ours' model FLOP/s against the machine's matmul peak, with dropout on and (a diagnostic) off."""
    from model import GPTConfig
    # Model FLOPs, the usual estimate: a weight matrix with N entries costs 2N FLOPs per token forward and
    # 2N for the gradient of its input backward; the other 2N of the usual 6N, the weight gradient, is not
    # computed, the base being frozen (the rank-4 LoRA matrices add about 1% and are left out). Attention adds
    # Q K^T and A V, 4 * T * n_embd per token and layer forward, twice that backward. Only real tokens
    # count: padding is no useful work (and ours does not compute it); ours runs attention on the padded
    # (B, T) layout, so that term uses the padded T.
    c = GPTConfig()
    n_matmul = c.n_layer * 12 * c.n_embd ** 2  # attn.c_attn 3C^2 + attn.c_proj C^2 + mlp.c_fc 4C^2 + mlp.c_proj 4C^2
    flops = 4 * n_matmul * ours["real_tokens"] + 12 * c.n_layer * c.n_embd * ours["attention_scores"]
    achieved, peak = flops / ours["train_s"], ours["matmul_flops"]
    print(f"lora FLOP/s: ours {achieved / 1e9:.1f} GFLOP/s = {100 * achieved / peak:.0f}% of this machine's float32 "
          f"matmul peak, {peak / 1e9:.1f} GFLOP/s (median 2048^3 torch.matmul between the steps, "
          f"{args.threads} threads) (target >= 65%)")
    no_drop, share = flops / ours["train_no_dropout_s"], 1 - ours["train_no_dropout_s"] / ours["train_s"]
    print(f"lora FLOP/s: ours with every dropout off (a diagnostic, not a fair setting) {no_drop / 1e9:.1f} GFLOP/s "
          f"= {100 * no_drop / peak:.0f}% of the peak: dropout takes {100 * share:.0f}% of ours' step time (target <= 5%), "
          f"for its masks (15 random bits an activation, drawn on one core)")
    print(f"lora FLOP/s: model FLOPs = 4 * {n_matmul / 1e6:.1f}M matmul weights * real tokens + "
          f"12 * n_layer * n_embd * B * T^2 (attention) = {flops / 1e12:.2f} TFLOP over the timed steps; "
          f"4N not 6N per token: the frozen base weights get no gradient")


def print_long(args, ours, peft):
    """The long inputs: tokens/s of each side, the ratio, and what dropout takes of ours' step there."""
    o_tps, p_tps = ours["real_tokens"] / ours["train_s"], peft["real_tokens"] / peft["train_s"]
    share = 1 - ours["train_no_dropout_s"] / ours["train_s"]
    print(f"lora train long inputs ({args.long_steps} steps of {args.long_batch} rows of {args.long_tokens} tokens, "
          f"CoLA's training sentences one after the other, no padding): ours {o_tps:.0f} tok/s | transformers+peft "
          f"{p_tps:.0f} tok/s | ratio {o_tps / p_tps:.2f}x (target >= 2.5x); dropout takes {100 * share:.0f}% of "
          f"ours' step there (same steps with every dropout off); peak memory ours {ours['max_rss_mb']:.0f} MB | "
          f"transformers+peft {peft['max_rss_mb']:.0f} MB", flush=True)
