"""Everything that touches the outside world: seeds, devices, model and tokenizer files, the hub,
CoLA data, batching, and checkpoint files (always written atomically)."""
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from model import GPT, GPTConfig, PRETRAINED


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, no network). run.py prints the
    message as one paragraph and exits 2, without a traceback."""


# --------------------------------------------------------------------------- seeds and devices

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def pick_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device torch knows; use auto, cpu, cuda, cuda:N or mps.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for, but this torch sees no CUDA GPU; use --device cpu or auto.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0.")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"--device {name} was asked for, but this torch has no MPS (Apple GPU) support; use "
                        f"--device cpu or auto.")
    return device


def autocast_dtype(precision, device):
    """The dtype to autocast to, or None for plain float32. 'auto' = bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# --------------------------------------------------------------------------- atomic files

def atomic_write(path, write):
    """Call write(tmp_path), then rename tmp over path: a kill leaves the old file or the new one,
    never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=path.suffix)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; ours are ordinary outputs
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


# --------------------------------------------------------------------------- GPT-2 files and the hub

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")


def resolve_model_dir(name_or_dir):
    """A local directory as it is; a name (gpt2, gpt2-medium, ... or a hub id) through the
    Hugging Face cache, then the hub. Returns a Path to a directory in Hugging Face format."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    looks_like_path = str(name_or_dir).startswith((".", "/", "~")) or str(name_or_dir).count("/") > 1
    if path.exists() or looks_like_path:
        raise UserError(f"--model {name_or_dir}: {'not a directory' if path.exists() else 'no such directory'}. "
                        f"Pass a directory in Hugging Face format (config.json + model.safetensors or "
                        f"pytorch_model.bin + tokenizer files) or a model name ({', '.join(PRETRAINED)}).")
    repo = PRETRAINED[name_or_dir][0] if name_or_dir in PRETRAINED else name_or_dir
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import logging as hub_logging
    hub_logging.set_verbosity_error()  # its retry chatter is replaced by our one paragraph below
    patterns = ["config.json", "model.safetensors", *TOKENIZER_FILES]
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    if not offline:
        print(f"[{name_or_dir}] not in the Hugging Face cache; downloading {repo} from the hub ...", flush=True)
        try:
            return Path(snapshot_download(repo, allow_patterns=patterns))
        except Exception as e:
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    else:
        reason = "HF_HUB_OFFLINE is set"
    raise UserError(
        f"could not get the weights of model {name_or_dir!r} (hub repo {repo}): they are not in the Hugging "
        f"Face cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}) and the hub could not be reached "
        f"({reason}). Run once with internet access to cache them, or pass a local directory in Hugging Face "
        f"format with --model /path/to/dir (config.json, model.safetensors or pytorch_model.bin, and the "
        f"tokenizer files vocab.json + merges.txt, or point --tokenizer at a directory holding them).")


def gpt_config_from_hf(model_dir):
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{model_dir} has no config.json: it is not a model directory in Hugging Face format.")
    try:
        hf = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path} is not valid JSON ({e}); re-save the model with save_pretrained().")
    problems = []
    if hf.get("model_type", "gpt2") != "gpt2":
        problems.append(f"model_type is {hf.get('model_type')!r}, not 'gpt2'")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function {hf['activation_function']!r} (ours is GPT-2's tanh GELU)")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights", True) is False:
        problems.append("non-standard attention scaling")
    if problems:
        raise UserError(f"{cfg_path}: this hand-written GPT-2 cannot run this model: {'; '.join(problems)}.")
    return GPTConfig(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                     vocab_size=hf["vocab_size"], block_size=hf["n_positions"],
                     dropout=hf.get("resid_pdrop", 0.1), layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))


def load_state_dict_file(model_dir):
    model_dir = Path(model_dir)
    for name in WEIGHT_FILES:
        path = model_dir / name
        if path.is_file():
            try:
                if name.endswith(".safetensors"):
                    from safetensors.torch import load_file
                    return load_file(path)
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise UserError(f"could not read weights {path}: {type(e).__name__}: {e}. "
                                f"The file may be truncated or corrupt; download or save it again.")
    raise UserError(f"{model_dir} holds no weights: expected one of {', '.join(WEIGHT_FILES)}.")


def load_gpt(name_or_dir, cls=GPT, **kwargs):
    """Our GPT (or GPTClassifier) with the weights of a Hugging Face GPT-2 checkpoint."""
    model_dir = resolve_model_dir(name_or_dir)
    config = gpt_config_from_hf(model_dir)
    try:
        return cls.from_state_dict(config, load_state_dict_file(model_dir), **kwargs)
    except ValueError as e:
        raise UserError(f"{model_dir}: {e}. The checkpoint is incomplete or for another model.")


def load_tokenizer(name_or_dir):
    """GPT-2's BPE tokenizer from a directory or model name; padding with EOS, as GPT-2 has no pad token."""
    from transformers import GPT2TokenizerFast
    path = Path(str(name_or_dir)).expanduser()
    if not path.is_dir():
        path = resolve_model_dir(name_or_dir)
    if not ((path / "vocab.json").is_file() and (path / "merges.txt").is_file()) and \
            not (path / "tokenizer.json").is_file():
        raise UserError(f"no GPT-2 tokenizer in {path}: expected vocab.json + merges.txt (or tokenizer.json). "
                        f"Copy them into the model directory or pass --tokenizer DIR (here the genuine files are "
                        f"in ../shared/data/gpt2-tokenizer).")
    tok = GPT2TokenizerFast.from_pretrained(str(path))
    tok.pad_token = tok.eos_token
    return tok


# --------------------------------------------------------------------------- CoLA

COLA_FILES = {"train": "in_domain_train.tsv", "in_domain": "in_domain_dev.tsv",
              "out_of_domain": "out_of_domain_dev.tsv"}


def read_cola_tsv(path, skip_bad_rows=False):
    """The official raw CoLA format: source TAB label TAB original-mark TAB sentence, no header.
    Returns (sentences, labels, number of skipped rows). A bad row is an error naming file and line,
    or, with skip_bad_rows, skipped and counted."""
    sentences, labels, skipped = [], [], 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            problem = None
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                problem = "bytes that are not UTF-8"
            if problem is None:
                if not line.strip():
                    continue  # blank lines (a trailing newline) are not rows
                cols = line.split("\t")
                if len(cols) != 4:
                    problem = f"{len(cols)} tab-separated columns instead of 4"
                elif cols[1] not in ("0", "1"):
                    problem = f"label {cols[1]!r} is not 0 or 1"
                elif not cols[3].strip():
                    problem = "an empty sentence"
            if problem:
                if not skip_bad_rows:
                    raise UserError(f"{path}, line {lineno}: {problem}. CoLA rows are 'source<TAB>label<TAB>"
                                    f"mark<TAB>sentence' with label 0 or 1; fix the row or pass --skip-bad-rows "
                                    f"to skip such rows (they are counted).")
                skipped += 1
                continue
            sentences.append(cols[3].strip())
            labels.append(int(cols[1]))
    return sentences, labels, skipped


def cola_dir(data_dir):
    """Accept the raw/ directory itself or the CoLA release root that holds raw/."""
    d = Path(data_dir).expanduser()
    if not (d / COLA_FILES["train"]).is_file() and (d / "raw" / COLA_FILES["train"]).is_file():
        d = d / "raw"
    return d


def load_cola(data_dir, eval_split="in_domain", skip_bad_rows=False):
    """{'train': (sentences, labels), 'dev': (sentences, labels)} from the raw files in data_dir,
    or, when data_dir holds none, from the hub (GLUE's CoLA, whose validation is both dev sets)."""
    d = cola_dir(data_dir)
    if (d / COLA_FILES["train"]).is_file():
        splits = {"train": ["train"], "dev": ["in_domain", "out_of_domain"] if eval_split == "both" else [eval_split]}
        out = {}
        for split, parts in splits.items():
            sents, labels = [], []
            for part in parts:
                path = d / COLA_FILES[part]
                if not path.is_file():
                    raise UserError(f"--eval-split {eval_split} needs {path}, which does not exist. CoLA's raw "
                                    f"release has in_domain_dev.tsv and out_of_domain_dev.tsv; pick a split "
                                    f"whose file is there.")
                s, l, skipped = read_cola_tsv(path, skip_bad_rows)
                if skipped:
                    print(f"skipped {skipped} bad rows in {path}")
                sents += s
                labels += l
            if not sents:
                raise UserError(f"no sentences in {', '.join(COLA_FILES[p] for p in parts)} under {d}.")
            out[split] = (sents, labels)
        return out
    hint = ("; the hub's GLUE validation set is both dev sets together, so also pass --eval-split both"
            if eval_split != "both" else "")
    try:
        import datasets
        datasets.logging.set_verbosity_error()
        ds = datasets.load_dataset("nyu-mll/glue", "cola")
    except Exception as e:
        raise UserError(f"no CoLA data: {d} does not hold {COLA_FILES['train']}, and the hub copy "
                        f"(datasets.load_dataset('nyu-mll/glue', 'cola')) could not be loaded "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}). Put the raw "
                        f"CoLA files (in_domain_train.tsv, in_domain_dev.tsv) in data/cola or pass "
                        f"--data-dir DIR (here: --data-dir ../shared/data/cola/raw){hint}.")
    if eval_split != "both":
        raise UserError("CoLA came from the hub, whose validation set mixes in- and out-of-domain dev "
                        "sentences: pass --eval-split both, or point --data-dir at the raw files.")
    return {"train": (list(ds["train"]["sentence"]), list(ds["train"]["label"])),
            "dev": (list(ds["validation"]["sentence"]), list(ds["validation"]["label"]))}


# --------------------------------------------------------------------------- batching

class Examples:
    """Tokenised sentences with labels (and any per-example extras, e.g. teacher logits),
    served in dynamically padded batches: each batch is padded to its own longest sentence."""

    def __init__(self, ids, labels, pad_id, **extras):
        assert len(ids) == len(labels), "one label per sentence"
        self.ids, self.labels, self.pad_id = ids, torch.tensor(labels), pad_id
        self.extras = extras

    @classmethod
    def encode(cls, tokenizer, sentences, labels, max_length, name="data"):
        ids = tokenizer(sentences, add_special_tokens=False)["input_ids"]
        cut = sum(len(x) > max_length for x in ids)
        if cut:
            print(f"{name}: {cut} of {len(ids)} sentences longer than --max-length {max_length} tokens "
                  f"were truncated")
        empty = [i for i, x in enumerate(ids) if not x]
        if empty:
            raise UserError(f"{name}: sentence {empty[0] + 1} encodes to no tokens; remove it.")
        return cls([x[:max_length] for x in ids], labels, tokenizer.pad_token_id)

    def __len__(self):
        return len(self.ids)

    def batches(self, batch_size, shuffle=False, seed=0):
        order = (torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)) if shuffle
                 else torch.arange(len(self)))
        for start in range(0, len(self), batch_size):
            idx = order[start:start + batch_size]
            seqs = [self.ids[i] for i in idx.tolist()]
            T = max(len(s) for s in seqs)
            input_ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
            for row, s in enumerate(seqs):
                input_ids[row, :len(s)] = torch.tensor(s)
                attention_mask[row, :len(s)] = 1
            batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": self.labels[idx]}
            batch.update({k: v[idx] for k, v in self.extras.items()})
            yield batch


# --------------------------------------------------------------------------- adapter files (peft's format)
# Our adapter checkpoint *is* a peft adapter: adapter_config.json + adapter_model.safetensors with peft's
# key names, so peft loads ours and we load peft's. Our own extras (labels, base model, metrics) sit beside
# them in run_config.json, which peft ignores.

PEFT_PREFIX = "base_model.model."


def adapter_settings(kind, r=4, alpha=4.0, dropout=0.0, rslora=False, target_modules=(), feedforward_modules=(),
                     modules_to_save=()):
    """The peft adapter_config.json for our GPT-2 adapters. fan_in_fan_out: GPT-2's Conv1D stores W as (in, out)."""
    common = {"task_type": "SEQ_CLS", "fan_in_fan_out": True, "target_modules": list(target_modules),
              "modules_to_save": list(modules_to_save), "inference_mode": True}
    if kind == "lora":
        return {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": rslora,
                "bias": "none", **common}
    return {"peft_type": "IA3", "feedforward_modules": list(feedforward_modules), **common}


def save_adapter(model, out_dir, settings, extras=None):
    """Write the trainable parameters of `model` as a peft adapter (atomically), plus run_config.json."""
    from safetensors.torch import save_file
    adapters = {n: m for n, m in model.named_modules() if hasattr(m, "ia3_l")}
    tensors = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        t = p.detach().float().cpu().contiguous()
        if name.endswith(".ia3_l"):
            t = t[None, :] if adapters[name[:-len(".ia3_l")]].feedforward else t[:, None]
        key = PEFT_PREFIX + name + (".weight" if name.endswith((".lora_A", ".lora_B")) else "")
        tensors[key] = t.contiguous()
    out_dir = Path(out_dir)
    atomic_write(out_dir / "adapter_model.safetensors", lambda tmp: save_file(tensors, tmp))
    write_json(out_dir / "adapter_config.json", settings)
    if extras is not None:
        write_json(out_dir / "run_config.json", extras)
    return out_dir / "adapter_model.safetensors"


def read_adapter(adapter_dir):
    """(peft settings, {our parameter name: tensor}, our extras or {}) from a peft adapter directory."""
    from safetensors.torch import load_file
    d = Path(adapter_dir).expanduser()
    cfg_path, weights = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise UserError(f"--adapter {adapter_dir}: expected adapter_config.json and adapter_model.safetensors in "
                        f"it (what `run.py LoRA` writes to models/LoRA_<SR>/, or peft's save_pretrained()).")
    try:
        settings = json.loads(cfg_path.read_text())
        tensors = load_file(weights)
    except Exception as e:
        raise UserError(f"--adapter {adapter_dir}: could not read it ({type(e).__name__}: {e}).")
    kind = {"LORA": "lora", "IA3": "ia3"}.get(settings.get("peft_type"))
    problems = []
    if kind is None:
        problems.append(f"peft_type {settings.get('peft_type')!r} (supported: LORA, IA3)")
    if not isinstance(settings.get("target_modules"), list):
        problems.append("target_modules must be a list of names (a regular expression is not supported)")
    if settings.get("use_dora") or settings.get("lora_bias") or settings.get("bias", "none") != "none":
        problems.append("DoRA and trained biases are not supported")
    if problems:
        raise UserError(f"--adapter {adapter_dir}: cannot load this adapter: {'; '.join(problems)}.")
    ours = {}
    for key, t in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        name = name.replace(".default.", ".")  # keys saved with the adapter name, as some peft versions did
        if name.endswith((".lora_A.weight", ".lora_B.weight")):
            name = name[:-len(".weight")]
        elif name.endswith(".ia3_l"):
            t = t.reshape(-1)
        ours[name] = t
    extras_path = d / "run_config.json"
    try:
        extras = json.loads(extras_path.read_text()) if extras_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--adapter {adapter_dir}: run_config.json is not valid JSON ({e}); delete it (the adapter "
                        f"then loads like any peft adapter, with labels LABEL_0, LABEL_1) or restore it.")
    return {"kind": kind, **settings}, ours, extras


def attach_adapter(model, settings, tensors, head_names=("score",)):
    """Inject the adapter that `settings` describes into `model` and load its tensors. Every tensor must
    find its parameter, except heads the model lacks (a classifier's `score` when generating)."""
    from model import inject_adapters, mark_trainable
    try:
        inject_adapters(model, settings["kind"], settings["target_modules"], settings.get("feedforward_modules") or (),
                        r=settings.get("r", 4), alpha=settings.get("lora_alpha", 4),
                        dropout=settings.get("lora_dropout", 0.0), rslora=settings.get("use_rslora", False))
    except ValueError as e:  # the adapter's target_modules name no layer of this model
        raise UserError(f"the adapter does not fit this model ({e}): it was trained on another architecture; "
                        f"pass the base model it was trained on with --model.")
    names = set(mark_trainable(model, train_layernorm=False, head_names=head_names))
    params = dict(model.named_parameters())
    state = {}
    for name, t in tensors.items():
        if name not in params:
            if name.split(".")[0] in head_names:
                continue
            raise UserError(f"adapter tensor {name} has no place in this model: the adapter was trained on "
                            f"another architecture; pass the base model it was trained on with --model.")
        if params[name].shape != t.shape:
            raise UserError(f"adapter tensor {name} has shape {tuple(t.shape)}, the model expects "
                            f"{tuple(params[name].shape)}: the adapter belongs to another model size.")
        state[name] = t
    if "score" in head_names and hasattr(model, "score") and "score.weight" not in state:
        raise UserError("the adapter holds no classification head (score.weight): it was not trained for "
                        "sequence classification.")
    lost = [n for n in names if n not in state and not n.endswith("score.weight")]
    if lost:
        raise UserError(f"the adapter file lacks {len(lost)} adapter tensors (e.g. {lost[0]}): it is incomplete.")
    model.load_state_dict(state, strict=False)
    return model
