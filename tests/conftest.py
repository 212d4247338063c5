"""Shared fixtures: checkpoints that transformers itself writes (random weights), and the data in
../shared/data when it is there (tests that need it skip cleanly when it is not)."""
import atexit
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

# Nothing in the tests may wait on the hub; the one test of the online path unsets this itself.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data"))
TOKENIZER_DIR = SHARED / "gpt2-tokenizer"
COLA_DIR = SHARED / "cola" / "raw"


def needs(path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is not here")


needs_tokenizer = needs(TOKENIZER_DIR / "vocab.json")
needs_cola = needs(COLA_DIR / "in_domain_train.tsv")


def save_hf_gpt2(path, seed=0, with_tokenizer=True, **shape):
    """A GPT-2 checkpoint written by transformers' own save_pretrained (random weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(**shape)).save_pretrained(path)
    if with_tokenizer and TOKENIZER_DIR.exists():
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(TOKENIZER_DIR / name, path / name)
    return path


# Tiny models gain nothing from a second thread, and the CPU is shared (runs are made together): the tests compute on
# one thread, in-process and in the processes run() starts, unless OMP_NUM_THREADS says otherwise (OMP_NUM_THREADS=2
# python -m pytest shakes out results that hang on the order of a sum).
THREADS = os.environ.get("OMP_NUM_THREADS") or "1"
# Two threads on a busy CPU wait at every barrier: under a load of 10 on 2 cores, gpt2's 80 greedy tokens took 51 s on
# two threads and 7 s on one.
torch.set_num_threads(int(THREADS))


@pytest.fixture
def one_thread():
    """One torch thread for the test (or $OMP_NUM_THREADS), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(THREADS))
    yield
    torch.set_num_threads(threads)


# pytest.ini runs the suite on two pytest-xdist workers (-n 2). Tests of one group run on one worker, in one process:
# the modules whose module-scoped fixtures make runs (each worker would make them again) are each a group, and
# test_cli_lora and test_cli_distil one group, since both read the session's lora_7. The other tests go one by one to
# whichever worker is free. (xdist's own --dist loadgroup marks tests by rewriting a node id that pytest 9 no longer
# reads: this scheduler groups by file name instead, as xdist's loadfile does.)
XDIST_GROUPS = {"test_cli_lora.py": "lora_7", "test_cli_distil.py": "lora_7"}
XDIST_GROUPS.update({name: name for name in ("test_distributed.py", "test_report.py", "test_hardening.py",
                                             "test_prompts.py", "test_gpt.py", "test_serve.py")})


def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "load":
        return None  # another --dist asked for: xdist's own
    from xdist.scheduler import LoadScopeScheduling

    class Groups(LoadScopeScheduling):
        """xdist's loadscope (work units of tests that run on one worker, largest first), units as XDIST_GROUPS says."""
        def _split_scope(self, nodeid):
            return XDIST_GROUPS.get(nodeid.split("::", 1)[0].rsplit("/", 1)[-1], nodeid)

    return Groups(config, log)


def copy_checkpoint(src, dst, with_tokenizer=False, **config):
    """A copy of the checkpoint in src (its config.json with these entries changed, its weights, and its tokenizer
    files if asked) in dst: cheaper than save_hf_gpt2 again, and the same files."""
    import json
    dst.mkdir(parents=True)
    names = ["model.safetensors"] + (["vocab.json", "merges.txt"] if with_tokenizer else [])
    for name in names:
        shutil.copy(src / name, dst / name)
    (dst / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), **config}))
    return dst


TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=256)  # full GPT-2 vocabulary, so the real tokenizer fits


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return save_hf_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), **TINY)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    """The real gpt2 shape: 12 layers, 768 wide, 50257 tokens (124M random weights)."""
    return save_hf_gpt2(tmp_path_factory.mktemp("gpt2-shape"))


def make_adapter(base_dir, out_dir, kind, targets, feedforward=(), layernorms=True, labels=("unacceptable", "acceptable"),
                 alpha=2.0, seed=0, **extras):
    """A random non-trivial adapter of the GPT-2 in base_dir, saved as `run.py LoRA` saves its own."""
    from model import GPTClassifier, inject_adapters, mark_trainable
    from utils import adapter_settings, load_gpt, save_adapter
    torch.manual_seed(seed)
    model = load_gpt(base_dir, cls=GPTClassifier, num_labels=len(labels))
    inject_adapters(model, kind, targets, feedforward, r=2, alpha=alpha)
    mark_trainable(model, train_layernorm=layernorms)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    settings = adapter_settings(kind, 2, alpha, 0.0, False, targets, feedforward,
                                modules_to_save=["score"] + (["ln_1", "ln_2", "ln_f"] if layernorms else []))
    save_adapter(model, out_dir, settings, {"model": str(base_dir), "tokenizer": str(base_dir), "labels": list(labels),
                                            "max_length": 128, **extras})
    return out_dir


# --------------------------------------------------------------------------- the command line, as a user runs it

def run(*args, env=None, cwd=ROOT, launcher=(), script=ROOT / "run.py", timeout=600, umask=-1, fresh=False):
    """python [LAUNCHER] run.py ARGS (from the repository root unless cwd is given), offline; returns the
    CompletedProcess. launcher: e.g. ("-m", "torch.distributed.run", ...) for torchrun. umask: the process's.
    `python run.py` itself (no launcher, no other script) is a fork of this process's fork server (tests/zygote.py:
    the same process, less the 4 s of imports), unless fresh=True, the environment differs from the server's where
    a library reads it when imported, or FORK_SERVER=0: then a new interpreter, as always for torchrun."""
    full_env = {**os.environ, **RUN_ENV, **(env or {})}
    if not (fresh or launcher) and Path(script) == ROOT / "run.py" and Path(cwd).is_dir():
        server = fork_server()
        if server is not None and server.usable(full_env):
            return server.run([script, *args], full_env, cwd, umask, timeout)
    return subprocess.run([sys.executable, *launcher, str(script), *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, errors="replace", timeout=timeout, umask=umask)


RUN_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": THREADS}  # one thread: tiny models, and no oversubscription
_server, _server_lock = [], threading.Lock()


def fork_server():
    """This process's fork server (tests/zygote.py), started on first use with run()'s environment; None with
    FORK_SERVER=0, and off Linux (the server counts its threads in /proc and talks over SOCK_SEQPACKET, which
    macOS lacks): fresh interpreters there."""
    if os.environ.get("FORK_SERVER", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    with _server_lock:
        if not _server:
            from zygote import Zygote
            _server.append(Zygote({**os.environ, **RUN_ENV}))
            atexit.register(_server[0].close)
        return _server[0]


def run_here(*args, env=None, cwd=ROOT):
    """`python run.py ARGS` for a command that stops at a check of its input, or that trains nothing (report, predict,
    a sweep whose configurations are all finished), made in this process (run.main, the entry run.py's __main__ calls) instead of a new interpreter
    that imports torch for a second or more: a
    CompletedProcess of what a user would see. stdout and stderr are taken at the file descriptors too (what C code
    or a library writes there), warnings are printed as a fresh interpreter prints them (each one: 'always', stricter
    than its once per place), an exception that escapes is a traceback on stderr and exit 1, and SystemExit (argparse)
    its code. The environment (run's, plus env), the working directory, torch's threads and the random generators are
    restored afterwards. Not for a command that trains or serves, nor for one that must read env when a library is
    imported: those are run(). (Each mode is still run in a process of its own by some test.)"""
    import contextlib
    import io
    import random
    import tempfile
    import traceback
    import warnings

    import numpy as np
    import run as cli
    argv = [str(a) for a in args]
    full_env = {**RUN_ENV, **(env or {})}
    saved_env = {k: os.environ.get(k) for k in full_env}
    saved = (os.getcwd(), torch.get_num_threads(), torch.get_rng_state(), random.getstate(), np.random.get_state())
    out, err = io.StringIO(), io.StringIO()
    fd_files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    fd_saved = [os.dup(1), os.dup(2)]
    code = 0
    try:
        os.environ.update(full_env)
        os.chdir(cwd)
        os.dup2(fd_files[0].fileno(), 1)
        os.dup2(fd_files[1].fileno(), 2)
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            warnings.resetwarnings()  # a fresh interpreter's filters (pytest's own are for this process)
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.filterwarnings("ignore", category=category)
            warnings.filterwarnings("always", category=DeprecationWarning, module="run")  # run.py is __main__ there
            warnings.simplefilter("always", append=True)
            try:
                code = cli.main(argv) or 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            except Exception:  # noqa: BLE001 - the interpreter's own report of an uncaught exception
                traceback.print_exc(file=sys.stderr)
                code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(fd_saved[0], 1)
        os.dup2(fd_saved[1], 2)
        for fd in fd_saved:
            os.close(fd)
        os.chdir(saved[0])
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        torch.set_num_threads(saved[1])
        torch.set_rng_state(saved[2])
        random.setstate(saved[3])
        np.random.set_state(saved[4])
    fd_text = []
    for f in fd_files:
        f.seek(0)
        fd_text.append(f.read().decode(errors="replace"))
        f.close()
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in caught)
    # Whatever reached the descriptors and the warnings come first: then a one-paragraph check sees them.
    return subprocess.CompletedProcess(["run.py", *argv], code, fd_text[0] + out.getvalue(),
                                       fd_text[1] + shown + err.getvalue())


CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def together(*calls):
    """Make independent calls (say, lambda: run(...)) at the same time, in threads, as many at once as there are
    cores; their results, in order. A run.py process is on one thread and mostly importing: the others use the
    cores it leaves idle. (More at once than cores is slower: 6 runs at once on 2 busy cores took 20% more time.)"""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max(1, min(len(calls), CORES))) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


@pytest.fixture(scope="session")
def lora_7(tiny_dir, tmp_path_factory):
    """`run.py LoRA 7` on the tiny model and 200 CoLA sentences (with --export-peft): the run of test_cli_lora and
    the teacher of test_cli_distil. With the same run again elsewhere, made at the same time (is it reproducible?):
    (directory, the first run's process, the second's); the runs in out/ and again/out/. The first is forked from the
    fork server, the second a fresh interpreter (fresh=True): test_cli_lora's equal metrics and adapters hold across
    the two."""
    tmp = tmp_path_factory.mktemp("lora-7")
    args = lambda where, *extra: ["LoRA", 7, "--model", tiny_dir, "--data-dir", COLA_DIR, "--limit-train", 200,
                                  "--epochs", 1, "--out-dir", where / "out", "--plots-dir", where / "plots", *extra]
    first, again = together(lambda: run(*args(tmp, "--export-peft", tmp / "peft")), lambda: run(*args(tmp / "again"), fresh=True))
    return tmp, ok(first), ok(again)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def user_error(proc):
    """Exit 2, one 'error:' paragraph on stderr, no traceback. Returns the message."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    assert proc.stderr.startswith("error: "), proc.stderr
    assert proc.stderr.strip().count("\n") == 0, f"not one paragraph: {proc.stderr}"
    return proc.stderr
