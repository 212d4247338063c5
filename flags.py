"""Flag values as the command line checks and shows them: the value types, --help's formatter, a sweep
configuration's keys (each sets a flag), and the defaults the parser and the modes share. Light on purpose:
`run.py --help` imports it."""
import argparse
import math

DEFAULT_PROMPT = "Once upon a time, in a small village by the sea,"

# A sweep configuration's keys, and the LoRA flag each one sets.
SWEEP_KEYS = {"name": None, "peft": "peft", "r": "lora_rank", "alpha": "lora_alpha", "dropout": "lora_dropout",
              "rslora": "rslora", "target_modules": "target_modules", "feedforward_modules": "feedforward_modules",
              "lr": "lr", "epochs": "epochs", "batch_size": "batch_size", "weight_decay": "weight_decay",
              "num_virtual_tokens": "num_virtual_tokens", "prompt_init": "prompt_init",
              "prefix_projection": "prefix_projection", "encoder_hidden_size": "encoder_hidden_size"}


def seed_arg(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"SR must be a non-negative integer below 2^32 such as 12345 (it seeds "
                                         f"every random choice), got {text!r}")
    return value


def positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def named_layers(init):
    """The teacher's layer indices a --student-init value names ("0,1,2,3,16,17"), or None for bottom and every."""
    return None if init in ("bottom", "every") else [int(i) for i in init.split(",")]


def student_init(text):
    """--student-init: bottom, every, or the teacher's layer indices themselves, comma-separated and rising
    ("0,1,2,3,16,17"), kept as that text."""
    try:
        layers = named_layers(text)
    except ValueError:
        layers = []
    if layers is None:
        return text
    if not layers or min(layers) < 0 or layers != sorted(set(layers)):
        raise argparse.ArgumentTypeError(f"expected bottom, every, or the teacher's layer indices, rising and "
                                         f"comma-separated (0,1,2,3,16,17), got {text!r}")
    return ",".join(map(str, layers))


def fraction(text):
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def non_negative(text):
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown in --help, once: not again where the help text already says what the default is."""

    def _get_help_string(self, action):
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)
