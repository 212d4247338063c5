"""The fork server that conftest.run starts `python run.py` from (tests/zygote.py): a forked run sees what a fresh
interpreter sees. (That a forked training run's metrics equal a fresh one's bit for bit is checked where the runs
are: lora_7 in test_cli_lora, distil --alpha 0 in test_cli_distil, gen in test_gpt.)"""
import os
import subprocess
import sys
import time

import pytest

from conftest import RUN_ENV, fork_server

PROBE = '''
import json, os, sys, warnings
import torch, torch._dynamo, transformers, matplotlib.pyplot  # the server's imports, so the same warning filters
print(json.dumps({"seed": torch.initial_seed(), "numpy": int(__import__("numpy").random.randint(2**31)),
                  "random": __import__("random").random(), "tasks": len(os.listdir("/proc/self/task"))}))
torch.manual_seed(0)
x = torch.randn(300, 300)
main = sys.modules["__main__"]
print(json.dumps({
    "argv": sys.argv, "path": sys.path, "name": __name__, "main": sorted(vars(main)), "spec": repr(__spec__),
    "package": __package__, "cached": __cached__, "file": __file__, "loader": type(__loader__).__name__,
    "cwd": os.getcwd(), "umask": os.umask(0o22), "env": dict(os.environ), "c_env": os.popen("echo $PROBE_VALUE").read(),
    "threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
    "product": (x @ x).sum().item(), "filters": [repr(f) for f in warnings.filters], "flags": repr(sys.flags),
    "stdin": os.readlink("/proc/self/fd/0"), "tty": sys.stdout.isatty(), "line_buffering": sys.stdout.line_buffering,
    "encoding": sys.stdout.encoding}))
os.write(1, b"from C, fd 1\\n")
os.write(2, b"from C, fd 2\\n")
warnings.warn("a warning")
warnings.warn("deprecated", DeprecationWarning)  # shown: __main__'s own
sys.exit(3)
'''
ENDINGS = {"raise": ('print("out")\nraise ValueError("boom")\n', 1),
           "message": ('import sys\nsys.exit("a message")\n', 1), "none": ("raise SystemExit\n", 0),
           "atexit": ('import atexit, sys\natexit.register(lambda: print("at exit"))\nsys.exit(4)\n', 4),
           "interrupt": ("raise KeyboardInterrupt\n", -2)}


@pytest.fixture(scope="module")
def server():
    s = fork_server()
    if s is None or not s.usable({**os.environ, **RUN_ENV}):
        pytest.skip("no fork server here (FORK_SERVER=0, or its imports left threads running)")
    return s


def both(server, script, cwd, env=None, umask=0o027):
    """The script as a fresh interpreter and as a fork: (fresh, forked) CompletedProcesses."""
    env = {**os.environ, **RUN_ENV, **(env or {})}
    fresh = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True,
                           errors="replace", umask=umask, timeout=300)
    return fresh, server.run([script], env, cwd, umask, 300)


def test_a_forked_run_sees_what_a_fresh_interpreter_sees(server, tmp_path):
    import json
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    (tmp_path / "cwd").mkdir()
    fresh, forked = both(server, script, tmp_path / "cwd", env={"PYTEST_CURRENT_TEST": "probe", "COLA_DIR": "x"})
    assert forked.args == fresh.args
    assert (forked.returncode, forked.stderr) == (fresh.returncode, fresh.stderr) == (3, fresh.stderr)
    assert "from C, fd 2\n" in fresh.stderr and "UserWarning: a warning" in fresh.stderr and "Deprecation" in fresh.stderr
    same, own, c_out = forked.stdout.splitlines(), fresh.stdout.splitlines(), "from C, fd 1"
    seen, expected = json.loads(same[1]), json.loads(own[1])
    assert {k: v for k, v in seen.items() if v != expected[k]} == {}  # everything, the multiplication's result too
    assert c_out in same and c_out in own
    assert seen["threads"] == int(RUN_ENV["OMP_NUM_THREADS"]) and seen["umask"] == 0o027
    # Its own generators, seeded from the OS as a fresh interpreter's are, and no thread but its own.
    a, b = json.loads(same[0]), json.loads(server.run([script], {**os.environ, **RUN_ENV}, tmp_path, 0o022, 300)
                                           .stdout.splitlines()[0])
    assert all(a[k] != b[k] for k in ("seed", "numpy", "random")) and a["tasks"] == json.loads(own[0])["tasks"]


@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_exit_status_and_tracebacks_as_the_interpreter_makes_them(server, tmp_path, ending):
    text, code = ENDINGS[ending]
    script = tmp_path / "end.py"
    script.write_text(text)
    fresh, forked = both(server, script, tmp_path)
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert fresh.returncode == code


def test_a_timeout_kills_the_forked_run(server, tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text("import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(120)\n")
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as e:
        server.run([script], {**os.environ, **RUN_ENV}, tmp_path, -1, 2)
    assert time.monotonic() - start < 30
    with pytest.raises(ProcessLookupError):  # killed, and reaped
        os.kill(int(e.value.output), 0)


def test_an_environment_a_library_reads_when_imported_is_not_forked(server):
    """HF_HOME, OMP_NUM_THREADS, ... are read when huggingface_hub or torch are imported: the server read its own."""
    base = {**os.environ, **RUN_ENV}
    assert server.usable({**base, "COLA_DIR": "/x", "RUN_PY_STOP_AFTER_EPOCH": "1"})
    assert not server.usable({**base, "HF_HOME": "/x"}) and not server.usable({**base, "OMP_NUM_THREADS": "7"})
    assert not server.usable({k: v for k, v in base.items() if k != "HF_HUB_OFFLINE"})
