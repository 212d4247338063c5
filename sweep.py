"""Sweeps: several LoRA/IA3 configurations over one backbone and data set, run one by one (a finished
one is not rerun, an interrupted one resumes) and compared side by side in a table and a plot."""
import argparse
import json
from pathlib import Path

import yaml

from flags import SWEEP_KEYS, fraction, non_negative, positive
from lora import train_lora
from machine import is_main
from report import read_run, sweep_row
from train_utils import write_sweep
from utils import UserError, check_writable, write_json

# Flags that do not decide a configuration's numbers: where things go and how fast they run.
SWEEP_VOLATILE = {"command", "resume", "threads", "device", "plots_dir", "out_dir", "run_name", "models_dir",
                  "configs", "export_peft"}

# Each key's check, as its flag would check it.
CHECKS = {"peft": lambda v: v if v in ("lora", "dora", "ia3", "prompt", "prefix") else None, "r": positive(int), "alpha": float,
          "dropout": fraction, "rslora": lambda v: v if isinstance(v, bool) else None, "lr": positive(float),
          "epochs": positive(int), "batch_size": positive(int), "weight_decay": non_negative,
          "target_modules": lambda v: v if isinstance(v, list) and v and all(isinstance(x, str) for x in v) else None,
          "feedforward_modules": lambda v: v if isinstance(v, list) and all(isinstance(x, str) for x in v) else None,
          "num_virtual_tokens": positive(int), "prompt_init": lambda v: v if isinstance(v, str) and v.strip() else None,
          "prefix_projection": lambda v: v if isinstance(v, bool) else None, "encoder_hidden_size": positive(int)}


def run_sweep(args, defaults):
    """Each configuration is a `run.py LoRA` run into MODELS_DIR/sweep_<SR>/<name>/; a finished one is
    not rerun (an interrupted one resumes), and the table and plot compare them all. defaults: every flag's
    default (a configuration recorded before a flag existed ran with it)."""
    configs = read_sweep(args.configs, args)
    sweep_dir = Path(args.models_dir) / f"sweep_{args.SR}"
    check_writable([("--models-dir", sweep_dir), ("--plots-dir", args.plots_dir)])
    rows = []
    for i, (name, flags) in enumerate(configs, 1):
        run_args = argparse.Namespace(**{**vars(args), **flags})
        run_args.out_dir, run_args.export_peft = sweep_dir / name, None
        run_args.run_name = f"sweep_{args.SR}_{name}"
        run_configuration(run_args, name, flags, f"{i}/{len(configs)}", defaults)
        if not is_main():
            continue  # rank 0 writes the table
        row = sweep_row(name, run_args.out_dir)
        if row is None:
            raise UserError(f"sweep: configuration {name} left no metrics in {run_args.out_dir}.")
        rows.append(row)
    if not is_main():
        return
    data = Path(args.train_file).name if args.train_file else args.dataset
    title = f"sweep SR={args.SR}: {Path(str(args.model)).name}, {data}"
    md, csv_path, png = write_sweep(Path(args.plots_dir) / f"sweep_{args.SR}", rows, title)
    print(f"sweep: {md}, {csv_path} and {png}")


def run_configuration(run_args, name, flags, which, defaults):
    """One configuration: trained (or resumed), unless it finished earlier with the same settings."""
    # What decides a configuration's numbers: every flag but where things go and how fast they run.
    settings = {k: str(v) for k, v in vars(run_args).items() if k not in SWEEP_VOLATILE}
    record = run_args.out_dir / "sweep_settings.json"
    done = read_run(run_args.out_dir)
    if done and len(done[1]) >= run_args.epochs and record.is_file():
        # A flag added since that configuration ran has its default there.
        before = {**{k: str(v) for k, v in defaults.items() if k in settings}, **json.loads(record.read_text())}
        differ = sorted(k for k in settings.keys() | before.keys() if settings.get(k) != before.get(k))
        if differ:
            raise UserError(f"sweep: configuration {name} in {run_args.out_dir} was run with other settings "
                            f"(they differ in: {', '.join(differ)}); its numbers are not this sweep's. Use another "
                            f"SR or --models-dir, or delete {run_args.out_dir} to run it again.")
        print(f"sweep: configuration {which} {name}: finished earlier ({run_args.out_dir}), not rerun")
        return
    run_args.resume = (run_args.out_dir / "last.pt").is_file()
    print(f"sweep: configuration {which} {name}: " + ", ".join(f"{k}={v}" for k, v in flags.items()), flush=True)
    train_lora(run_args)
    if is_main():
        write_json(record, settings)


def read_sweep(path, args):
    """[(name, {flag: value})] from a JSON or YAML list of configurations, every value checked as its flag
    would be, before anything trains."""
    configs = read_configs(path)
    out, names = [], set()
    for i, config in enumerate(configs, 1):
        unknown = sorted(set(config) - set(SWEEP_KEYS))
        if unknown:
            raise UserError(f"--configs {path}, configuration {i}: unknown keys {unknown}; the keys are "
                            f"{', '.join(SWEEP_KEYS)}.")
        flags = {}
        for key, value in config.items():
            if key == "name":
                continue
            try:
                checked = CHECKS[key](value if key in ("peft", "rslora", "target_modules", "feedforward_modules",
                                                  "prompt_init", "prefix_projection")
                                      else str(value))
            except (argparse.ArgumentTypeError, ValueError):
                checked = None
            if checked is None:
                raise UserError(f"--configs {path}, configuration {i}: {key} = {value!r} is not valid (see "
                                f"`python run.py LoRA --help` for the flag {SWEEP_KEYS[key].replace('_', '-')}).")
            flags[SWEEP_KEYS[key]] = checked
        peft = flags.get("peft", args.peft)
        name = str(config.get("name") or f"{i}_{peft}" + (f"_r{flags.get('lora_rank', args.lora_rank)}"
                                                          if peft != "ia3" else ""))
        if not name.replace("_", "").replace("-", "").replace(".", "").isalnum() or name in names:
            raise UserError(f"--configs {path}, configuration {i}: name {name!r} is "
                            f"{'used twice' if name in names else 'not a plain directory name'}; use letters, "
                            f"digits, '-', '_' and '.'.")
        names.add(name)
        out.append((name, flags))
    return out


def read_configs(path):
    """The file's list of configuration dicts (JSON, or YAML by its suffix)."""
    try:
        text = Path(path).read_text()
        configs = yaml.safe_load(text) if Path(path).suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--configs {path}: cannot read it ({e}).")
    except Exception as e:  # JSON or YAML syntax
        raise UserError(f"--configs {path}: not valid {'YAML' if str(path).endswith(('yaml', 'yml')) else 'JSON'} "
                        f"({str(e).splitlines()[0]}).")
    if not isinstance(configs, list) or not configs or not all(isinstance(c, dict) for c in configs):
        raise UserError(f"--configs {path}: expected a non-empty list of configurations (dicts such as "
                        f'{{"peft": "lora", "r": 8, "alpha": 16, "target_modules": ["q_lin", "v_lin"]}}).')
    return configs
