"""The command line: python run.py MODE SR [flags]. Each mode wires utils (files, data), model and
train_utils (the loop) together; run `python run.py MODE --help` for its flags."""
import argparse
import math
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


def add_common(p):
    p.add_argument("SR", type=seed_arg, help="integer seed (e.g. a 5-digit student number); same SR, same numbers")
    p.add_argument("--model", default="gpt2", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, a hub id, "
                   "or a local directory in Hugging Face format (default: gpt2)")
    p.add_argument("--tokenizer", help="directory (or name) of the GPT-2 tokenizer files; default: the model's")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision; auto = bf16 on CUDA, fp32 elsewhere")


def build_parser():
    parser = argparse.ArgumentParser(prog="run.py", description="Parameter-efficient fine-tuning and knowledge "
                                     "distillation of GPT-2.")
    sub = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    fmt = dict(formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    p = sub.add_parser("gen", help="generate text with the hand-written GPT-2", **fmt)
    add_common(p)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=positive(int), default=100)
    p.add_argument("--temperature", type=non_negative, default=0.8, help="0 = greedy decoding")
    p.add_argument("--top-k", type=positive(int), default=50)
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, e.g. 0.95 (default: off)")
    p.add_argument("--num-samples", type=positive(int), default=1)
    p.add_argument("--adapter", help="generate with this LoRA/IA3 adapter (ours or peft's) merged in; the base "
                   "model defaults to the one the adapter was trained on")
    p.set_defaults(model=None)

    p = sub.add_parser("LoRA", help="fine-tune GPT-2 with LoRA (or IA3) adapters on CoLA", **fmt)
    add_common(p)
    p.add_argument("--data-dir", default=os.environ.get("COLA_DIR", "data/cola"),
                   help="directory with CoLA's raw in_domain_train.tsv and in_domain_dev.tsv (default: $COLA_DIR "
                   "or data/cola; if absent, the hub's GLUE copy is tried)")
    p.add_argument("--eval-split", default="in_domain", choices=["in_domain", "out_of_domain", "both"])
    p.add_argument("--max-length", type=positive(int), default=128, help="truncate longer sentences (counted)")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed data rows instead of stopping")
    p.add_argument("--limit-train", type=positive(int), help="use only the first N training sentences (quick runs)")
    p.add_argument("--peft", default="lora", choices=["lora", "ia3"])
    p.add_argument("--lora-rank", type=positive(int), default=4)
    p.add_argument("--lora-alpha", type=float, help="default: equal to the rank (scaling 1)")
    p.add_argument("--lora-dropout", type=fraction, default=0.1)
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--target-modules", nargs="+", help="linear layers to adapt, by name suffix (default: LoRA: "
                   "attn.c_attn attn.c_proj mlp.c_fc mlp.c_proj; IA3: attn.c_attn mlp.c_proj)")
    p.add_argument("--feedforward-modules", nargs="+", help="IA3 only: targets whose input, not output, is "
                   "scaled (default: mlp.c_proj)")
    p.add_argument("--no-train-layernorm", action="store_true", help="freeze the layer norms too")
    p.add_argument("--epochs", type=positive(int), default=5)
    p.add_argument("--lr", type=positive(float), default=1e-3)
    p.add_argument("--batch-size", type=positive(int), default=32)
    p.add_argument("--weight-decay", type=non_negative, default=0.01)
    p.add_argument("--warmup-ratio", type=fraction, default=0.06)
    p.add_argument("--grad-clip", type=positive(float), default=1.0)
    p.add_argument("--out-dir", help="where the adapter, metrics and resume checkpoint go (default: models/LoRA_<SR>)")
    p.add_argument("--plots-dir", default="plots")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")
    p.add_argument("--export-peft", metavar="DIR", help="also copy the best adapter, in peft's format, to DIR")

    p = sub.add_parser("predict", help="classify sentences with one or more trained adapters over one base model",
                       **fmt)
    add_common(p)
    p.set_defaults(model=None)
    p.add_argument("--adapter", action="append", required=True, metavar="[NAME=]PATH",
                   help="adapter directory; repeat with NAME=PATH for several adapters over one base model")
    p.add_argument("--input", help="file with one sentence per line (default: standard input). A line "
                   "'NAME<TAB>sentence' goes to adapter NAME only; other lines go to every adapter")
    p.add_argument("--batch-size", type=positive(int), default=64)

    for mode, text in (("distil", "distil the fine-tuned GPT-2 into a small RNN"),
                       ("rnn", "train the same RNN from scratch")):
        p = sub.add_parser(mode, help=text + " (not yet implemented)")
        p.add_argument("SR", type=seed_arg)
        p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def print_config(args):
    print("configuration: " + ", ".join(f"{k}={v}" for k, v in vars(args).items() if k != "rest"), flush=True)


# --------------------------------------------------------------------------- gen

def cmd_gen(args):
    import torch
    from model import merge_adapters
    from utils import UserError, attach_adapter, autocast_dtype, load_gpt, load_tokenizer, pick_device, \
        read_adapter, seed_everything

    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}.")
    seed_everything(args.SR)
    device = pick_device(args.device)
    extras = {}
    if args.adapter:
        settings, tensors, extras = read_adapter(args.adapter)
    model_name = args.model or extras.get("model") or "gpt2"
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
    gen = torch.Generator(device=device).manual_seed(args.SR)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"\n----- sample {i + 1} of {args.num_samples} -----")
        print(args.prompt, end="", flush=True)
        new, shown = [], ""
        with torch.autocast(device.type, dtype=amp) if amp else torch.no_grad():
            for nxt in model.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                      top_p=args.top_p, generator=gen, eos_token_id=tok.eos_token_id):
                new.append(int(nxt[0]))
                text = tok.decode(new)
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    print(text[len(shown):], end="", flush=True)
                    shown = text
        print(flush=True)


# --------------------------------------------------------------------------- LoRA

def cmd_lora(args):
    from model import GPT2_TARGETS, GPTClassifier, inject_adapters, mark_trainable
    from train_utils import TrainConfig, fit, write_plots
    from utils import Examples, UserError, adapter_settings, atomic_write, autocast_dtype, load_cola, load_gpt, \
        load_tokenizer, pick_device, save_adapter, seed_everything

    if args.peft == "ia3" and (args.rslora or args.lora_alpha is not None):
        raise UserError("--lora-alpha and --rslora apply to --peft lora only; IA3 has no rank or scaling.")
    seed_everything(args.SR)
    device = pick_device(args.device)
    amp = autocast_dtype(args.precision, device)
    out_dir = Path(args.out_dir or f"models/LoRA_{args.SR}")
    alpha = args.lora_alpha if args.lora_alpha is not None else float(args.lora_rank)
    targets = args.target_modules or (list(GPT2_TARGETS) if args.peft == "lora" else ["attn.c_attn", "mlp.c_proj"])
    feedforward = args.feedforward_modules or (["mlp.c_proj"] if args.peft == "ia3" else [])
    print_config(args)
    for flag, d in (("--out-dir", out_dir), ("--plots-dir", args.plots_dir), ("--export-peft", args.export_peft)):
        if d is None:
            continue
        # A bad output path must fail now, not after an hour of training (and without creating anything).
        existing = Path(d).resolve()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise UserError(f"{flag} {d}: cannot write a directory there ({existing} is "
                            f"{'not a directory' if not existing.is_dir() else 'not writable'}); choose another path.")

    data = load_cola(args.data_dir, args.eval_split, args.skip_bad_rows)
    tok = load_tokenizer(args.tokenizer or args.model)
    train_s, train_l = data["train"]
    if args.limit_train:
        train_s, train_l = train_s[:args.limit_train], train_l[:args.limit_train]
    train = Examples.encode(tok, train_s, train_l, args.max_length, "train")
    dev = Examples.encode(tok, *data["dev"], args.max_length, f"dev ({args.eval_split})")
    majority = max(dev.labels.float().mean().item(), 1 - dev.labels.float().mean().item())
    print(f"CoLA: {len(train)} training and {len(dev)} dev sentences ({args.eval_split}); majority-class "
          f"baseline on dev: accuracy {majority:.4f}, MCC 0.0000")

    model = load_gpt(args.model, cls=GPTClassifier, num_labels=2)
    if args.max_length > model.config.block_size:
        raise UserError(f"--max-length {args.max_length} is longer than {args.model}'s block size "
                        f"{model.config.block_size}; use at most that.")
    total = sum(p.numel() for p in model.parameters())
    try:
        inject_adapters(model, args.peft, targets, feedforward, r=args.lora_rank, alpha=alpha,
                        dropout=args.lora_dropout, rslora=args.rslora)
    except ValueError as e:  # no layer matches --target-modules: the user's to fix, not a crash
        raise UserError(f"--target-modules {' '.join(targets)}: {e}. Name layers by suffix, e.g. attn.c_attn.")
    mark_trainable(model, train_layernorm=not args.no_train_layernorm)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"parameters: {total:,} in {args.model}; trainable with {args.peft.upper()}: {trainable:,} "
          f"({100 * trainable / total:.3f}% of the model, a {100 * (1 - trainable / total):.2f}% reduction)")
    model.to(device)

    layernorms = [] if args.no_train_layernorm else ["ln_1", "ln_2", "ln_f"]
    settings = adapter_settings(args.peft, args.lora_rank, alpha, args.lora_dropout, args.rslora, targets,
                                feedforward, modules_to_save=["score", *layernorms])
    settings["base_model_name_or_path"] = str(args.model)
    extras = {"model": str(args.model), "tokenizer": str(args.tokenizer or args.model), "labels": COLA_LABELS,
              "task": "cola", "seed": args.SR, "max_length": args.max_length}
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay,
                      warmup_ratio=args.warmup_ratio, grad_clip=args.grad_clip, seed=args.SR)
    title = (f"LoRA SR={args.SR}: {args.model}, {args.peft} r={args.lora_rank} alpha={alpha:g}, lr={args.lr:g}, "
             f"batch={args.batch_size}" if args.peft == "lora" else
             f"IA3 SR={args.SR}: {args.model}, lr={args.lr:g}, batch={args.batch_size}")
    prefix = Path(args.plots_dir) / f"LoRA_{args.SR}"

    def on_best(model, row):
        path = save_adapter(model, out_dir, settings, {**extras, "best": row})
        print(f"  new best dev MCC {row['dev_mcc']:.4f}: adapter saved to {out_dir}/ "
              f"({path.stat().st_size / 1024:.1f} KB; the full model in float32 is {4 * total / 2**20:.1f} MB)")

    t0 = time.time()
    run_settings = {**settings, **extras, "eval_split": args.eval_split, "train_layernorm": not args.no_train_layernorm}
    history = fit(model, train, dev, cfg, device, out_dir, amp_dtype=amp, resume=args.resume, on_best=on_best,
                  on_epoch_end=lambda h: write_plots(h, prefix, title, baseline_acc=majority),
                  run_settings=run_settings)
    best = max(history, key=lambda r: r["dev_mcc"])
    print(f"done in {time.time() - t0:.0f} s. Best epoch {best['epoch']}: dev accuracy {best['dev_acc']:.4f}, "
          f"MCC {best['dev_mcc']:.4f} (majority baseline {majority:.4f}, MCC 0). Adapter: {out_dir}/; plots: "
          f"{prefix}_loss.png, {prefix}_acc.png; metrics: {out_dir}/metrics.jsonl")
    if args.export_peft:
        import shutil
        export = Path(args.export_peft)
        if export.resolve() != out_dir.resolve():
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                atomic_write(export / name, lambda tmp: shutil.copyfile(out_dir / name, tmp))
        print(f"peft adapter written to {args.export_peft} (load with peft.PeftModel.from_pretrained)")


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
    import torch
    from model import GPTClassifier, merge_adapters, remove_adapters
    from utils import Examples, UserError, attach_adapter, load_gpt, load_tokenizer, pick_device, read_adapter, \
        seed_everything

    seed_everything(args.SR)
    device = pick_device(args.device)
    adapters = {name: read_adapter(path) for name, path in parse_adapters(args.adapter).items()}
    bases = {a[2].get("model") or a[0].get("base_model_name_or_path") for a in adapters.values()}
    base = args.model or (bases.pop() if len(bases) == 1 and None not in bases else None)
    if base is None:
        raise UserError(f"the adapters name different (or no) base models ({sorted(map(str, bases))}): pass the one "
                        f"base model they share with --model.")
    first = next(iter(adapters.values()))
    tok = load_tokenizer(args.tokenizer or first[2].get("tokenizer") or base)
    num_labels = first[1]["score.weight"].shape[0] if "score.weight" in first[1] else 2
    model = load_gpt(base, cls=GPTClassifier, num_labels=num_labels).to(device).eval()
    base_state = {k: v.clone() for k, v in model.state_dict().items() if ".ln_" in k or k.startswith("score.")}

    try:
        lines = (Path(args.input).read_text() if args.input else sys.stdin.read()).splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--input {args.input}: cannot read it as UTF-8 text ({e}); give a text file with one "
                        f"sentence per line.")
    jobs = []  # (line number, sentence, adapter names)
    for lineno, line in enumerate(lines, 1):
        name, tab, rest = line.partition("\t")
        if tab and name in adapters:
            jobs.append((lineno, rest.strip(), [name]))
        elif line.strip():
            jobs.append((lineno, line.strip(), list(adapters)))
    if not jobs:
        raise UserError(f"no sentences to classify in {args.input or 'standard input'}: give one per line.")

    results = {}
    for name, (settings, tensors, extras) in adapters.items():
        mine = [j for j in jobs if name in j[2]]
        if not mine:
            continue
        # Swap adapters over the one base model: take the last one out, restore the base's own layer
        # norms and head, put this one in and merge it for base-speed inference.
        remove_adapters(model)
        model.load_state_dict(base_state, strict=False)
        if tensors.get("score.weight") is not None and tensors["score.weight"].shape[0] != model.score.out_features:
            raise UserError(f"adapter {name} has {tensors['score.weight'].shape[0]} labels, the others "
                            f"{model.score.out_features}; predict them in separate runs.")
        attach_adapter(model, settings, tensors)
        model.to(device)
        merge_adapters(model)
        labels = extras.get("labels") or [f"LABEL_{i}" for i in range(num_labels)]
        max_length = min(extras.get("max_length", 1024), model.config.block_size)
        ex = Examples.encode(tok, [j[1] for j in mine], [0] * len(mine), max_length, name)
        probs = []
        with torch.no_grad():
            for batch in ex.batches(args.batch_size):
                logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
                probs.append(logits.float().softmax(-1).cpu())
        for (lineno, sentence, _), p in zip(mine, torch.cat(probs)):
            k = int(p.argmax())
            results.setdefault(lineno, []).append((name, labels[k], float(p[k])))
    many = len(adapters) > 1
    for lineno, sentence, _ in jobs:
        verdicts = "  ".join(f"{name + ': ' if many else ''}{label} ({prob:.3f})" for name, label, prob in results[lineno])
        print(f"{verdicts}\t{sentence}")


# --------------------------------------------------------------------------- main

def main(argv=None):
    args = build_parser().parse_args(argv)
    from utils import UserError
    commands = {"gen": cmd_gen, "LoRA": cmd_lora, "predict": cmd_predict}
    if args.mode not in commands:
        print(f"run.py {args.mode}: not yet implemented (it comes with a later issue).", file=sys.stderr)
        return 2
    try:
        commands[args.mode](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted. Files on disk are complete (written atomically); `run.py LoRA SR --resume` with the "
              "same flags continues a training run from its last finished epoch.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
