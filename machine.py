"""The machine a run runs on: seeds, devices, precision (measured on the CPU), CPU threads, and the
processes of a torchrun launch (rank 0 speaks and writes for all)."""
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from utils import UserError


# --------------------------------------------------------------------------- seeds and devices

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def pick_device(name="auto"):
    """The device of --device. Under torchrun, `cuda` is this process's own GPU, cuda:LOCAL_RANK."""
    if launched_world() > 1 and name in ("auto", "cuda") and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UserError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', '?')} processes on this machine, "
                            f"which has {torch.cuda.device_count()} CUDA GPU(s): use --nproc_per_node <= that.")
        return torch.device("cuda", local)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device torch knows; use auto, cpu, cuda, cuda:N or mps.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for, but this torch sees no CUDA GPU; use --device cpu or auto.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0.")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"--device {name} was asked for, but this torch has no MPS (Apple GPU) support; use "
                        f"--device cpu or auto.")
    return device


def autocast_dtype(precision, device):
    """The dtype to autocast to, or None for plain float32. 'auto' = bf16 on CUDA, fp32 elsewhere.
    Half precision on the CPU is fast only where the CPU has kernels for it (bf16 on recent x86 and ARM;
    fp16 hardly anywhere): without them a matrix product falls back to a plain loop, and training runs
    tens of times slower than fp32 (measured on a 2-core VM: fp16 backward 40x fp32; bf16 2x faster than
    fp32). So on the CPU a half precision is measured first and refused when it is slower than fp32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if dtype is not None and device.type == "cpu":
        half, single = cpu_matmul_seconds(dtype), cpu_matmul_seconds(torch.float32)
        if half > 1.5 * single:
            raise UserError(f"--precision {precision} on this CPU: its matrix products take {half / single:.0f}x as "
                            f"long as in float32 ({1000 * half:.1f} ms against {1000 * single:.1f} ms, measured now), "
                            f"so training and inference would run many times slower, not faster. Use --precision "
                            f"fp32{'' if precision == 'bf16' else ' (or bf16, where this CPU has kernels for it)'}.")
    return dtype


def cpu_matmul_seconds(dtype, rows=256, width=768):
    """The fastest of three runs of the three products a training step makes (x W, x W^T, x^T g) at a
    typical size, in dtype on the CPU: a probe that costs milliseconds where the kernels are fast."""
    import time
    a, w = torch.randn(rows, width, dtype=dtype), torch.randn(width, width, dtype=dtype)
    steps = (lambda: a @ w, lambda: a @ w.t(), lambda: a.t() @ a)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        for step in steps:
            step()
        times.append(time.perf_counter() - t0)
    return min(times[1:])  # the first run allocates


def cpu_has_bf16():
    """Whether this CPU has bf16 matrix instructions (x86: AVX512-BF16 or AMX; ARM: the BF16 extension),
    read from its feature flags (/proc/cpuinfo on Linux, sysctl on macOS; False where neither says). There
    a bf16 product runs about twice as fast as fp32 (measured on an AVX512-BF16 EPYC: 4.3 ms against 9.6 ms
    for 1024 x 576 -> 1536); without them it is emulated and slower. Flags, not a timing: a choice that
    changes the numbers must not depend on how busy the machine is."""
    import platform
    import subprocess
    try:
        if platform.system() == "Darwin":
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True)
            return out.stdout.strip() == "1"
        with open("/proc/cpuinfo") as f:
            flags = {w for line in f if line.lower().startswith(("flags", "features")) for w in line.split()}
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:
        return False


def environment(device, amp):
    """What a run ran on, for its run_config.json and the report: versions, device, precision, threads."""
    import platform
    import transformers
    return {"python": platform.python_version(), "torch": str(torch.__version__),  # a plain str: last.pt loads it
            "transformers": str(transformers.__version__),
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "precision": {None: "float32"}.get(amp, str(amp).replace("torch.", "")), "threads": torch.get_num_threads()}


def set_threads(requested=None):
    """The CPU threads of torch: --threads N; else $OMP_NUM_THREADS when set (torch reads it, torchrun sets
    it); else the cores this process may run on, shared among the local ranks of a multi-process launch
    ($LOCAL_WORLD_SIZE). Several processes that each take every core fight over them and all run many
    times slower. Returns (threads, why)."""
    if requested:
        n, why = requested, "--threads"
    elif os.environ.get("OMP_NUM_THREADS", "").strip():
        n, why = torch.get_num_threads(), "$OMP_NUM_THREADS"
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        try:
            ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        except ValueError:
            ranks = 1
        n = max(1, cores // ranks)
        why = f"{cores} cores" + (f" shared by {ranks} local processes" if ranks > 1 else "")
    torch.set_num_threads(n)
    return n, why


# --------------------------------------------------------------------------- several processes (torchrun)

def launched_world():
    """The number of processes torchrun started (WORLD_SIZE), 1 without torchrun."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def init_distributed(device):
    """Under torchrun with several processes: join their process group, nccl on CUDA (one GPU per local
    rank, see pick_device), gloo on the CPU. torchrun's environment (MASTER_ADDR, RANK, ...) says where."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            **({"device_id": device} if device.type == "cuda" else {}))


def leave_distributed(together=True):
    """Leave the process group of a multi-process run (nothing in one process). together: wait for the
    others first (a process that exits while another still talks to it can abort that one)."""
    if distributed()[1] > 1:
        if together:
            dist.barrier()
        dist.destroy_process_group()


def distributed():
    """(rank, world size) of this process: (0, 1) unless it is one of several that torchrun started."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main():
    """Rank 0, the one process that prints and writes files (every process, without torchrun). Before the
    process group exists, torchrun's $RANK says."""
    rank, world = distributed()
    return rank == 0 if world > 1 else os.environ.get("RANK", "0").strip() in ("0", "")


def broadcast_object(obj):
    """Rank 0's obj on every rank (obj itself in one process): one decision, taken once, for all."""
    rank, world = distributed()
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def peer_failed(e):
    """Whether e is what a collective raises when another process of the run has died."""
    text = str(e).lower()
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        s in text for s in ("connection closed by peer", "connection reset by peer", "broken pipe", "nccl error"))
