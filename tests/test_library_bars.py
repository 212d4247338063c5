"""utils.quiet_library_bars: off a terminal the progress bars of transformers (a GGUF's de-quantizing
included), datasets and huggingface_hub are off; on a terminal they are left on. In a fresh process each
(the switches are for the whole process)."""
import json
import os
import subprocess
import sys

from conftest import ROOT

PROBE = r"""
import json, sys
if sys.argv[1] == "tty":  # a terminal, as far as isatty() tells
    class Terminal:
        def __init__(self, stream):
            self.stream = stream
        def isatty(self):
            return True
        def __getattr__(self, name):
            return getattr(self.stream, name)
    sys.stderr = Terminal(sys.stderr)
import datasets
import huggingface_hub.utils
from transformers import modeling_gguf_pytorch_utils
from transformers.utils import logging
from utils import quiet_library_bars
quiet_library_bars()
for _ in modeling_gguf_pytorch_utils.tqdm(range(3), desc="GGUF-BAR"):  # as the converter draws it
    pass
sys.stderr.flush()
print(json.dumps({"transformers": logging.is_progress_bar_enabled(), "datasets": datasets.is_progress_bar_enabled(),
                  "huggingface_hub": not huggingface_hub.utils.are_progress_bars_disabled()}))
"""


def probe(where):
    """(the libraries' bars on?, stderr) of a process whose stderr is a pipe, which `where`='tty' makes look
    like a terminal."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_DISABLE_PROGRESS_BARS")}
    proc = subprocess.run([sys.executable, "-c", PROBE, where], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_off_a_terminal_the_libraries_bars_are_off():
    bars, stderr = probe("log")
    assert bars == {"transformers": False, "datasets": False, "huggingface_hub": False}
    assert "GGUF-BAR" not in stderr


def test_on_a_terminal_the_libraries_bars_are_left_on():
    bars, stderr = probe("tty")
    assert bars == {"transformers": True, "datasets": True, "huggingface_hub": True}
    assert "GGUF-BAR" in stderr
