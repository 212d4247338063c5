"""Reading runs back: what a LoRA, sweep, distil or rnn run left on disk (run_config.json, metrics.jsonl,
its plots), for the comparison and sweep tables and for `run.py report SR`, which gathers every run of
an SR into reports/report_<SR>.md and a self-contained reports/report_<SR>.html (plots embedded).

Every figure in a report is read from the run files; the only arithmetic is the mean and standard
deviation over seeds. So a number in the report is the number the run wrote."""
import base64
import html
import json
import os
import re
from pathlib import Path

from train_utils import comparison_table, frontier_table, markdown_table, sweep_table
from utils import UserError, atomic_write, check_writable


# --------------------------------------------------------------------------- one run

def inspect_run(run_dir):
    """(run_config or None, the readable epochs of metrics.jsonl, problems): what a run directory holds,
    with every damaged or missing file named in `problems` rather than raised."""
    run_dir = Path(run_dir)
    config, history, problems = None, [], []
    try:
        config = json.loads((run_dir / "run_config.json").read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        problems.append(f"{run_dir}/run_config.json is missing (the run never finished an epoch)")
    except (OSError, ValueError) as e:
        config = None
        problems.append(f"{run_dir}/run_config.json is damaged ({str(e).splitlines()[0][:120]})")
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        lines = []
        problems.append(f"{run_dir}/metrics.jsonl is missing")
    except (OSError, UnicodeDecodeError) as e:
        lines = []
        problems.append(f"{run_dir}/metrics.jsonl cannot be read ({e})")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not {"epoch", "dev_acc", "dev_mcc"} <= row.keys():
                raise ValueError
            history.append(row)
        except ValueError:
            problems.append(f"{run_dir}/metrics.jsonl line {i} is damaged (a partial write?); the table shows the "
                            f"epochs that can be read")
    return config, history, problems


def read_run(run_dir):
    """(run_config, metrics history) of a run, or None when either is missing or damaged."""
    config, history, problems = inspect_run(run_dir)
    return None if problems or config is None or not history else (config, history)


def readable_run(run_dir):
    """(run_config, the epochs of metrics.jsonl that can be read) of a run, or None without a readable
    run_config.json or epoch: for the tables, which show what can be read (inspect_run names the rest)."""
    config, history, _ = inspect_run(run_dir)
    return None if config is None or not history else (config, history)


def best(history):
    return max(history, key=lambda r: r["dev_mcc"])


def sweep_row(name, run_dir):
    """One configuration of a sweep, as write_sweep's table wants it (its epochs that can be read), or None
    if it has not finished one."""
    run = readable_run(run_dir)
    if run is None:
        return None
    config, history = run
    settings = json.loads((run_dir / "adapter_config.json").read_text())
    b, lora = best(history), settings["peft_type"] == "LORA"
    return {"name": name, "method": method_label(settings), "targets": " ".join(settings.get("target_modules") or []),
            "r": settings["r"] if lora else "", "alpha": settings["lora_alpha"] if lora else "",
            "dropout": settings["lora_dropout"] if lora else "", "trainable": config["trainable_parameters"],
            "total": config["parameters"], "acc": b["dev_acc"], "mcc": b["dev_mcc"], "best_epoch": b["epoch"],
            "epoch_seconds": sum(r["train_seconds"] for r in history) / len(history),
            "adapter_kb": (run_dir / "adapter_model.safetensors").stat().st_size / 1024, "history": history}


def method_label(settings):
    """A peft adapter_config's method, as a table shows it: LORA, DORA, IA3, PROMPT_TUNING (20 tokens), ..."""
    kind = settings["peft_type"]
    if kind == "LORA" and settings.get("use_dora"):
        return "DORA"
    if settings.get("num_virtual_tokens"):
        return f"{kind} ({settings['num_virtual_tokens']} tokens)"
    return kind


def run_name(mode, seed, tag=""):
    """A student run's directory: distil_<seed> / rnn_<seed> for the RNN student, distil_<tag>_<seed> for
    another kind (tf6-bottom-teacher: a transformer of 6 layers, distil.student_tag), so that every kind
    lives in one models directory."""
    return f"{mode}_{tag}_{seed}" if tag else f"{mode}_{seed}"


def student_kinds(models_dir, sr):
    """The student kinds with a run of SR under models_dir: "" (the RNN) first, then the others' tags."""
    tags = set()
    for d in Path(models_dir).glob(f"*_{sr}"):
        m = re.fullmatch(rf"(?:distil|rnn)_(tf[\w-]+)_{sr}", d.name)
        if m and d.is_dir():
            tags.add(m.group(1))
    kinds = [""] if any((Path(models_dir) / run_name(m, sr)).is_dir() for m in ("distil", "rnn")) else []
    return kinds + sorted(tags, key=lambda t: (-int(re.match(r"tf(\d+)", t).group(1)), t))


def kind_label(tag):
    return f" {tag}" if tag else ""


def comparison_rows(models_dir, sr):
    """The rows of write_comparison: the teacher, then a KD student and a scratch student of each kind of
    student found (the RNN, transformers of K layers), each over the seeds of its --seeds group (row["dirs"]:
    the runs read). Returns (rows, runs), runs[kind] = {"distil": run or None, "rnn": run or None}, or None
    until some kind has both a distil and an rnn run of SR. A run's damaged lines of metrics.jsonl are left out:
    its row shows the epochs that can be read."""
    models_dir = Path(models_dir)
    runs = {tag: {m: readable_run(models_dir / run_name(m, sr, tag)) for m in ("distil", "rnn")}
            for tag in student_kinds(models_dir, sr)}
    if not any(None not in pair.values() for pair in runs.values()):
        return None
    teacher = next(pair["distil"][0]["teacher"] for pair in runs.values() if pair["distil"])
    teacher_run = readable_run(Path(teacher["dir"]))
    t_seconds = sum(r.get("train_seconds", 0) for r in teacher_run[1]) if teacher_run else 0
    rows = [{"name": f"teacher: LoRA {Path(teacher['base']).name}", "params": teacher["parameters"],
             "acc": [teacher["dev_acc"]], "mcc": [teacher["dev_mcc"]], "train_seconds": [t_seconds or None],
             "sentences_per_s": [teacher["sentences_per_s"]], "history": teacher_run[1] if teacher_run else [],
             "dirs": [Path(teacher["dir"])], "teacher": True}]
    for tag, pair in runs.items():
        for mode, name in (("distil", "KD student"), ("rnn", "scratch student")):
            if pair[mode] is None:
                continue
            row = {"name": f"{name}{kind_label(tag)} ({mode})", "acc": [], "mcc": [], "train_seconds": [],
                   "sentences_per_s": [], "seeds": [], "dirs": [], "kind": tag, "mode": mode}
            for seed in pair[mode][0].get("seed_group", [sr]):
                row["dirs"].append(models_dir / run_name(mode, seed, tag))
                run = readable_run(row["dirs"][-1])
                if run is None:
                    continue
                config, history = run
                row["acc"].append(best(history)["dev_acc"])
                row["mcc"].append(best(history)["dev_mcc"])
                row["train_seconds"].append(config.get("train_seconds"))
                row["sentences_per_s"].append(config.get("inference_sentences_per_s"))
                row["seeds"].append(seed)
                row.setdefault("history", history)
                row["params"] = config["parameters"]
            rows.append(row)
    return rows, runs


def architecture(run):
    """A student's architecture, whatever its vocabulary cut to the data (as many rows as its data has tokens)."""
    return {k: v for k, v in run["student"].items() if k != "rows"} | {"data_vocab": bool(run["student"].get("rows"))}


def first_pair(runs):
    """The distil and rnn runs of the first kind that has both (the RNN's, if there)."""
    return next(pair for pair in runs.values() if None not in pair.values())


# --------------------------------------------------------------------------- the report

class Page:
    """A report as a list of blocks, written out as markdown and as HTML from the same blocks."""

    def __init__(self):
        self.blocks = []

    def h(self, level, text):
        self.blocks.append(("h", level, text))

    def p(self, text):
        self.blocks.append(("p", text))

    def table(self, columns, cells):
        self.blocks.append(("table", columns, cells))

    def items(self, lines):
        self.blocks.append(("list", lines))

    def image(self, path, alt):
        self.blocks.append(("img", Path(path), alt))

    def markdown(self, out_dir):
        lines = []
        for kind, *rest in self.blocks:
            if kind == "h":
                lines += ["#" * rest[0] + " " + rest[1], ""]
            elif kind == "p":
                lines += [rest[0], ""]
            elif kind == "table":
                lines += [*markdown_table(*rest), ""]
            elif kind == "list":
                lines += [*(f"- {item}" for item in rest[0]), ""]
            elif rest[0].is_file():
                lines += [f"![{rest[1]}]({Path(os.path.relpath(rest[0], out_dir)).as_posix()})", ""]
            else:
                lines += [f"({rest[1]}: no plot at {rest[0]})", ""]
        return "\n".join(lines)

    def html(self, title):
        def inline(text):  # the little markdown the blocks use: `code` and **bold**
            text = html.escape(text)
            text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
            return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)

        body = []
        for kind, *rest in self.blocks:
            if kind == "h":
                body.append(f"<h{rest[0]}>{inline(rest[1])}</h{rest[0]}>")
            elif kind == "p":
                body.append(f"<p>{inline(rest[0])}</p>")
            elif kind == "table":
                head = "".join(f"<th>{inline(str(c))}</th>" for c in rest[0])
                rows = "".join("<tr>" + "".join(f"<td>{inline(f'{v:,}' if isinstance(v, int) else str(v))}</td>"
                                                for v in row) + "</tr>" for row in rest[1])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif kind == "list":
                body.append("<ul>" + "".join(f"<li>{inline(item)}</li>" for item in rest[0]) + "</ul>")
            elif rest[0].is_file():  # embedded, so the page opens anywhere, offline
                data = base64.b64encode(rest[0].read_bytes()).decode()
                body.append(f'<p><img alt="{html.escape(rest[1])}" src="data:image/png;base64,{data}"></p>')
            else:
                body.append(f"<p>({inline(rest[1])}: no plot at {html.escape(str(rest[0]))})</p>")
        style = ("body{font-family:sans-serif;max-width:62em;margin:2em auto;padding:0 1em;line-height:1.45}"
                 "table{border-collapse:collapse;margin:1em 0;font-size:90%}"
                 "td,th{border:1px solid #bbb;padding:.25em .6em;text-align:left}th{background:#eee}"
                 "code{background:#f3f3f3;padding:0 .2em}img{max-width:100%}")
        return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}'
                f"</title>\n<style>{style}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def epoch_table(page, history, majority):
    """Every epoch of a run and, under it, its best."""
    b = best(history)
    page.table(["epoch", "train loss", "train accuracy", "dev loss", "dev accuracy", "dev MCC", "seconds", ""],
               [[r["epoch"], f"{r.get('train_loss', float('nan')):.4f}", f"{r.get('train_acc', float('nan')):.4f}",
                 f"{r.get('dev_loss', float('nan')):.4f}", f"{r['dev_acc']:.4f}", f"{r['dev_mcc']:.4f}",
                 f"{r.get('train_seconds', float('nan')):.1f}", "best" if r is b else ""] for r in history])
    baseline = f"majority baseline accuracy {majority:.4f}, MCC 0" if majority is not None else "majority baseline " \
        "not recorded"
    page.p(f"Best epoch {b['epoch']} (by dev MCC): dev accuracy **{b['dev_acc']:.4f}**, MCC **{b['dev_mcc']:.4f}** "
           f"({baseline}). Training time {sum(r.get('train_seconds', 0) for r in history):.1f} s.")


def run_section(page, title, run_dir, plots, describe=None):
    """A run's heading, command, environment, what it is (describe(page, config, run_dir)), per-epoch table and
    plots; its problems said, never hidden. Returns inspect_run's triple."""
    config, history, problems = inspect_run(run_dir)
    page.h(3, title)
    page.p(f"Directory `{run_dir}`" + (f"; command: `{config['command']}`" if config and config.get("command")
                                       else "") + ".")
    env = (config or {}).get("environment")
    page.p("Environment: " + (", ".join(f"{k} {v}" for k, v in env.items()) if env else
                              "not recorded (this run predates the environment record)") + ".")
    for problem in problems:
        page.p(f"**Problem:** {problem}.")
    if config and describe:
        describe(page, config, Path(run_dir))
    config = config or {}
    if history:
        epoch_table(page, history, config.get("majority_acc"))
    prefix = config.get("plots") or plots
    for kind, alt in (("loss", "loss per epoch"), ("acc", "accuracy and MCC per epoch")):
        page.image(f"{prefix}_{kind}.png", f"{title}: {alt}")
    return config, history, problems


def size(n_bytes):
    return f"{n_bytes / 2**20:.1f} MB" if n_bytes >= 2**20 else f"{n_bytes / 1024:.1f} KB"


def describe_adapter(page, config, run_dir):
    """Base model, method, parameters (total, trainable, the reduction) and the adapter's size on disk."""
    adapter_config = run_dir / "adapter_config.json"
    settings = json.loads(adapter_config.read_text()) if adapter_config.is_file() else {}
    total, trainable = config["parameters"], config["trainable_parameters"]
    adapter = run_dir / "adapter_model.safetensors"
    kind = settings.get("peft_type", "?")
    detail = (f"r={settings.get('r')}, alpha={settings.get('lora_alpha')}, dropout={settings.get('lora_dropout')}"
              + (", DoRA" if settings.get("use_dora") else "")
              if kind == "LORA" else f"feed-forward: {' '.join(settings.get('feedforward_modules', [])) or 'none'}")
    page.table(["base model", "task", "method", "target modules", "parameters", "trainable", "trainable %",
                "adapter on disk", "full model (float32)"],
               [[f"{config.get('model')} ({config.get('model_type', 'gpt2')})", config.get("task", "?"),
                 f"{kind} {detail}", " ".join(settings.get("target_modules", [])), total, trainable,
                 f"{100 * trainable / total:.3f}% (a {100 * (1 - trainable / total):.2f}% reduction)",
                 size(adapter.stat().st_size) if adapter.is_file() else "missing", size(4 * total)]])


def describe_student(page, config, run_dir):
    s, teacher = config["student"], config.get("teacher")
    what = (config.get("kind") or "a transformer" if s.get("kind") == "transformer" else
            f"{'bi' if s.get('bidirectional') else ''}{s.get('rnn_type', '?').upper()} x{s.get('n_layers')}, "
            f"embeddings {s.get('emb_dim')}, hidden {s.get('hidden')}, {s.get('pool')} pooling")
    page.p(f"Student: {what}; "
           f"{config['parameters']:,} parameters" +
           (f"; teacher `{teacher['dir']}` ({teacher['parameters']:,} parameters, "
            f"{teacher['parameters'] / config['parameters']:.1f}x larger)" if teacher else "; no teacher") + ".")


def build_report(sr, models_dir, plots_dir):
    """(Page, problems) for every run of SR under models_dir; UserError when there is none."""
    models_dir, plots_dir = Path(models_dir), Path(plots_dir)
    lora_dir, sweep_dir = models_dir / f"LoRA_{sr}", models_dir / f"sweep_{sr}"
    student_dirs = {m: models_dir / f"{m}_{sr}" for m in ("distil", "rnn")}
    found = [d for d in (lora_dir, sweep_dir, *student_dirs.values()) if d.is_dir()] + student_kinds(models_dir, sr)
    if not found:
        raise UserError(f"no runs of SR {sr} in {models_dir}/ (looked for LoRA_{sr}, distil_{sr}, rnn_{sr} and "
                        f"sweep_{sr}): run `python run.py LoRA {sr}` (then distil and rnn) first, or pass "
                        f"--models-dir where the runs are.")
    page, problems, missing = Page(), [], []
    page.h(1, f"Report: SR {sr}")
    page.p(f"Written by `python run.py report {sr}` from the run files in `{models_dir}/` and the plots in "
           f"`{plots_dir}/`. Every figure is read from the runs' `metrics.jsonl` and `run_config.json`; "
           f"the best epoch of a run is the one with the highest dev MCC.")

    page.h(2, "Fine-tuning with adapters")
    if lora_dir.is_dir():
        problems += run_section(page, f"LoRA_{sr}", lora_dir, plots_dir / f"LoRA_{sr}", describe_adapter)[2]
    else:
        missing.append(f"LoRA: `python run.py LoRA {sr}` writes `{lora_dir}/`")
        page.p(f"Not run: `python run.py LoRA {sr}` writes `{lora_dir}/`.")

    page.h(2, "Distillation: teacher, KD students and scratch students")
    compared = comparison_rows(models_dir, sr)
    if compared:
        rows, runs = compared
        pair = first_pair(runs)
        page.p("Best epoch (by dev MCC) of each run; mean ± standard deviation over the seeds of `--seeds`; the "
               f"majority class scores accuracy {pair['distil'][0]['majority_acc']:.4f}, MCC 0.")
        page.table(*comparison_table(rows))
        damaged = [d for row in rows for d in row["dirs"] if d.is_dir() and inspect_run(d)[2]]  # gone: missing
        if damaged:
            page.p(f"**Note:** {', '.join(f'`{d}`' for d in damaged)}: missing or damaged files (see Missing and "
                   f"damaged below); the table shows the epochs that can be read.")
            problems += [problem for d in damaged for problem in inspect_run(d)[2]]
        page.image(plots_dir / f"compare_{sr}.png", "teacher vs KD students vs scratch students")
        for tag, p in runs.items():
            if None not in p.values() and architecture(p["distil"][0]) != architecture(p["rnn"][0]):
                page.p(f"**Note:** the two students{kind_label(tag)} differ in architecture; the comparison is not "
                       f"like for like.")
        page.h(3, "Speed/accuracy frontier")
        page.p("Fastest first: what each step down in size costs. Speeds as each run recorded them, on its machine.")
        page.table(*frontier_table(rows))
        page.image(plots_dir / f"frontier_{sr}.png", "dev MCC against inference speed")
    elif all(d.is_dir() for d in student_dirs.values()):
        page.p(f"No comparison: {' or '.join(f'`{d}`' for d in student_dirs.values())} has no readable "
               f"run_config.json or epoch (see Missing and damaged below).")
    kinds = student_kinds(models_dir, sr) or [""]
    for tag in kinds:
        for mode, make in (("distil", f"`python run.py distil {sr}` (after LoRA)"), ("rnn", f"`python run.py rnn {sr}`")):
            first_dir = models_dir / run_name(mode, sr, tag)
            first = inspect_run(first_dir)[0]
            seeds = first.get("seed_group", [sr]) if first else [sr]
            if not first_dir.is_dir():
                if not tag:
                    missing.append(f"{mode}: {make} writes `{first_dir}/`")
                    page.p(f"Not run: {make} writes `{first_dir}/`.")
                continue
            for seed in seeds:
                d = models_dir / run_name(mode, seed, tag)
                if not d.is_dir():
                    missing.append(f"{mode}{kind_label(tag)} seed {seed} of the `--seeds` group: `{d}/` is gone")
                    continue
                problems += run_section(page, d.name, d, plots_dir / d.name, describe_student)[2]

    if sweep_dir.is_dir():
        page.h(2, "Sweep")
        rows = []
        for d in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
            row = sweep_row(d.name, d)
            if row is None:
                problems += inspect_run(d)[2] or [f"{d} has not finished"]
            else:
                rows.append(row)
        if rows:
            page.p("Best epoch (by dev MCC) of each configuration.")
            page.table(*sweep_table(rows))
            page.image(plots_dir / f"sweep_{sr}.png", "dev accuracy per epoch, every configuration")
            for row in rows:
                problems += run_section(page, f"sweep_{sr}/{row['name']}", sweep_dir / row["name"],
                                        plots_dir / f"sweep_{sr}_{row['name']}", describe_adapter)[2]

    problems = list(dict.fromkeys(problems))  # a run's problem is said once, however many tables read it
    if missing or problems:
        page.h(2, "Missing and damaged")
        page.items(missing + problems)
    return page, problems, missing


def write_report(sr, models_dir="models", plots_dir="plots", out_dir="reports"):
    """reports/report_<SR>.md and .html, each written atomically; returns their paths and the problems."""
    page, problems, missing = build_report(sr, models_dir, plots_dir)
    out_dir = Path(out_dir)
    md, page_html = out_dir / f"report_{sr}.md", out_dir / f"report_{sr}.html"
    text, markup = page.markdown(out_dir), page.html(f"Report: SR {sr}")
    atomic_write(md, lambda tmp: Path(tmp).write_text(text))
    atomic_write(page_html, lambda tmp: Path(tmp).write_text(markup))
    return md, page_html, problems, missing


def report(args):
    """`run.py report SR`: the page written, with what is missing or damaged said on the terminal too."""
    check_writable([("--out-dir", args.out_dir)])
    md, page, problems, missing = write_report(args.SR, args.models_dir, args.plots_dir, args.out_dir)
    for line in missing:
        print(f"missing: {line.replace('`', '')}")
    for line in problems:
        print(f"warning: {line}")
    print(f"report: {md} and {page} (self-contained: open it in any browser)")
