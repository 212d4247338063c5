"""First run and hardening: where CoLA comes from (and its download), one run per output directory,
resume files without pickle, file modes, CPU threads, and logs off a terminal."""
import io
import os
import shutil
import signal
import stat
import subprocess
import sys
import zipfile

import pytest
import torch

import data
from conftest import (COLA_DIR, ROOT, TOKENIZER_DIR, needs_cola, needs_tokenizer, ok, run, run_here, together,
                      user_error)
from machine import set_threads
from utils import RunLock, UserError

OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def cola_rows(n, label_of=lambda i: i % 2):
    return "".join(f"src\t{label_of(i)}\t\tSentence number {i} is here.\n" for i in range(n)).encode()


def put(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


# --------------------------------------------------------------------------- where the data come from

@pytest.mark.parametrize("layout", ["data/cola/raw", "data/cola", "data"])
def test_the_default_places_and_the_order(layout, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COLA_DIR", raising=False)
    put(tmp_path / layout / "in_domain_train.tsv", cola_rows(6))
    put(tmp_path / layout / "in_domain_dev.tsv", cola_rows(4))
    out = data.load_cola(None)
    assert len(out["train"][0]) == 6 and len(out["dev"][0]) == 4
    assert str(tmp_path / layout) not in out["source"]  # relative, as the user would type it
    assert out["source"].startswith("data/cola: " if layout.startswith("data/cola") else "data/: ")
    # $COLA_DIR comes before data/cola, and --data-dir before both; a given place without the files is named.
    env_dir = put(tmp_path / "env" / "in_domain_train.tsv", cola_rows(8)).parent
    put(env_dir / "in_domain_dev.tsv", cola_rows(4))
    monkeypatch.setenv("COLA_DIR", str(env_dir))
    assert len(data.load_cola(None)["train"][0]) == 8
    flag_dir = put(tmp_path / "flag" / "raw" / "in_domain_train.tsv", cola_rows(10)).parent
    put(flag_dir / "in_domain_dev.tsv", cola_rows(4))
    out = data.load_cola(tmp_path / "flag")  # the release root that holds raw/
    assert len(out["train"][0]) == 10 and out["source"] == f"--data-dir: {flag_dir}"
    capsys.readouterr()
    assert len(data.load_cola(tmp_path / "empty")["train"][0]) == 8
    assert f"--data-dir {tmp_path / 'empty'} holds no in_domain_train.tsv; using $COLA_DIR" in capsys.readouterr().out


def release_zip(path, train=None, dev=None, ood_rows=516):
    """A zip laid out like cola_public_1.1.zip; by default with the real in-domain files (whose checksums
    the fetch knows) and a made-up out-of-domain file with the release's 516 rows."""
    train = train if train is not None else (COLA_DIR / "in_domain_train.tsv").read_bytes()
    dev = dev if dev is not None else (COLA_DIR / "in_domain_dev.tsv").read_bytes()
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("cola_public/README", "CoLA\n")
        z.writestr("cola_public/raw/in_domain_train.tsv", train)
        z.writestr("cola_public/raw/in_domain_dev.tsv", dev)
        z.writestr("cola_public/raw/out_of_domain_dev.tsv", cola_rows(ood_rows))
        z.writestr("cola_public/tokenized/in_domain_train.tsv", train)
    return path


def serve(monkeypatch, archive):
    """Mock the network boundary only: download() hands out the test's zip; unpacking and checks are real."""
    urls = []

    def fake_download(url, path, timeout=30):
        urls.append(url)
        path.write_bytes(archive.read_bytes())
    monkeypatch.setattr(data, "download", fake_download)
    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("COLA_DIR", raising=False)
    return urls


@needs_cola
def test_fetch_the_official_release_when_nothing_is_here(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    urls = serve(monkeypatch, release_zip(tmp_path / "release.zip"))
    out = data.load_cola(None, "in_domain")
    assert urls == [data.COLA_URL]
    assert out["source"] == "downloaded: data/cola/raw" and out["eval_split"] == "in_domain"
    assert sorted(p.name for p in (work / "data" / "cola" / "raw").iterdir()) == sorted(data.COLA_ROWS)
    assert (work / "data/cola/raw/in_domain_train.tsv").read_bytes() == (COLA_DIR / "in_domain_train.tsv").read_bytes()
    assert len(out["train"][0]) == 8551 and len(out["dev"][0]) == 527
    # In- and out-of-domain dev sets stay separate, and the next run finds the files without downloading.
    assert len(data.load_cola(None, "out_of_domain")["dev"][0]) == 516
    assert len(data.load_cola(None, "both")["dev"][0]) == 527 + 516
    assert urls == [data.COLA_URL]
    assert "downloading the official release" in capsys.readouterr().out


@needs_cola
@pytest.mark.parametrize("damage", ["train", "ood_rows", "not_a_zip"])
def test_a_download_that_is_not_the_release_unpacks_nothing(damage, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if damage == "not_a_zip":
        archive = put(tmp_path / "release.zip", b"<html>404 Not Found</html>")
    else:
        train = (COLA_DIR / "in_domain_train.tsv").read_bytes()
        archive = release_zip(tmp_path / "release.zip", train=train.replace(b"\t1\t", b"\t0\t", 1) if
                              damage == "train" else None, ood_rows=515 if damage == "ood_rows" else 516)
    serve(monkeypatch, archive)
    with pytest.raises(UserError) as e:
        data.load_cola(tmp_path / "target")
    msg = str(e.value)
    assert "not the CoLA 1.1 release" in msg and "nothing was unpacked" in msg
    assert {"train": "in_domain_train.tsv has SHA-256", "ood_rows": "515 rows, the release's has 516",
            "not_a_zip": "not a zip file"}[damage] in msg
    assert not (tmp_path / "target").exists() and not (tmp_path / "data").exists()


def test_no_network_falls_back_to_the_hub_copy_with_both_dev_sets(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def no_network(url, path, timeout=30):
        raise OSError("Name or service not known")
    monkeypatch.setattr(data, "download", no_network)
    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    import datasets
    glue = {"train": {"sentence": ["A a.", "B b."], "label": [1, 0]},
            "validation": {"sentence": ["C c.", "D d.", "E e."], "label": [1, 1, 0]}}
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: glue)
    out = data.load_cola(None, "in_domain")
    assert out["eval_split"] == "both" and len(out["dev"][0]) == 3 and "nyu-mll/glue" in out["source"]
    assert "--eval-split is both, not in_domain" in capsys.readouterr().out
    assert not (tmp_path / "data").exists()


@pytest.fixture(scope="module")
def bare_runs(tiny_dir, tmp_path_factory):
    """`python run.py LoRA 3 --model TINY ...` with no --data-dir and no $COLA_DIR, from a directory holding
    data/in_domain_*.tsv (60 lines each), and from an empty one (an error: in this process, run_here):
    {name: (directory, process)}."""
    course, empty = tmp_path_factory.mktemp("course-layout"), tmp_path_factory.mktemp("nothing-here")
    if COLA_DIR.is_dir():
        for name in ("in_domain_train.tsv", "in_domain_dev.tsv"):
            put(course / "data" / name, b"".join((COLA_DIR / name).read_bytes().splitlines(keepends=True)[:60]))
    procs = (run("LoRA", 3, "--model", tiny_dir, "--tokenizer", TOKENIZER_DIR, "--epochs", 1, cwd=course,
                 env={"COLA_DIR": ""}),
             run_here("LoRA", 3, "--model", tiny_dir, cwd=empty, env={"COLA_DIR": ""}))
    return {"course": (course, procs[0]), "empty": (empty, procs[1])}


@needs_tokenizer
@needs_cola
def test_the_bare_command_with_the_course_layout(bare_runs):
    """`python run.py LoRA SR` with no --data-dir, from a directory holding data/in_domain_train.tsv."""
    tmp_path, proc = bare_runs["course"]
    proc = ok(proc)
    assert "CoLA data from data/: data" in proc.stdout and "CoLA: 60 training and 60 dev sentences" in proc.stdout
    assert (tmp_path / "models" / "LoRA_3" / "adapter_model.safetensors").is_file()
    assert "\r" not in proc.stderr  # no tqdm redraws in a log (stderr is a pipe here)


def test_offline_and_nothing_here_is_one_clear_error(bare_runs):
    tmp_path, proc = bare_runs["empty"]
    msg = user_error(proc)
    assert "looked in data/cola, data/" in msg and "HF_DATASETS_OFFLINE is set" in msg and "--data-dir" in msg
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()


# --------------------------------------------------------------------------- one run per output directory

HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from utils import RunLock
lock = RunLock({d!r}, "--out-dir", "python run.py LoRA 3 (the first run)").__enter__()
print("locked", flush=True)
time.sleep(120)
"""


@needs_tokenizer
@needs_cola
def test_a_second_run_on_a_locked_directory_and_no_stale_lock_after_a_kill(tiny_dir, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT), d=str(out))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = ["LoRA", 3, "--model", tiny_dir, "--data-dir", COLA_DIR, "--limit-train", 64, "--epochs", 1,
                "--out-dir", out, "--plots-dir", tmp_path / "plots"]
        msg = user_error(run_here(*args))
        assert f"{out} is in use by another run (pid {holder.pid} on " in msg
        assert "python run.py LoRA 3 (the first run)" in msg and "--out-dir" in msg
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # the second run wrote nothing
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        ok(run(*args))  # the killed holder left no stale lock
        ok(run(*args, "--resume"))
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_released_when_the_run_ends(tmp_path):
    with RunLock(tmp_path / "d", "--out-dir", "first"):
        with pytest.raises(UserError, match=r"in use by another run \(pid \d+ on .*: first\)"):
            with RunLock(tmp_path / "d", "--out-dir", "second"):
                pass
    with RunLock(tmp_path / "d", "--out-dir", "third"):
        assert (tmp_path / "d" / ".lock").read_text().rstrip().endswith(": third")


# --------------------------------------------------------------------------- no pickle in resume files

class Payload:
    def __reduce__(self):
        return (print, ("PAYLOAD RAN",))


def lora_args(tiny_dir, tmp, *extra):
    return ["LoRA", 3, "--model", tiny_dir, "--data-dir", COLA_DIR, "--limit-train", 64, "--epochs", 2,
            "--out-dir", tmp / "out", "--plots-dir", tmp / "plots", "--export-peft", tmp / "peft", *extra]


@pytest.fixture(scope="module")
def lora_runs(tiny_dir, tmp_path_factory):
    """{umask: (directory, process)} of lora_args under umasks 022 (with --threads 2) and 077, made at the same
    time; the first is shared by the tests of file modes, of --threads and of resume files."""
    tmps = {umask: tmp_path_factory.mktemp(f"umask-{umask:o}") for umask in (0o022, 0o077)}
    threads = {0o022: ["--threads", 2], 0o077: []}
    procs = together(*(lambda u=u: run(*lora_args(tiny_dir, tmps[u], *threads[u]), umask=u) for u in tmps))
    return {umask: (tmps[umask], ok(proc)) for umask, proc in zip(tmps, procs)}


@needs_tokenizer
@needs_cola
def test_resume_files_load_without_pickle_and_others_are_refused(lora_runs, tiny_dir, tmp_path):
    shutil.copytree(lora_runs[0o022][0] / "out", tmp_path / "out")  # a finished run of 2 epochs
    out = tmp_path / "out"
    args = lora_args(tiny_dir, tmp_path)
    state = torch.load(out / "last.pt", weights_only=True)  # our own resume file needs no pickle
    assert state["epoch"] == 1 and set(state["trainable"]) and state["history"][1]["epoch"] == 2
    torch.save({**state, "extra": Payload()}, out / "last.pt")
    proc = run_here(*args, "--resume")
    msg = user_error(proc)
    assert "PAYLOAD RAN" not in proc.stdout + proc.stderr
    assert f"--resume: {out / 'last.pt'} is not a resume checkpoint that can be read safely" in msg
    assert "Delete it to start afresh" in msg
    (out / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    assert "is not a resume checkpoint" in user_error(run_here(*args, "--resume"))


# --------------------------------------------------------------------------- file modes

@needs_tokenizer
@needs_cola
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_mode_of_a_plain_write(umask, lora_runs):
    tmp_path, _ = lora_runs[umask]
    files = [p for d in ("out", "plots", "peft") for p in (tmp_path / d).iterdir()]
    assert {p.name for p in files} >= {"adapter_model.safetensors", "adapter_config.json", "last.pt",
                                       "metrics.jsonl", "run_config.json", "LoRA_3_acc.png"}
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


# --------------------------------------------------------------------------- CPU threads

def test_threads_from_the_flag_the_environment_or_the_cores(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == (1, "--threads") and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_threads(None)[1] == "$OMP_NUM_THREADS"
        monkeypatch.delenv("OMP_NUM_THREADS")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        assert set_threads(None) == (cores, f"{cores} cores")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))  # more ranks than cores: one thread each
        assert set_threads(None) == (1, f"{cores} cores shared by {2 * cores} local processes")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@needs_tokenizer
@needs_cola
def test_threads_flag_on_the_command_line(lora_runs):
    _, proc = lora_runs[0o022]  # made with --threads 2
    assert proc.stdout.startswith("CPU threads: 2 (--threads)\n")
    assert "expected a positive int, got '0'" in run_here("LoRA", 3, "--threads", 0).stderr


# --------------------------------------------------------------------------- logs

def test_progress_off_a_terminal_is_a_line_every_few_seconds():
    from train_utils import LogProgress
    log = io.StringIO()
    bar = LogProgress(range(5), 5, "epoch 1/3", every=0, file=log)
    for i in bar:
        bar.set_postfix(loss=f"{0.5 - i / 10:.4f}")
    lines = log.getvalue().splitlines()
    assert lines == ["epoch 1/3: 1/5 (20%), 0 s, loss 0.5000", "epoch 1/3: 2/5 (40%), 0 s, loss 0.4000",
                     "epoch 1/3: 3/5 (60%), 0 s, loss 0.3000", "epoch 1/3: 4/5 (80%), 0 s, loss 0.2000"]
    quiet = io.StringIO()
    assert list(LogProgress(range(5), 5, "x", every=30, file=quiet)) == list(range(5)) and quiet.getvalue() == ""
