"""Prediction: sentences classified by trained adapters over one base model (LoRA or IA3, ours or peft's,
swapped in one at a time and merged for base-speed inference; prompt or prefix tuning's virtual tokens put first) or by students of distil/rnn."""
import sys
from pathlib import Path

from backbones import load_any_tokenizer, load_classifier
from data import Examples
from machine import autocast_dtype, pick_device, seed_everything
from model import merge_adapters, remove_adapters
from prompts import remove_virtual_tokens
from train_utils import predict_logits
from utils import UserError, attach_adapter, is_student_dir, load_student, read_adapter, tokenizer_fingerprint


def predict(args):
    """`run.py predict`: every input line classified by every adapter (or the one its NAME<TAB> prefix
    names), one line of verdicts per input line, in input order."""
    seed_everything(args.SR)
    device = pick_device(args.device)
    amp = autocast_dtype(args.precision, device)
    specs = parse_adapters(args.adapter)
    students = {name: path for name, path in specs.items() if is_student_dir(path)}
    adapters = {name: read_adapter(path) for name, path in specs.items() if name not in students}
    base = load_base(adapters, args, device) if adapters else None
    jobs = read_jobs(args.input, specs)

    results = {}
    for name in specs:
        mine = [j for j in jobs if name in j[2]]
        if not mine:
            continue
        if name in students:
            clf, tok, extras, max_length = load_student_classifier(students[name], args.tokenizer, device)
        else:
            clf, tok, extras, max_length = swap_adapter(base, name, adapters[name], device)
        probs = classify(clf, tok, [j[1] for j in mine], max_length, name, device, args.batch_size, amp)
        labels = extras.get("labels") or [f"LABEL_{i}" for i in range(probs.shape[1])]
        for (lineno, sentence, _), p in zip(mine, probs):
            k = int(p.argmax())
            results.setdefault(lineno, []).append((name, labels[k], float(p[k])))
    many = len(specs) > 1
    for lineno, sentence, _ in jobs:
        verdicts = "  ".join(f"{name + ': ' if many else ''}{label} ({prob:.3f})" for name, label, prob in results[lineno])
        print(f"{verdicts}\t{sentence}")


def parse_adapters(specs):
    """{name: path} from --adapter [NAME=]PATH flags (a bare PATH is named after its directory)."""
    adapters = {}
    for i, spec in enumerate(specs):
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = (Path(spec).name or f"adapter{i + 1}"), spec
        if name in adapters:
            raise UserError(f"--adapter name {name!r} is given twice; name them NAME=PATH.")
        adapters[name] = path
    return adapters


def label_count(adapter):
    """The number of classes of an adapter (settings, tensors, extras): its labels, else its head's rows."""
    settings, tensors, extras = adapter
    if extras.get("labels"):
        return len(extras["labels"])
    return next((t.shape[0] for k, t in tensors.items() if k in ("score.weight", "classifier.weight")), 2)


def load_base(adapters, args, device):
    """The one base model the adapters share (--model, else the one they name), in eval mode, with what
    an adapter replaces besides its own layers (the head, the layer norms) kept to restore between adapters.
    Returns a dict: model, tok, info, base_state, num_labels."""
    bases = {a[2].get("model") or a[0].get("base_model_name_or_path") for a in adapters.values()}
    base = args.model or (bases.pop() if len(bases) == 1 and None not in bases else None)
    if base is None:
        raise UserError(f"the adapters name different (or no) base models ({sorted(map(str, bases))}): pass the "
                        f"one base model they share with --model.")
    first = next(iter(adapters.values()), ({}, {}, {}))  # none: serve's base, for adapters loaded later
    num_labels = label_count(first) if adapters else 2
    model, tok, info = load_classifier(base, num_labels, args.tokenizer or first[2].get("tokenizer"),
                                       args.gguf_file or first[2].get("gguf_file"))
    model.to(device).eval()
    own = set(info["head"]) | set(info["norms"])
    base_state = {k: v.clone() for k, v in model.state_dict().items() if own & set(k.split(".")[:-1])}
    return dict(model=model, tok=tok, info=info, base_state=base_state, num_labels=num_labels)


def swap_adapter(base, name, adapter, device):
    """The base model with adapter `name` in place of the last one (the base's own layer norms and head
    restored first), merged for base-speed inference. Returns (model, tokenizer, extras, max_length)."""
    settings, tensors, extras = adapter
    model, info = base["model"], base["info"]
    remove_adapters(model)
    remove_virtual_tokens(model)
    model.load_state_dict(base["base_state"], strict=False)
    if label_count(adapter) != base["num_labels"]:
        raise UserError(f"adapter {name} has {label_count(adapter)} labels, the others {base['num_labels']}; "
                        f"predict them in separate runs.")
    attach_adapter(model, settings, tensors, head_names=info["head"])
    model.to(device)
    merge_adapters(model)  # virtual tokens (prompt, prefix tuning) do not merge: they stay in front
    room = info["block_size"] - settings.get("num_virtual_tokens", 0)
    return model, base["tok"], extras, min(extras.get("max_length", 1024), room)


def load_student_classifier(path, tokenizer, device):
    """A student of distil/rnn and the tokenizer it was trained with (checked by fingerprint: another
    tokenizer's ids would mean other words). Returns (model, tokenizer, extras, max_length)."""
    clf, extras = load_student(path)
    tok = load_any_tokenizer(tokenizer or extras.get("tokenizer") or "gpt2",
                             None if tokenizer else extras.get("tokenizer_gguf"))
    if tokenizer_fingerprint(tok) != extras.get("tokenizer_fingerprint"):
        raise UserError(f"student {path} was trained with another tokenizer ({extras.get('tokenizer')}) than the one "
                        f"given here ({tokenizer or extras.get('tokenizer')}): its token ids would mean other words. "
                        f"Pass --tokenizer with the tokenizer it was trained with.")
    return clf.to(device), tok, extras, extras.get("max_length", 1024)


def read_jobs(input_path, names):
    """[(line number, sentence, [adapter names])] from --input (or standard input): a line 'NAME<TAB>text'
    goes to adapter NAME only, other non-empty lines to every adapter."""
    try:
        lines = (Path(input_path).read_text() if input_path else sys.stdin.read()).splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--input {input_path}: cannot read it as UTF-8 text ({e}); give a text file with one "
                        f"sentence per line.")
    jobs = []
    for lineno, line in enumerate(lines, 1):
        name, tab, rest = line.partition("\t")
        if tab and name in names:
            jobs.append((lineno, rest.strip(), [name]))
        elif line.strip():
            jobs.append((lineno, line.strip(), list(names)))
    if not jobs:
        raise UserError(f"no sentences to classify in {input_path or 'standard input'}: give one per line.")
    return jobs


def classify(clf, tok, sentences, max_length, name, device, batch_size, amp):
    """Class probabilities of each sentence, one row per sentence."""
    ex = Examples.encode(tok, sentences, [0] * len(sentences), max_length, name,
                         add_special_tokens=getattr(tok, "cls_token", None) is not None)
    return predict_logits(clf, ex, device, batch_size, amp, progress=False).softmax(-1)
