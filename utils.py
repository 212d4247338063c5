"""Files and the outside world: atomic files and run locks, model and tokenizer files and the hub, adapter
and student files, and the teacher-logit cache. (The machine, devices and processes: machine.py; data sets:
data.py.)"""
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from model import GPT, GPTConfig, PRETRAINED


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, no network). run.py prints the
    message as one paragraph and exits 2, without a traceback."""


# --------------------------------------------------------------------------- atomic files and run locks

UMASK = os.umask(0o022)  # read once, at import: os.umask can only be read by setting it
os.umask(UMASK)


def atomic_write(path, write):
    """Call write(tmp_path), then rename tmp over path: a kill leaves the old file or the new one,
    never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file private (0600), and some writers (safetensors) make a new file of their
        # own: either way, give it the mode a plain open() would, so that others can read shared outputs.
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class RunLock:
    """One run per output directory: an advisory lock (flock) on DIR/.lock, held while the run writes
    there. The operating system drops it when the process ends, however it ends (SIGKILL included), so
    a killed run never leaves a stale lock behind and --resume just works. The file names the holder."""

    def __init__(self, directory, flag, command="", hold=True):
        """hold=False: a process that writes nothing there (torchrun's ranks but 0: rank 0 holds it for all)."""
        self.dir, self.flag, self.command, self.hold, self.file = Path(directory), flag, command, hold, None

    def __enter__(self):
        if not self.hold:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file = open(self.dir / ".lock", "a+")
        if not _try_lock(self.file):
            self.file.seek(0)
            holder = self.file.read().strip() or "a process that did not say which"
            self.file.close()
            raise UserError(f"{self.dir} is in use by another run ({holder}): two runs writing one directory would "
                            f"mix their files. Wait for that run to finish, or give this one another "
                            f"directory ({self.flag}).")
        import socket
        import time
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                        f"{self.command}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        if self.file:
            self.file.close()  # closing the file releases the lock


try:
    import fcntl

    def _try_lock(f):
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
except ImportError:  # Windows
    import msvcrt

    def _try_lock(f):
        try:
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


# --------------------------------------------------------------------------- GPT-2 files and the hub

def quiet_library_bars():
    """Off a terminal (a log file, CI, nohup, 2>&1 | tee), turn off the progress bars of huggingface_hub
    (downloads), transformers (loading, a GGUF's de-quantizing) and datasets: each redraws dozens of times
    into a log, where ours write one line every 30 s (train_utils.progress_bar). On a terminal they stay
    on, and so do they where the user set HF_HUB_DISABLE_PROGRESS_BARS / HF_DATASETS_DISABLE_PROGRESS_BARS.
    For the whole process; datasets only once imported (it is slow to import): call this after importing it.
    Returns whether this stderr is a log (the bars are off)."""
    import sys
    if getattr(sys.stderr, "isatty", lambda: False)():
        return False
    from transformers import modeling_gguf_pytorch_utils as gguf_loading
    from transformers.utils import logging as hf_logging
    if "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ:  # the user's choice, else the libraries warn
        hf_logging.disable_progress_bar()  # and huggingface_hub's
    # The GGUF converter draws its bar with tqdm itself: give it transformers' bar, which obeys the switch.
    gguf_loading.tqdm = hf_logging.tqdm
    datasets = sys.modules.get("datasets")
    if datasets is not None and "HF_DATASETS_DISABLE_PROGRESS_BARS" not in os.environ:
        datasets.disable_progress_bars()
    return True


def check_writable(dirs):
    """A bad output path must fail now, not after an hour of training (and without creating anything)."""
    for flag, d in dirs:
        if d is None:
            continue
        existing = Path(d).resolve()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise UserError(f"{flag} {d}: cannot write a directory there ({existing} is "
                            f"{'not a directory' if not existing.is_dir() else 'not writable'}); choose another path.")


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
        quiet_library_bars()
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


# --------------------------------------------------------------------------- adapter files (peft's format)
# Our adapter checkpoint *is* a peft adapter: adapter_config.json + adapter_model.safetensors with peft's
# key names, so peft loads ours and we load peft's. Our own extras (labels, base model, metrics) sit beside
# them in run_config.json, which peft ignores.

PEFT_PREFIX = "base_model.model."


def adapter_settings(kind, r=4, alpha=4.0, dropout=0.0, rslora=False, target_modules=(), feedforward_modules=(),
                     modules_to_save=(), fan_in_fan_out=True):
    """The peft adapter_config.json for our adapters (kind lora, dora or ia3; DoRA is peft's LORA with
    use_dora). fan_in_fan_out=True for GPT-2, whose Conv1D in transformers (the model peft adapts) stores W as
    (in, out); False for every model of nn.Linear layers (backbones.py). Either way the LoRA matrices have the
    same shapes: only peft's forward differs."""
    common = {"task_type": "SEQ_CLS", "fan_in_fan_out": fan_in_fan_out, "target_modules": list(target_modules),
              "modules_to_save": list(modules_to_save), "inference_mode": True}
    if kind in ("lora", "dora"):
        return {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": rslora,
                "bias": "none", **({"use_dora": True} if kind == "dora" else {}), **common}
    return {"peft_type": "IA3", "feedforward_modules": list(feedforward_modules), **common}


def save_adapter(model, out_dir, settings, extras=None):
    """Write the trainable parameters of `model` as a peft adapter (atomically), plus run_config.json."""
    if "prompt_encoder" in model._modules:  # prompt or prefix tuning: saved as peft saves them
        from prompts import adapter_tensors
        return write_adapter(out_dir, adapter_tensors(model), settings, extras)
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
    return write_adapter(out_dir, tensors, settings, extras)


def write_adapter(out_dir, tensors, settings, extras):
    """adapter_model.safetensors, adapter_config.json (and run_config.json), each written atomically."""
    from safetensors.torch import save_file
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
    if settings.get("peft_type") in ("PROMPT_TUNING", "PREFIX_TUNING"):  # virtual tokens: prompts.py
        from prompts import read_tensors
        return (*read_tensors(adapter_dir, settings, tensors), read_run_config(d, adapter_dir))
    kind = {"LORA": "dora" if settings.get("use_dora") else "lora", "IA3": "ia3"}.get(settings.get("peft_type"))
    problems = []
    if kind is None:
        problems.append(f"peft_type {settings.get('peft_type')!r} (supported: LORA, with or without DoRA, and IA3)")
    if not isinstance(settings.get("target_modules"), list):
        problems.append("target_modules must be a list of names (a regular expression is not supported)")
    if settings.get("lora_bias") or settings.get("bias", "none") != "none":
        problems.append("trained biases are not supported")
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
    return {"kind": kind, **settings}, ours, read_run_config(d, adapter_dir)


def read_run_config(d, adapter_dir):
    """Our extras beside a peft adapter (run_config.json), or {}."""
    try:
        return json.loads((d / "run_config.json").read_text()) if (d / "run_config.json").is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--adapter {adapter_dir}: run_config.json is not valid JSON ({e}); delete it (the adapter "
                        f"then loads like any peft adapter, with labels LABEL_0, LABEL_1) or restore it.")


def matched_state(model, tensors, head_names):
    """{parameter name: tensor}: the adapter's tensors, each checked to have its place and shape in `model`
    (a head the model lacks is left out: a classifier's `score` when generating), and every parameter of the
    model's heads among them. UserError, saying what to do, otherwise."""
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
    heads = [h for h in head_names if isinstance(getattr(model, h, None), torch.nn.Module)]  # top-level heads
    # Every parameter of each head (RoBERTa's is classifier.dense and classifier.out_proj).
    if any(f"{h}.{n}" not in state for h in heads for n, _ in getattr(model, h).named_parameters()):
        raise UserError(f"the adapter holds no classification head ({', '.join(h + '.weight' for h in heads)}): "
                        f"it was not trained for sequence classification.")
    return state


def attach_adapter(model, settings, tensors, head_names=("score",)):
    """Inject the adapter that `settings` describes into `model` and load its tensors. Every tensor must
    find its parameter, except heads the model lacks (a classifier's `score` when generating).
    head_names: the classification head's modules, ("score",) for GPT-2; a transformers model's are
    backbones' info["head"] (e.g. pre_classifier and classifier for DistilBERT)."""
    from model import inject_adapters, mark_trainable
    if settings["kind"] in ("prompt", "prefix"):  # virtual tokens, put before the sentence: prompts.py
        from prompts import attach_virtual_tokens
        return attach_virtual_tokens(model, settings, tensors, head_names)
    try:
        inject_adapters(model, settings["kind"], settings["target_modules"], settings.get("feedforward_modules") or (),
                        r=settings.get("r", 4), alpha=settings.get("lora_alpha", 4),
                        dropout=settings.get("lora_dropout", 0.0), rslora=settings.get("use_rslora", False))
    except ValueError as e:  # the adapter's target_modules name no layer of this model
        raise UserError(f"the adapter does not fit this model ({e}): it was trained on another architecture; "
                        f"pass the base model it was trained on with --model.")
    names = set(mark_trainable(model, train_layernorm=False, head_names=head_names))
    state = matched_state(model, tensors, head_names)
    lost = [n for n in names if n not in state and not set(n.split(".")[:-1]) & set(head_names)]  # heads: above
    if lost:
        raise UserError(f"the adapter file lacks {len(lost)} adapter tensors (e.g. {lost[0]}): it is incomplete.")
    model.load_state_dict(state, strict=False)
    return model


# --------------------------------------------------------------------------- fingerprints

def sha256_files(paths, h=None):
    """One SHA-256 over the names and bytes of the files that exist among `paths` (streamed)."""
    import hashlib
    h = h or hashlib.sha256()
    for path in map(Path, paths):
        if path.is_file():
            h.update(path.name.encode() + b"\0")
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tok):
    """What a tokenizer maps text to: a hash of its vocabulary (merges decide which ids appear, but a
    student trained with one tokenizer only needs the same id for the same token)."""
    import hashlib
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the teacher-logit cache
# Distillation needs the teacher's logits for every training sentence, every epoch; they never change, so
# they are computed once and kept in <cache_dir>/teacher_<key>.safetensors, where the key hashes everything
# that decides them: the teacher (base weights, adapter, precision) and the token ids of the sentences
# (which cover the sentences, the tokenizer and --max-length). The file also holds its own key and a hash
# of its logits, so a damaged, truncated or mislabelled file is noticed and recomputed, never used.

def cache_key(teacher_id, ids):
    import hashlib
    h = hashlib.sha256(teacher_id.encode())
    for x in ids:
        h.update(np.asarray(x, dtype=np.int64).tobytes() + b"\xff")
    return h.hexdigest()


def cache_path(cache_dir, key):
    return Path(cache_dir) / f"teacher_{key[:24]}.safetensors"


def read_cached_logits(cache_dir, key, n):
    """(logits, metadata) from the cache, or (None, None) when absent, (None, why) when damaged or stale."""
    import hashlib
    from safetensors import safe_open
    path = cache_path(cache_dir, key)
    if not path.is_file():
        return None, None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, logits = f.metadata() or {}, f.get_tensor("logits")
    except Exception as e:
        return None, f"{path} cannot be read ({type(e).__name__}); it is recomputed"
    if meta.get("key") != key:
        return None, f"{path} was written for other sentences or another teacher; it is recomputed"
    if logits.dim() != 2 or logits.shape[0] != n or not bool(torch.isfinite(logits).all()) or \
            hashlib.sha256(logits.contiguous().numpy().tobytes()).hexdigest() != meta.get("sha256"):
        return None, f"{path} is damaged (its logits do not match their checksum); it is recomputed"
    return logits, json.loads(meta.get("info", "{}"))


def write_cached_logits(cache_dir, key, logits, info):
    import hashlib
    from safetensors.torch import save_file
    logits = logits.float().contiguous().cpu()
    meta = {"key": key, "sha256": hashlib.sha256(logits.numpy().tobytes()).hexdigest(), "info": json.dumps(info)}
    path = cache_path(cache_dir, key)
    atomic_write(path, lambda tmp: save_file({"logits": logits}, tmp, metadata=meta))
    return path


# --------------------------------------------------------------------------- student files

STUDENT_WEIGHTS = "student.safetensors"


def save_student(model, out_dir, extras):
    """The student's weights (safetensors) and run_config.json: its architecture, tokenizer, labels."""
    from dataclasses import asdict
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    state = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous()  # vocab_map stays int
             for k, v in model.state_dict().items()}
    atomic_write(out_dir / STUDENT_WEIGHTS, lambda tmp: save_file(state, tmp))
    write_json(out_dir / "run_config.json", {"student": asdict(model.config), **extras})
    return out_dir / STUDENT_WEIGHTS


def is_student_dir(path):
    return (Path(path).expanduser() / STUDENT_WEIGHTS).is_file()


def load_student(student_dir):
    """(the student in eval mode, run_config) from a directory that save_student wrote: a DistilRNN, or a
    student.TransformerStudent (its config says kind "transformer")."""
    from safetensors.torch import load_file
    from model import DistilRNN, RNNConfig
    d = Path(student_dir).expanduser()
    try:
        extras = json.loads((d / "run_config.json").read_text())
        if extras["student"].get("kind") == "transformer":
            from student import TransformerConfig, TransformerStudent
            model = TransformerStudent.from_config(TransformerConfig(**extras["student"]))
        else:
            model = DistilRNN(RNNConfig(**extras["student"]))
        model.load_state_dict(load_file(d / STUDENT_WEIGHTS))
    except Exception as e:
        raise UserError(f"{d}: not a readable student ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                        f"). A student directory holds {STUDENT_WEIGHTS} and run_config.json as `run.py distil` "
                        f"or `run.py rnn` write them; rerun that command to make it again.")
    return model.eval(), extras
