"""Knowledge distillation: the LoRA-tuned model (the teacher) teaches a small student with its soft targets
(distil), beside the same student trained on the labels alone (rnn); then the teacher and the students
compared on one speed/accuracy frontier. The student is the course's recurrent one (DistilRNN) or, with
--student transformer, K of the teacher's own layers (student.py). Read top to bottom: the teacher, then the
students' steps."""
import copy
import dataclasses
import functools
import hashlib
import json
import time
from pathlib import Path

import torch

from backbones import load_any_tokenizer, load_classifier, load_language_model, weight_files
from data import IGNORE, Examples, augment, encode_task, lm_prompts, lm_sentence, task_data
from flags import named_layers
from generate import sample_seed
from machine import autocast_dtype, broadcast_object, cpu_has_bf16, environment, is_main, pick_device, seed_everything
from model import GPT, DistilRNN, RNNConfig, adapter_modules, merge_adapters, pca_embeddings, sample_next
from report import architecture, comparison_rows, first_pair, kind_label, run_name
from student import HiddenTargets, TransformerStudent, hidden_loss, layer_list, pick_layers, unload_adapters
from train_utils import (classification_metrics, kd_loss, local_logits, predict_logits, print_config,
                         train_run, write_comparison, write_frontier)
from utils import (RunLock, UserError, attach_adapter, cache_key, cache_path, check_writable, read_adapter,
                   read_cached_logits, save_student, sha256_files, tokenizer_fingerprint, write_cached_logits,
                   write_json)


# --------------------------------------------------------------------------- the teacher

class Teacher:
    """The LoRA-tuned GPT-2 of `run.py LoRA <SR>` as the teacher of distillation. Its files are checked
    at once; the model itself is loaded (adapter merged, eval mode, no gradients) only when logits are
    missing from the cache, so a second distil run never runs it."""

    def __init__(self, args, device, amp):
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
        self.block_size -= self.settings.get("num_virtual_tokens", 0)  # prompt or prefix tuning's, before the input
        # What decides the logits besides the sentences: base weights, adapter, precision.
        self.id = sha256_files([*weight_files(self.base, self.gguf), self.dir / "adapter_config.json",
                                self.dir / "adapter_model.safetensors"])
        self.id += f"|{amp}"
        self.device, self.amp, self.model, self.parameters = device, amp, None, None
        self.batch_size = getattr(args, "teacher_batch_size", 64)

    def load(self):
        if self.model is None:
            model, _, info = load_classifier(self.base, self.num_labels, self.tokenizer, self.gguf)
            try:
                attach_adapter(model, self.settings, self.tensors, head_names=info["head"])
            except UserError as e:
                raise UserError(f"the teacher {self.dir} does not fit the base model {self.base}: {e} {self.make}.")
            merge_adapters(model)  # inference at the base model's speed
            self.parameters = self.parameters_of(model)
            self.model = self.cast(model.to(self.device).eval().requires_grad_(False))
        return self.model

    @staticmethod
    def parameters_of(model):
        """The merged model's size: the adapters' own factors (not their base layers) are folded in."""
        return sum(p.numel() for p in model.parameters()) - sum(
            p.numel() for m in adapter_modules(model) for p in m.parameters(recurse=False))

    def cast(self, model):
        """In half precision, the whole model in that dtype: autocast would cast every weight again at every
        forward (measured on a SmolLM2 teacher here: fp32 4.3, autocast bf16 5.5, the model in bf16 8.0
        sentences/s)."""
        return model.to(self.amp) if self.amp is not None else model

    def language_model(self):
        """The base model as a language model (the teacher's adapter plays no part), for --transfer-lm."""
        lm = load_language_model(self.base, self.gguf)
        return self.cast(lm.to(self.device).eval().requires_grad_(False))

    def logits(self, examples, name, cache_dir):
        """The teacher's logits for `examples`: from the cache, or computed once and cached."""
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
        t0 = time.time()  # under torchrun each rank computes its share of the batches (predict_logits)
        logits = logits_by_length(model, examples, self.device, self.batch_size, None, desc=f"teacher: {name}")
        assert bool(torch.isfinite(logits).all()), "the teacher's logits are not finite"
        seconds = time.time() - t0
        info = {"teacher": str(self.dir), "base": str(self.base), "parameters": self.parameters,
                "sentences_per_s": len(examples) / seconds}
        path = write_cached_logits(cache_dir, key, logits, info) if is_main() else cache_path(cache_dir, key)
        print(f"teacher logits for {name} ({len(examples)} sentences): computed in {seconds:.1f} s "
              f"({info['sentences_per_s']:.0f} sentences/s) and cached in {path}")
        return logits, info


def logits_by_length(model, examples, device, batch_size, amp, desc="teacher", progress=True, local=False):
    """predict_logits over the examples sorted by length, in the examples' order: batches of sentences of one
    length, so that a transformers backbone computes (almost) no padding. local: this process alone
    (local_logits), not shared among torchrun's processes."""
    order = sorted(range(len(examples)), key=lambda i: len(examples.ids[i]))
    by_length = (local_logits if local else predict_logits)(model, examples.subset(order), device, batch_size, amp,
                                                            desc=desc, progress=progress)
    logits = torch.empty_like(by_length)
    logits[order] = by_length
    return logits


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
    model = teacher.load()
    wte = (model.hf.get_input_embeddings() if hasattr(model, "hf") else model.transformer.wte).weight.detach().cpu()
    if wte.shape[0] < vocab_size or emb_dim > wte.shape[1]:
        raise UserError(f"--init-embeddings-from-teacher: {teacher.base} has no token embedding of at least "
                        f"{vocab_size} rows and {emb_dim} columns; drop the flag or use --emb-dim <= the teacher's "
                        f"width ({wte.shape[1]}).")
    return pca_embeddings(wte[:vocab_size].float(), emb_dim)


# --------------------------------------------------------------------------- the students

def train_students(args):
    """distil and rnn: the same student, data, seeds, optimiser and schedule; distil adds the teacher's
    soft targets (and, with --augment or --transfer-lm, a transfer set that only the teacher labels; with
    --kd-hidden, its hidden states). A transformer student needs the teacher in rnn mode too: its layers
    are where the student starts."""
    distil = args.mode == "distil"
    seeds = check_student_flags(args, distil)
    device = pick_device(args.device)
    amp = autocast_dtype(args.precision, device)
    models_dir = Path(args.models_dir)
    cache_dir = Path(args.cache_dir or models_dir / "teacher_cache") if distil else None
    print_config(args)
    check_writable([("--models-dir", models_dir), ("--plots-dir", args.plots_dir), ("--cache-dir", cache_dir)])
    transformer = args.student == "transformer"
    teacher = Teacher(args, device, teacher_precision(args, device, amp)) if distil or transformer else None
    task, tok, tok_name, tok_gguf = student_data(args, teacher)
    # A transformer student's source is loaded (and --student-layers checked) before the teacher runs.
    make = transformer_maker(args, teacher, distil) if transformer else None
    teacher_info = teacher_targets(teacher, task, cache_dir) if distil else None
    make = make or rnn_maker(args, tok, task, teacher, distil)
    hidden = make.hidden_targets if distil and args.kd_hidden else None
    if hidden is not None:
        hidden.net.to(device)
    extras = {"mode": args.mode, "seed_group": seeds, "tokenizer": str(tok_name), "tokenizer_gguf": tok_gguf,
              "tokenizer_fingerprint": tokenizer_fingerprint(tok), "labels": task.labels, "task": task.name,
              "max_length": args.max_length, "eval_split": args.eval_split, "majority_acc": task.majority,
              "teacher": teacher_info, "command": args.command, "environment": environment(device, amp)}
    transfer = distil and (args.augment or args.transfer_lm)
    # --shared-transfer: one transfer set (seeded by SR) for every seed, so the teacher labels it once.
    shared = transfer_set(args, task, tok, teacher, args.SR, cache_dir) if transfer and args.shared_transfer else None
    for seed in seeds:
        train_set = shared or (transfer_set(args, task, tok, teacher, seed, cache_dir) if transfer else task.train)
        train_student(args, seed, make, hidden, train_set, task, teacher, extras, device, amp)
    if is_main():
        write_compare(args, models_dir)


# Each student's own defaults for the flags left unset (a transformer of pretrained layers wants a learning
# rate of fine-tuning and few epochs; the RNN from scratch, a larger rate and more epochs).
STUDENT_DEFAULTS = {"rnn": {"lr": 2e-3, "epochs": 10}, "transformer": {"lr": 5e-5, "epochs": 2, "student_layers": 6}}


def rnn_maker(args, tok, task, teacher, distil):
    """make(kept) -> (a new DistilRNN, its description): the RNN of the flags (kept: the token ids of
    --student-vocab data, else None)."""
    rnn_config = RNNConfig(vocab_size=len(tok), num_labels=len(task.labels), rnn_type=args.rnn_type,
                           emb_dim=args.emb_dim, hidden=args.hidden, n_layers=args.rnn_layers,
                           bidirectional=args.bidirectional, pool=args.pool, dropout=args.dropout)
    embeddings = (teacher_embeddings(teacher, len(tok), args.emb_dim)
                  if distil and args.init_embeddings_from_teacher else None)

    def make(kept):
        config = rnn_config if kept is None else dataclasses.replace(rnn_config, rows=len(kept) + 1)
        student = DistilRNN(config)
        if kept is not None:
            student.keep_tokens(kept)
        if embeddings is not None:
            with torch.no_grad():
                if kept is None:
                    student.embed.weight.copy_(embeddings)
                else:
                    student.embed.weight[1:].copy_(embeddings[kept])
        kind = (f"{'bi' if args.bidirectional else ''}{args.rnn_type.upper()} x{args.rnn_layers}, emb {args.emb_dim}, "
                f"hidden {args.hidden}, {args.pool} pool"
                + (f", vocabulary of the data: {len(kept):,} of {rnn_config.vocab_size:,} tokens" if kept else ""))
        return student, kind
    return make


def transformer_maker(args, teacher, distil):
    """make(kept) -> (a new TransformerStudent, its description): --student-layers of the teacher's layers
    (--student-init) from its base or from the teacher itself (--student-from). The teacher's model is
    loaded once, in float32 (the student trains in the run's precision), whatever the teacher's own
    inference precision. make.hidden_targets: the teacher's hidden states at the student's layers, for
    --kd-hidden (built only then)."""
    base, _, info = load_classifier(teacher.base, teacher.num_labels, teacher.tokenizer, teacher.gguf)
    n = len(layer_list(base))
    if args.student_layers > n:
        raise UserError(f"--student-layers {args.student_layers}: the teacher's model {teacher.base} has {n} layers; "
                        f"a student takes at most that many (fewer, to be smaller and faster: 2 to {max(1, n // 4)} "
                        f"is a quarter or less).")
    layers = pick_layers(n, args.student_layers, args.student_init)
    merged = None
    if args.student_from == "teacher" or (distil and args.kd_hidden):
        if teacher.settings["kind"] in ("prompt", "prefix"):  # its virtual tokens are in no layer to copy or match
            raise UserError(f"the teacher {teacher.dir} is {teacher.settings['kind']} tuning, whose virtual tokens no "
                            f"layer holds: a transformer student starts from its base (--student-from base) and "
                            f"learns its logits, without --kd-hidden.")
        merged = copy.deepcopy(base) if args.student_from == "base" else base
        try:
            attach_adapter(merged, teacher.settings, teacher.tensors, head_names=info["head"])
        except UserError as e:
            raise UserError(f"the teacher {teacher.dir} does not fit the base model {teacher.base}: {e} {teacher.make}.")
        unload_adapters(merged)
    source = merged if args.student_from == "teacher" else base

    def make(kept):
        student = TransformerStudent.from_model(source, layers, args.student_init, args.student_from, kept)
        if args.student_from == "base":  # a new head, drawn from the seed (as DistilBERT's and BERT-PKD's)
            for name in info["head"]:
                for m in student.net.get_submodule(name).modules():
                    if isinstance(m, torch.nn.Linear):
                        torch.nn.init.normal_(m.weight, std=0.02)
                        if m.bias is not None:
                            torch.nn.init.zeros_(m.bias)
        return student, student.describe()
    make.hidden_targets = HiddenTargets(merged, layers) if merged is not None and distil and args.kd_hidden else None
    return make


def check_student_flags(args, distil):
    """The seeds of --seeds, once the flags argparse cannot check alone are checked."""
    if distil and not 0 <= args.alpha <= 1:
        raise UserError(f"--alpha {args.alpha}: the weight of the teacher's term must be in [0, 1] (0 = labels only, "
                        f"1 = teacher only).")
    if distil and args.augment < 0:
        raise UserError(f"--augment {args.augment}: give a number of new sentences per training sentence, 0 or more.")
    if distil and args.transfer_lm < 0:
        raise UserError(f"--transfer-lm {args.transfer_lm}: give a number of sentences to sample per training "
                        f"sentence, 0 or more.")
    kind = args.student
    named = named_layers(args.student_init)  # the layers by index: K is their number
    if named and kind == "transformer":
        k = len(named)
        if args.student_layers not in (None, k):
            raise UserError(f"--student-layers {args.student_layers} with --student-init {args.student_init}, which "
                            f"names {k} layers: give one of the two, or the same number.")
        args.student_layers = k
    for flag, value in STUDENT_DEFAULTS[kind].items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    if kind == "rnn" and named:
        raise UserError(f"--student-init {args.student_init} names a transformer student's layers; the RNN student "
                        f"has none: add --student transformer or drop it.")
    if kind == "rnn" and args.student_layers is not None:
        raise UserError(f"--student-layers {args.student_layers} is for --student transformer (the RNN student's "
                        f"size is --rnn-layers, --hidden and --emb-dim); add --student transformer or drop it.")
    if distil and args.kd_hidden and kind != "transformer":
        raise UserError(f"--kd-hidden {args.kd_hidden} matches a transformer student's layers to the teacher's; the "
                        f"RNN student has none: add --student transformer or drop --kd-hidden.")
    if distil and args.kd_hidden < 0:
        raise UserError(f"--kd-hidden {args.kd_hidden}: the weight of the hidden-state loss must be 0 or more.")
    if distil and kind == "transformer" and args.init_embeddings_from_teacher:
        raise UserError("--init-embeddings-from-teacher is for the RNN student: a transformer student starts from the "
                        "teacher's own embeddings already; drop the flag.")
    seeds = [args.SR + i for i in range(args.seeds)]
    if seeds[-1] >= 2**32:
        raise UserError(f"--seeds {args.seeds} from SR {args.SR} runs past the largest seed, 2^32 - 1; use fewer.")
    return seeds


def student_data(args, teacher):
    """(task, tokenizer, its name, its GGUF file): the data tokenised as the teacher reads it, so that both
    students see the same token ids; checked against the teacher's task and block size."""
    task = task_data(args)
    args.max_length = args.max_length or min(128, teacher.block_size if teacher else 128)
    tok_name, tok_gguf = ((teacher.tokenizer, teacher.gguf if teacher.tokenizer == teacher.base else None) if teacher
                          else student_tokenizer(args))
    tok = load_any_tokenizer(tok_name, tok_gguf)
    # The teacher's encoding ([CLS] ... [SEP] for an encoder), for the student too: the same ids for both.
    encode_task(task, tok, args.max_length, add_special_tokens=getattr(tok, "cls_token", None) is not None)
    if teacher and (teacher.num_labels != len(task.labels) or teacher.task not in (None, task.name)):
        raise UserError(f"the teacher {teacher.dir} was trained on {teacher.task or 'another task'} "
                        f"({teacher.num_labels} classes), this run's data is {task.name} ({len(task.labels)} classes: "
                        f"{', '.join(task.labels)}). {teacher.make}, with this run's data flags.")
    if teacher and args.max_length > teacher.block_size:
        raise UserError(f"--max-length {args.max_length} is longer than the teacher's block size {teacher.block_size} "
                        f"({teacher.base}); use at most that.")
    return task, tok, tok_name, tok_gguf


def teacher_targets(teacher, task, cache_dir):
    """The teacher's logits on the training sentences (kept in task.train for the KD loss) and its dev
    scores; returns what the runs record of the teacher."""
    train, dev = task.train, task.dev
    both = Examples(train.ids + dev.ids, train.labels.tolist() + dev.labels.tolist(), train.pad_id)
    logits, info = teacher.logits(both, "the training and dev sentences", cache_dir)
    train.extras["teacher_logits"] = logits[:len(train)]
    t = classification_metrics(logits[len(train):].argmax(-1), dev.labels)
    print(f"teacher {teacher.dir} ({teacher.base}, {info['parameters']:,} parameters): dev accuracy "
          f"{t['acc']:.4f}, MCC {t['mcc']:.4f} (majority baseline {task.majority:.4f}, MCC 0)")
    return {"dir": str(teacher.dir), "base": str(teacher.base), "parameters": info["parameters"],
            "dev_acc": t["acc"], "dev_mcc": t["mcc"], "sentences_per_s": info["sentences_per_s"]}


def transfer_set(args, task, tok, teacher, seed, cache_dir):
    """The training set plus a transfer set labelled by the teacher's logits alone: --augment N sentences
    per training sentence made by Tang et al.'s rules, and --transfer-lm N written by the teacher's base
    language model. Seeded by `seed`: the student's own, or SR for all under --shared-transfer."""
    parts = []  # each part labelled (and cached) on its own, so that a run with both reuses a run with one
    if args.augment:
        new = augment(task.texts, args.augment, seed, tok.mask_token)
        print(f"transfer set: {len(new)} augmented sentences ({args.augment} per training sentence; "
              f"{'masked' if tok.mask_token else 'words replaced by words of the data'}, swapped, n-grams)")
        parts.append(("the transfer set", new))
    if args.transfer_lm:
        new = lm_sentences(teacher, tok, task.texts, args.transfer_lm, seed, cache_dir, args.lm_batch_size)
        parts.append(("the language model's sentences", new))
    ids, logits = list(task.train.ids), [task.train.extras["teacher_logits"]]
    for name, sentences in parts:
        if not sentences:  # a language model that writes nothing sentence-like (random weights): nothing to label
            print(f"warning: transfer set: {name} are none (nothing was kept); this run goes on without them, on "
                  f"the other sentences of the transfer set (if any) and the training sentences")
            continue
        part = Examples.encode(tok, sentences, [IGNORE] * len(sentences), args.max_length, name)
        logits.append(teacher.logits(part, f"{name} of seed {seed}", cache_dir)[0])
        ids += part.ids
    n = len(ids) - len(task.train)
    print(f"transfer set: {n} unlabelled sentences, taught by the teacher's logits alone")
    return Examples(ids, task.train.labels.tolist() + [IGNORE] * n, task.train.pad_id, teacher_logits=torch.cat(logits))


# --------------------------------------------------------------------------- sentences written by the language model

# Fluent, yet varied; 20 new tokens end all but the longest of CoLA's sentences (the rest are dropped).
LM_SAMPLING = dict(temperature=0.9, top_k=50, max_new_tokens=20)
# Every prompt starts a line: a lone first word with nothing before it is a fragment to a language model
# (SmolLM2 continues "The" with "-" or "," most often, and "The" after a line break with " company", " most").
LM_START = "\n"


def lm_sentences(teacher, tok, texts, n, seed, cache_dir, batch_size):
    """--transfer-lm N: N sentences per training sentence written by the teacher's base language model (its
    adapter plays no part), each a continuation of the first 1-4 words of a training sentence, kept when it
    reads like a sentence (data.lm_sentence). Seeded by `seed`, and cached in cache_dir under a hash of
    the base model's weights, the precision, the training sentences, N, the seed and the sampling settings."""
    key = hashlib.sha256(json.dumps([sha256_files(weight_files(teacher.base, teacher.gguf)), str(teacher.amp),
                                     texts, n, seed, LM_SAMPLING, batch_size, LM_START]).encode()).hexdigest()
    path = Path(cache_dir) / f"lm_{key[:24]}.json"
    try:
        cached = json.loads(path.read_text())
        if cached["key"] == key:
            print(f"transfer set: {len(cached['sentences'])} sentences written by {teacher.base}: read from the cache "
                  f"{path}; the language model did not run")
            return cached["sentences"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    prompts = lm_prompts(texts, n, seed)
    start = tok(LM_START, add_special_tokens=False)["input_ids"]
    encoded = [start + tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    # Batches of prompts of one token length: no padding, so neither model needs an attention mask.
    groups = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    batches = [g[j:j + batch_size] for _, g in sorted(groups.items()) for j in range(0, len(g), batch_size)]
    lm, seen, out, t0, stops = teacher.language_model(), set(texts), [], time.time(), end_tokens(tok)
    for k, batch in enumerate(batches):
        ids = torch.tensor([encoded[i] for i in batch], device=teacher.device)
        # Batch k is seeded by (seed, k) alone: the same prompts give the same sentences.
        g = torch.Generator(device=teacher.device).manual_seed(sample_seed(seed, k + 1))
        for i, row in zip(batch, sample_rows(lm, ids, g, stops, teacher)):
            sentence = lm_sentence(prompts[i], tok.decode(row))
            if sentence is not None and sentence not in seen:
                seen.add(sentence)
                out.append(sentence)
        if k % 20 == 0 or k + 1 == len(batches):
            print(f"transfer set: language model, batch {k + 1} of {len(batches)}: {len(out)} sentences kept, "
                  f"{time.time() - t0:.0f} s", flush=True)
    print(f"transfer set: {len(out)} sentences written by {teacher.base} from {len(prompts)} prompts ({n:g} per training "
          f"sentence, {len(out) / max(1, len(prompts)):.0%} kept) in {time.time() - t0:.0f} s")
    if is_main():
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        write_json(path, {"key": key, "sentences": out})
    return out


def end_tokens(tok):
    """The token ids whose text ends a sentence (. ! ? or a line break), and the end-of-text token."""
    ends = {i for t, i in tok.get_vocab().items() if any(c in tok.convert_tokens_to_string([t]) for c in ".!?\n")}
    return torch.tensor(sorted(ends | {tok.eos_token_id} - {None}))


@torch.no_grad()
def sample_rows(lm, ids, generator, stops, teacher):
    """Continuations (lists of new token ids) of a (B, T) batch of prompts, decoded with a KV cache and the
    project's sampler (model.sample_next), until every row has ended a sentence or LM_SAMPLING's budget."""
    B, T = ids.shape
    rows, done = [[] for _ in range(B)], torch.zeros(B, dtype=torch.bool)
    kw = {k: v for k, v in LM_SAMPLING.items() if k != "max_new_tokens"}
    with torch.no_grad():  # a model in half precision is cast whole (Teacher.cast): no autocast
        if isinstance(lm, GPT):  # the hand-written GPT-2: its own generate() with a KV cache
            steps = lm.generate(ids, LM_SAMPLING["max_new_tokens"], generator=generator, **kw)
        else:
            steps = hf_decode(lm, ids, LM_SAMPLING["max_new_tokens"], generator, kw)
        for nxt in steps:
            nxt = nxt.cpu()
            for r in (~done).nonzero().flatten().tolist():
                rows[r].append(int(nxt[r]))
            done |= torch.isin(nxt, stops)
            if bool(done.all()):
                break
    return rows


def hf_decode(lm, ids, max_new_tokens, generator, sampling):
    """A transformers causal LM decoded step by step with its KV cache (past_key_values), sampled by ours."""
    out = lm(input_ids=ids, use_cache=True)
    for step in range(max_new_tokens):
        nxt = sample_next(out.logits[:, -1].float(), generator=generator, **sampling)
        yield nxt
        if step + 1 < max_new_tokens:
            out = lm(input_ids=nxt[:, None], past_key_values=out.past_key_values, use_cache=True)


def teacher_precision(args, device, amp):
    """The teacher's autocast dtype: --teacher-precision, where auto is bf16 on CUDA and on a CPU with bf16
    matrix instructions (machine.cpu_has_bf16: read from the CPU's feature flags, never timed, so that the
    same command always gives the same logits), else the run's --precision. Under torchrun rank 0 decides."""
    choice = getattr(args, "teacher_precision", "auto")
    if choice != "auto":
        return autocast_dtype(choice, device)
    bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())
    return broadcast_object(torch.bfloat16 if bf16 else amp)


def train_student(args, seed, make, hidden, train_set, task, teacher, extras, device, amp):
    """One student of one seed: built by make(kept), trained (with the KD loss under distil, and the
    hidden-state loss with --kd-hidden), the best epoch saved to MODELS_DIR/<run name>/ with its inference
    speed and training time."""
    distil, teacher_info = args.mode == "distil", extras["teacher"]
    name = run_name(args.mode, seed, student_tag(args))
    out_dir = Path(args.models_dir) / name
    # --student-vocab data: the tokens of the sentences it trains on, and an unknown-token row
    kept = sorted({t for ids in train_set.ids for t in ids}) if args.student_vocab == "data" else None
    seed_everything(seed)  # the student's initial weights: the same in distil and rnn for the same seed
    student, kind = make(kept)
    total = sum(p.numel() for p in student.parameters())
    times = teacher_info["parameters"] / total if distil else 0
    ratio = "" if not distil else (f", {times:.1f}x smaller than the teacher" if times >= 1 else
                                   f", {1 / times:.1f}x larger than the teacher") + \
        f" ({teacher_info['parameters'] / 1e6:.1f}M)"
    print(f"student (seed {seed}): {kind}: {total:,} parameters ({total / 1e6:.2f}M{ratio})", flush=True)
    student.to(device)
    e = extras
    extras = {"mode": e["mode"], "seed": seed, "seed_group": e["seed_group"], "tokenizer": e["tokenizer"],
              "tokenizer_gguf": e["tokenizer_gguf"], "tokenizer_fingerprint": e["tokenizer_fingerprint"],
              "labels": e["labels"], "task": e["task"], "max_length": e["max_length"], "eval_split": e["eval_split"],
              "parameters": total, "majority_acc": e["majority_acc"], "teacher": e["teacher"], "command": e["command"],
              "environment": e["environment"], "plots": str(Path(args.plots_dir) / name), "kind": kind}

    def save_best(model, row):
        path = save_student(model, out_dir, {**extras, "best": row})
        return (f"  new best dev MCC {row['dev_mcc']:.4f}: student saved to {out_dir}/ "
                f"({path.stat().st_size / 1024:.0f} KB)")

    run_settings = {"student": dataclasses.asdict(student.config),
                    "tokenizer_fingerprint": extras["tokenizer_fingerprint"], "task": task.name,
                    "max_length": args.max_length, "eval_split": args.eval_split,
                    "teacher": teacher.id if teacher else None, "n_examples": len(train_set),
                    "kd": [args.alpha, args.temperature, args.augment, args.init_embeddings_from_teacher,
                           args.kd_loss, args.transfer_lm, args.shared_transfer]
                    + ([args.kd_hidden] if args.kd_hidden else []) if distil else None}  # (an older run's last.pt resumes)
    title = (f"{args.mode} SR={seed}: {kind}, lr={args.lr:g}, batch={args.batch_size}"
             + (f", {args.kd_loss}, alpha={args.alpha:g}, T={args.temperature:g}, augment={args.augment}, "
                f"transfer-lm={args.transfer_lm}" + (f", hidden={args.kd_hidden:g}" if args.kd_hidden else "")
                if distil else ""))
    loss_fn = (functools.partial(kd_loss, temperature=args.temperature, alpha=args.alpha, loss=args.kd_loss)
               if distil else None)
    if hidden is not None:
        loss_fn = with_hidden_loss(loss_fn, student, hidden, args.kd_hidden)
    with RunLock(out_dir, "--models-dir", args.command, hold=is_main()):
        history = train_run(args, name, student, train_set, task.dev, task.majority, out_dir,
                            save_best, run_settings, title, device, amp, loss_fn=loss_fn, seed=seed)
        if is_main():
            record_speed(student, task.dev, history, out_dir, device, amp)


def student_tag(args):
    """What tells this student's runs apart from other students' in one models directory: nothing for the
    RNN (distil_<seed>, as always), tf<K>-<init>-<from> for a transformer (distil_tf6-bottom-teacher_<seed>,
    distil_tf6-layers0-1-2-3-16-17-base_<seed>)."""
    if args.student != "transformer":
        return ""
    named = named_layers(args.student_init)
    init = "layers" + "-".join(map(str, named)) if named else args.student_init  # tf6-layers0-1-2-3-16-17-base
    return f"tf{args.student_layers}-{init}-{args.student_from}"


def with_hidden_loss(loss_fn, student, targets, weight):
    """loss_fn plus weight * the hidden-state loss (student.py's hidden_loss) of the student's layers against the
    teacher's, which targets(input_ids, attention_mask) computes for the batch."""
    student.record_hidden = True

    def loss(logits, batch):
        h = hidden_loss(student.hidden, targets(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
        student.hidden = []  # held by the graph until backward, not by the student beyond it
        # over the sentences of the whole batch (kd_loss and ce_loss do the same: n_total under torchrun)
        h = h.mean() if "n_total" not in batch else h.sum() / batch["n_total"]
        return loss_fn(logits, batch) + weight * h
    return loss


def record_speed(student, dev, history, out_dir, device, amp):
    """Inference speed (of one process) and training time, added to run_config.json for the comparison."""
    # Batches of 128 sentences of one length, as the teacher's logits are computed: the same conditions.
    logits_by_length(student, dev, device, 128, amp, progress=False, local=True)  # warm-up
    t0 = time.time()
    logits_by_length(student, dev, device, 128, amp, progress=False, local=True)
    config = json.loads((out_dir / "run_config.json").read_text())
    config.update(inference_sentences_per_s=len(dev) / (time.time() - t0),
                  train_seconds=sum(r.get("train_seconds", 0) for r in history))
    write_json(out_dir / "run_config.json", config)


def write_compare(args, models_dir):
    """plots/compare_<SR>.md and .png, and the frontier plots/frontier_<SR>.png, once the teacher and a KD and a
    scratch student of one kind exist for this SR: every kind of student found in the models directory."""
    compared = comparison_rows(models_dir, args.SR)
    if compared is None:
        other = "rnn" if args.mode == "distil" else "distil"
        print(f"comparison: `python run.py {other} {args.SR}` with the same flags writes the teacher / KD student / "
              f"scratch student comparison, {args.plots_dir}/compare_{args.SR}.md and .png, and the speed/accuracy "
              f"frontier {args.plots_dir}/frontier_{args.SR}.png")
        return
    rows, runs = compared
    pair = first_pair(runs)
    title = f"{pair['distil'][0].get('task', 'cola')}, SR={args.SR}"
    prefix = Path(args.plots_dir) / f"compare_{args.SR}"
    md, png = write_comparison(prefix, rows, pair["distil"][0]["majority_acc"],
                               f"{title}: teacher vs KD students vs scratch students")
    frontier = write_frontier(Path(args.plots_dir) / f"frontier_{args.SR}.png", rows,
                              f"{title}: dev MCC against inference speed, every student found in {models_dir}")

    for tag, p in runs.items():
        if None not in p.values() and architecture(p["distil"][0]) != architecture(p["rnn"][0]):
            print(f"warning: the two students{kind_label(tag)} differ in architecture; the comparison is not like for like")
    print(f"comparison: {md} and {png}; frontier: {frontier}")
