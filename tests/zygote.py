"""A fork server for the tests' `python run.py` processes: one interpreter (per pytest process) imports torch,
torch._dynamo, transformers and matplotlib once, and each run is a fork of it that then runs run.py as a fresh
`python run.py` would. A fresh interpreter spends about 4 s of one core on those imports before it computes anything,
and the suite starts dozens of them (conftest.run uses this; docs/tests.md says which runs stay fresh interpreters).

What the child gets is what `subprocess.run([python, script, *args], ...)` gives: the file descriptors 0, 1 and 2
(the caller's stdin, its own files for stdout and stderr, so what C code writes is there too), exactly the
environment asked for (also at the C level), the working directory and umask, sys.argv and sys.path[0], a new
`__main__` module, the exit status as the interpreter makes it (SystemExit's code, an uncaught exception as a
traceback on stderr and 1, an uncaught KeyboardInterrupt by SIGINT), non-daemon threads joined and atexit handlers run, and a kill on timeout.

Why it is faithful, and where it is used only: the server imports these modules and runs nothing else, so no torch
op ran before a fork (no thread pool, the default generator untouched); it refuses to serve (the caller falls back to
a fresh interpreter) if the imports left it with more than one thread, as numpy's OpenBLAS does when
OMP_NUM_THREADS is not 1; variables that libraries read when imported (HF_HUB_OFFLINE, HF_HOME, OMP_NUM_THREADS,
...) were read with the server's environment, so a run whose environment differs from it beyond RUNTIME_ONLY
is not forked (the caller starts a fresh interpreter); random is reseeded after a fork by Python itself and
numpy's and torch's default generators here, as a fresh interpreter seeds them from the OS; what the imports set
in the environment (torch: TORCHINDUCTOR_CACHE_DIR) is set again. What differs, and no test reads: the parent pid,
the string hash seed (shared by the children of one server), and the modules already in sys.modules, with what
their imports did (sympy's 'once' warning filter in a run that would not have imported torch._dynamo).
tests/test_zygote.py checks the rest against a fresh interpreter.

Run as `python zygote.py SOCKET`: it answers on the Unix socket SOCKET until its stdin closes (its caller is gone).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading

PRELOAD = ("torch", "torch._dynamo", "transformers", "matplotlib.pyplot")
# Variables that may differ between the server and a forked run: read by our code when it runs, never by a library
# when imported.
RUNTIME_ONLY = {"PYTEST_CURRENT_TEST", "COLA_DIR", "RUN_PY_STOP_AFTER_EPOCH"}
MAX_MESSAGE = 1 << 20


# --------------------------------------------------------------------------- the server (a process of its own)

def serve(path):
    import importlib
    import selectors
    before = dict(os.environ)
    for name in PRELOAD:
        importlib.import_module(name)
    # What the imports set in the environment (torch: TORCHINDUCTOR_CACHE_DIR): a fresh run's imports set it too.
    imported = {k: os.environ.get(k) for k in before.keys() | os.environ.keys() if before.get(k) != os.environ.get(k)}
    threads = len(os.listdir("/proc/self/task"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(16)
    print(json.dumps({"threads": threads}), flush=True)  # ready
    if threads > 1:
        return  # a fork would copy a half-used thread pool: the caller falls back to fresh interpreters
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(0, selectors.EVENT_READ)  # the caller's end of stdin: EOF when it is gone
    while True:
        for key, _ in sel.select():
            if key.fd == 0:
                if not os.read(0, 4096):
                    return
            elif key.fileobj is listener:
                conn, _ = listener.accept()
                message, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, 3)
                pid = os.fork()
                if pid == 0:
                    sel.close()
                    listener.close()
                    conn.close()
                    child(json.loads(message), fds, imported)  # never returns
                for fd in fds:
                    os.close(fd)
                conn.send(str(pid).encode())
                sel.register(os.pidfd_open(pid), selectors.EVENT_READ, (pid, conn))
            else:  # a child ended: its status to its caller
                pid, conn = key.data
                sel.unregister(key.fd)
                os.close(key.fd)
                conn.send(str(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])).encode())
                conn.close()


def child(request, fds, imported):
    """In the fork: become `python SCRIPT ARGS` as the request says, run it, and exit as the interpreter would.
    imported: the variables the server's imports set (None: removed), as they set them in a fresh run."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()  # os.environ's changes reach the C environment too (putenv, unsetenv)
    os.environ.update(request["env"])
    for k, v in imported.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    # The generators a fresh interpreter seeds from the OS (random reseeds itself after a fork): not the server's.
    sys.modules["numpy"].random.seed()
    sys.modules["torch"].seed()
    script = request["argv"][0]
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(script)
    os._exit(run_script(script))


def run_script(path):
    """Run the file as __main__ and return the exit status a fresh interpreter would give."""
    import atexit
    import types
    from importlib.machinery import SourceFileLoader
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=path, __cached__=None, __loader__=SourceFileLoader("__main__", path),
                         __annotations__={})
    sys.modules["__main__"] = main
    try:
        with open(path, "rb") as f:
            code = compile(f.read(), path, "exec")
        exec(code, main.__dict__)
        status = 0
    except SystemExit as e:  # as the interpreter handles it: None is 0, an int its code, anything else printed
        status = exit_code(e.code)
    except BaseException as e:  # noqa: BLE001 - the interpreter's own report; this frame is not the script's
        e.__traceback__ = e.__traceback__.tb_next
        sys.excepthook(type(e), e, e.__traceback__)
        status = -signal.SIGINT if isinstance(e, KeyboardInterrupt) else 1  # the interpreter ends by SIGINT then
    try:
        threading._shutdown()  # non-daemon threads, then atexit, as Py_FinalizeEx orders them
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except SystemExit as e:
        status = exit_code(e.code)
    if status == -signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return status


def exit_code(code):
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


# --------------------------------------------------------------------------- the caller's side (the pytest process)

class Zygote:
    """A server started with env; run(...) makes a forked run, or returns None where it must not be forked."""

    def __init__(self, env):
        import tempfile
        self.env = dict(env)
        self.dir = tempfile.mkdtemp(prefix="zygote-")
        self.path = os.path.join(self.dir, "socket")
        self.log = open(os.path.join(self.dir, "stderr"), "w+")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), self.path], env=self.env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.ready, self.lock = None, threading.Lock()

    def usable(self, env):
        """Whether a run with env may be forked: the server is up with one thread, env differs only where no
        import reads it."""
        with self.lock:  # runs made together: one of them waits for the server's line
            if self.ready is None:
                line = self.proc.stdout.readline()
                if not line:
                    self.log.seek(0)
                    raise RuntimeError(f"the fork server did not start:\n{self.log.read()[-3000:]}")
                self.ready = json.loads(line)["threads"] == 1
        changed = {k for k in self.env.keys() | env.keys() if self.env.get(k) != env.get(k)}
        return self.ready and changed <= RUNTIME_ONLY

    def run(self, argv, env, cwd, umask, timeout):
        """argv = [script, *args] run in a fork: a CompletedProcess as subprocess.run(..., capture_output=True,
        text=True, errors="replace") returns, or subprocess.TimeoutExpired after the child is killed."""
        import tempfile
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        request = {"argv": [str(a) for a in argv], "env": env, "cwd": os.path.abspath(cwd),
                   "umask": current_umask() if umask < 0 else umask}
        cmd = [sys.executable, *request["argv"]]
        with out, err, socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
            conn.connect(self.path)
            socket.send_fds(conn, [json.dumps(request).encode()], [0, out.fileno(), err.fileno()])
            pid = int(conn.recv(64))
            conn.settimeout(timeout)
            try:
                status = int(conn.recv(64))
            except socket.timeout:
                os.kill(pid, signal.SIGKILL)
                conn.settimeout(None)
                conn.recv(64)
                raise subprocess.TimeoutExpired(cmd, timeout, output=read(out, text=False),
                                                stderr=read(err, text=False)) from None
            return subprocess.CompletedProcess(cmd, status, read(out), read(err))

    def close(self):
        import shutil
        self.proc.stdin.close()  # the server sees EOF and ends
        self.proc.wait(timeout=60)
        self.proc.stdout.close()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def read(f, text=True):
    """What subprocess gives with text=True, errors='replace': decoded, newlines made '\\n'."""
    f.seek(0)
    data = f.read()
    if not text:
        return data
    import locale
    return data.decode(locale.getpreferredencoding(False), "replace").replace("\r\n", "\n").replace("\r", "\n")


def current_umask():
    """This process's umask, read without changing it (os.umask would, for a moment, under other threads)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)


if __name__ == "__main__":
    serve(sys.argv[1])
