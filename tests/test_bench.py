"""bench.py's layout: one module a benchmark in benchmarks/, which get the project's top-level modules (not their
namesakes in benchmarks/) when they import lora, distil or serve; and the command answers --help at once."""
import importlib
import subprocess
import sys

import pytest

from conftest import ROOT

MODES = ["gen", "lora", "precision", "distil", "backbone", "threads", "serve"]


def test_each_mode_is_one_module_and_top_level_names_are_the_projects():
    pytest.importorskip("peft")
    for mode in MODES:
        assert callable(getattr(importlib.import_module(f"benchmarks.{mode}"), f"bench_{mode}"))
    import distil
    import lora
    import serve
    from benchmarks import distil as bench_distil, serve as bench_serve
    for module in (distil, lora, serve):
        assert module.__file__ == str(ROOT / f"{module.__name__}.py")
    assert bench_distil.Teacher is distil.Teacher
    assert bench_distil.logits_by_length is distil.logits_by_length
    assert bench_serve.bench_serve.__module__ == "benchmarks.serve"


def test_help_lists_the_modes():
    out = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--help"], capture_output=True, text=True,
                         cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr
    assert "{gen,lora,precision,distil,backbone,threads,serve,all,_lora_worker,_serve_memory}" in out.stdout
