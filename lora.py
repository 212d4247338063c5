"""Fine-tuning with adapters: the LoRA mode. The task's data, a backbone with a classification head,
LoRA, DoRA or IA3 adapters injected into its linear layers (or prompt / prefix tuning's virtual tokens put
before every sentence, prompts.py), training, and the best adapter saved (in peft's format, so peft loads
it too)."""
import shutil
from pathlib import Path

from backbones import load_classifier
from data import encode_task, task_data
from machine import autocast_dtype, environment, is_main, pick_device, seed_everything
from model import inject_adapters, mark_trainable
from prompts import DEFAULT_TOKENS, add_virtual_tokens, check_fits, model_dims, prompt_settings, text_init
from train_utils import print_config, train_run
from utils import RunLock, UserError, adapter_settings, atomic_write, check_writable, save_adapter


def train_lora(args):
    """`run.py LoRA` (and each configuration of a sweep): one adapter trained on one task."""
    if args.peft == "ia3" and (args.rslora or args.lora_alpha is not None):
        raise UserError("--lora-alpha and --rslora apply to --peft lora and dora only; IA3 has no rank or scaling.")
    check_virtual_flags(args)
    if args.peft != "ia3" and args.feedforward_modules is not None:
        raise UserError(f"--feedforward-modules applies to --peft ia3 only (the layers whose input IA3 scales); "
                        f"{dict(lora='LoRA', dora='DoRA')[args.peft]} adapts every --target-modules layer "
                        f"the same way. Drop --feedforward-modules, or use --peft ia3.")
    virtual = args.peft in ("prompt", "prefix")
    n_virtual = (args.num_virtual_tokens or DEFAULT_TOKENS) if virtual else 0
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
    room = info["block_size"] - n_virtual  # the virtual tokens take positions of the block too
    if room < 1:
        raise UserError(f"--num-virtual-tokens {n_virtual} leaves no room for a sentence in {args.model}'s block size "
                        f"{info['block_size']}; use fewer virtual tokens.")
    if args.max_length is None:
        args.max_length = min(128, room)
    elif args.max_length > room:
        raise UserError(f"--max-length {args.max_length} is longer than {args.model}'s block size "
                        f"{info['block_size']}" + (f" less the {n_virtual} virtual tokens" if virtual else "")
                        + f"; use at most {room}.")
    encode_task(task, tok, args.max_length, info["add_special_tokens"])

    total = sum(p.numel() for p in model.parameters())
    heads, hidden = info["head"], None
    if virtual:
        check_fits(model, args.peft)
        hidden = (args.encoder_hidden_size or model_dims(model, "prefix")[0]) if args.prefix_projection else None
        init = text_init(model, tok, args.prompt_init, n_virtual) if args.prompt_init else None
        add_virtual_tokens(model, args.peft, n_virtual, hidden, init)
        heads = [*heads, "prompt_encoder"]
    else:
        targets, feedforward = adapter_targets(args, info)
        try:
            inject_adapters(model, args.peft, targets, feedforward, r=args.lora_rank, alpha=alpha,
                            dropout=args.lora_dropout, rslora=args.rslora)
        except ValueError as e:  # no layer matches --target-modules: the user's to fix, not a crash
            raise UserError(f"--target-modules {' '.join(targets)}: {e}. Name layers by suffix, e.g. "
                            f"{' '.join(info['lora_targets'] or ['q_proj', 'v_proj'])}.")
    mark_trainable(model, train_layernorm=not args.no_train_layernorm, head_names=heads)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"parameters: {total:,} in {args.model}; trainable with {args.peft.upper()}: {trainable:,} "
          f"({100 * trainable / total:.3f}% of the model, a {100 * (1 - trainable / total):.2f}% reduction)")
    model.to(device)

    norms = [] if args.no_train_layernorm else info["norms"]
    if virtual:
        settings = prompt_settings(args.peft, n_virtual, model_dims(model, args.peft), [*info["head"], *norms],
                                   args.prompt_init, args.tokenizer or args.model, hidden)
    else:
        settings = adapter_settings(args.peft, args.lora_rank, alpha, args.lora_dropout, args.rslora, targets,
                                    feedforward, modules_to_save=[*info["head"], *norms],
                                    fan_in_fan_out=info["fan_in_fan_out"])
    settings["base_model_name_or_path"] = str(args.model)
    extras = {"model": str(args.model), "gguf_file": args.gguf_file, "model_type": info["model_type"],
              "tokenizer": str(args.tokenizer or args.model), "labels": task.labels, "task": task.name,
              "seed": args.SR, "max_length": args.max_length, "parameters": total, "trainable_parameters": trainable,
              "majority_acc": task.majority, "command": args.command, "environment": environment(device, amp),
              "plots": str(Path(args.plots_dir) / run_name)}
    name = Path(str(args.model)).name
    title = (f"LoRA SR={args.SR}: {name}, {args.peft} r={args.lora_rank} alpha={alpha:g}, lr={args.lr:g}, "
             f"batch={args.batch_size}" if args.peft in ("lora", "dora") else
             f"{args.peft} tuning SR={args.SR}: {name}, {n_virtual} virtual tokens, lr={args.lr:g}, "
             f"batch={args.batch_size}" if virtual else
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
        train_run(args, run_name, model, task.train, task.dev, task.majority, out_dir, save_best,
                  run_settings, title, device, amp)
        if args.export_peft and is_main():
            export_peft(out_dir, args.export_peft)


# The flags of virtual tokens, and the methods each applies to; the flags of adapters in layers, which they lack.
VIRTUAL_FLAGS = {"num_virtual_tokens": ("prompt", "prefix"), "prompt_init": ("prompt",),
                 "prefix_projection": ("prefix",), "encoder_hidden_size": ("prefix",)}
LAYER_FLAGS = ("lora_alpha", "rslora", "target_modules", "feedforward_modules")


def check_virtual_flags(args):
    """A flag of one method given with another is a mistake, refused before anything loads."""
    given = [f for f in (*VIRTUAL_FLAGS, *LAYER_FLAGS) if getattr(args, f, None) not in (None, False)]
    wrong = [f for f in given if args.peft not in VIRTUAL_FLAGS.get(f, ("lora", "dora", "ia3"))]
    if wrong:
        flags = ", ".join("--" + f.replace("_", "-") for f in wrong)
        raise UserError(f"{flags} {'does' if len(wrong) == 1 else 'do'} not apply to --peft {args.peft}: "
                        f"--num-virtual-tokens is for --peft prompt and prefix, --prompt-init for prompt, "
                        f"--prefix-projection and --encoder-hidden-size for prefix, and --lora-alpha, --rslora, "
                        f"--target-modules and --feedforward-modules for the adapters of layers (lora, dora, ia3).")
    if args.peft == "prefix" and args.encoder_hidden_size and not args.prefix_projection:
        raise UserError("--encoder-hidden-size is the width of --prefix-projection's MLP: add --prefix-projection, "
                        "or leave it out.")


def adapter_targets(args, info):
    """(target layers, IA3 feed-forward layers): the flags', else the model family's defaults (GPT-2: all
    four linears for LoRA and DoRA)."""
    defaults = info["ia3_targets"] if args.peft == "ia3" else info["lora_targets"]  # DoRA's are LoRA's
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
    return targets, feedforward


def export_peft(out_dir, export):
    """--export-peft: the best adapter's two peft files, copied."""
    if Path(export).resolve() != out_dir.resolve():
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            atomic_write(Path(export) / name, lambda tmp: shutil.copyfile(out_dir / name, tmp))
    print(f"peft adapter written to {export} (load with peft.PeftModel.from_pretrained)")
