"""precision: LoRA training and evaluation under every --precision the CLI accepts on the CPU (fp32, bf16, fp16),
ours and transformers+peft on the same batches, in turns in one process.

A precision the CLI refuses on this CPU (machine.autocast_dtype measures it first) is timed for one step all the
same, so the table shows the trap that the refusal keeps users out of.
"""
import torch
import torch.nn.functional as F

from benchmarks.common import LORA_TARGETS, build_ours, build_peft, cola_batches, logits, timed
from machine import autocast_dtype, cpu_matmul_seconds
from model import cast_frozen_linears
from utils import UserError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def bench_precision(args, ckpt):
    batches = cola_batches(args)
    warm, work = batches[:2], batches[2:2 + args.precision_steps]
    runs = [(side, name) for side in ("ours", "peft") for name in PRECISIONS if side == "ours" or name != "fp16"]
    models = build_models(ckpt, runs)
    refused = refused_precisions()
    opts = {r: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for r, m in models.items()}
    for side, name in runs:  # warm-up
        for batch in warm[:1 if name in refused else 2]:
            step(models, opts, side, name, batch)
    train_s, eval_s = {r: 0.0 for r in runs}, {r: 0.0 for r in runs}
    for i, batch in enumerate(work):
        for side, name in runs:
            if name in refused and i > 0:
                continue  # one step of a refused precision shows its cost
            train_s[side, name] += timed(lambda: step(models, opts, side, name, batch))
            eval_s[side, name] += timed(lambda: evaluate(models, side, name, batch))
    n = lambda r: sum(len(b["labels"]) for b in (work[:1] if r[1] in refused else work))
    sps = {r: n(r) / train_s[r] for r in runs}
    eps = {r: n(r) / eval_s[r] for r in runs}
    print_table(args, runs, refused, len(work), sps, eps)


def build_models(ckpt, runs):
    """One model per row. Ours as fit trains it: under autocast its frozen base layers are kept in that
    precision (model.cast_frozen_linears); transformers+peft as it runs under autocast."""
    models = {}
    for side, name in runs:
        torch.manual_seed(0)
        models[side, name] = build_ours(ckpt) if side == "ours" else build_peft(ckpt)
        if side == "ours" and PRECISIONS[name] is not None:
            cast_frozen_linears(models[side, name], PRECISIONS[name])
    return models


def refused_precisions():
    """{precision the CLI refuses on this CPU: its matmuls' time / float32's}"""
    refused = {}
    for name in ("bf16", "fp16"):
        try:
            autocast_dtype(name, torch.device("cpu"))
        except UserError:
            refused[name] = cpu_matmul_seconds(PRECISIONS[name]) / cpu_matmul_seconds(torch.float32)
    return refused


def step(models, opts, side, name, batch):
    dtype = PRECISIONS[name]
    models[side, name].train()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        out = logits(models[side, name], side, batch)
    loss = F.cross_entropy(out.float(), batch["labels"])
    opts[side, name].zero_grad(set_to_none=True)
    loss.backward()
    opts[side, name].step()


def evaluate(models, side, name, batch):
    dtype = PRECISIONS[name]
    models[side, name].eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        logits(models[side, name], side, batch)


def print_table(args, runs, refused, steps, sps, eps):
    print(f"precision: CPU autocast, LoRA r=4 on {' '.join(LORA_TARGETS)}, {steps} training steps of "
          f"{args.batch_size} CoLA sentences (the same batches for every row), then a no_grad forward of each batch")
    for side, name in runs:
        note = (f"  (refused by the CLI on this CPU: its {name} matmuls take {refused[name]:.0f}x float32's; one step "
                f"timed)" if name in refused else "")
        print(f"precision {side} {name}: train {sps[side, name]:.1f} sent/s ({sps[side, name] / sps[side, 'fp32']:.2f}x "
              f"{side} fp32) | eval {eps[side, name]:.1f} sent/s ({eps[side, name] / eps[side, 'fp32']:.2f}x){note}")
    if "bf16" not in refused:
        print(f"precision: ours bf16 / ours fp32 = {sps['ours', 'bf16'] / sps['ours', 'fp32']:.2f}x (target >= 2x); "
              f"ours bf16 / transformers+peft bf16 = {sps['ours', 'bf16'] / sps['peft', 'bf16']:.2f}x (target >= 2.5x)",
              flush=True)
