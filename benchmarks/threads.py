"""threads: two `run.py LoRA` processes side by side on one machine (a small random-weight GPT-2), each with
torch's default threads (every core: they fight) vs each with --threads cores/2, against one run alone."""
import os
import subprocess
import sys
import time
from pathlib import Path

from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks.common import ROOT, checkpoint


def bench_threads(args):
    path = checkpoint(args.workdir, "gpt2-small-random",
                      lambda: GPT2LMHeadModel(GPT2Config(n_layer=4, n_head=4, n_embd=256)))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"threads: run.py LoRA, a 4-layer 256-wide GPT-2, {args.threads_sentences} CoLA sentences, 1 epoch "
          f"(+ dev evaluation), {cores} cores", flush=True)
    alone = together(args, path, None, 1)[0]
    print(f"threads: one run alone, default threads ({cores}): {alone:.1f} s", flush=True)
    fight = together(args, path, None, 2)
    print(f"threads: two runs at once, default threads ({cores} each): "
          f"{' and '.join(f'{t:.1f}' for t in fight)} s ({max(fight) / alone:.1f}x one run alone)", flush=True)
    share = max(1, cores // 2)
    shared = together(args, path, share, 2)
    print(f"threads: two runs at once, --threads {share} each: {' and '.join(f'{t:.1f}' for t in shared)} s "
          f"({max(shared) / alone:.1f}x one run alone; {max(fight) / max(shared):.1f}x faster than the default)",
          flush=True)


def together(args, path, threads, n):
    """n `run.py LoRA` runs of the checkpoint at `path` started at once (--threads `threads`, or torch's default
    if None); the wall seconds of each."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = Path(args.workdir) / "threads-runs"
    procs = []
    for i in range(n):
        cmd = [sys.executable, str(ROOT / "run.py"), "LoRA", str(i + 1), "--model", str(path), "--tokenizer",
               args.tokenizer, "--data-dir", args.data_dir, "--limit-train", str(args.threads_sentences),
               "--epochs", "1", "--out-dir", str(out / f"run{i}"), "--plots-dir", str(out / "plots")]
        cmd += ["--threads", str(threads)] if threads else []
        procs.append((time.perf_counter(), subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                                            stderr=subprocess.PIPE, text=True)))
    seconds = []
    for t0, proc in procs:
        _, err = proc.communicate()
        assert proc.returncode == 0, err[-2000:]
        seconds.append(time.perf_counter() - t0)
    return seconds
