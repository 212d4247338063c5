"""Virtual tokens: prompt tuning and prefix tuning, a learned table put before every sentence.

Prompt tuning (Lester et al., 2021) learns P input embeddings that go before the sentence's own, as if they
were tokens. Prefix tuning (Li & Liang, 2021) learns, for every layer, P keys and values that each token
attends to before the sentence's own, as if a cache held them; the sentence's positions then start at P.
Neither changes a weight of the model, so neither merges: the table is put in front at every forward.

The same methods as peft's PromptTuningConfig and PrefixTuningConfig, in peft's files: adapter_config.json,
and adapter_model.safetensors holding `prompt_embeddings` (the table, P rows) with the trained head and layer
norms under base_model.<their name>. With --prefix-projection the prefix is trained as peft's
reparameterisation, a (P, C) table through Linear -> Tanh -> Linear, and saved as peft saves it: the
projected (P, 2 * layers * C) table alone, the MLP dropped; loading it needs no MLP.

Our GPT-2 takes the virtual tokens in model.GPT.hidden_states (prompt=, prefix=); a transformers backbone
takes them as inputs_embeds, or as a DynamicCache holding the prefix (past_key_values), as peft passes them.
GPTClassifier and backbones.HFClassifier hand their forward to the VirtualTokens in `prompt_encoder`.
"""
import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPT, mark_trainable
from utils import UserError, matched_state

PEFT_TYPES = {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}
DEFAULT_TOKENS = 20  # peft's examples' and the prompt-tuning paper's usual length


class VirtualTokens(nn.Module):
    """P virtual tokens: for prompt tuning a (P, C) table of input embeddings; for prefix tuning a
    (P, layers * 2 * C) table, each row a key and a value per layer (layer 0's key, its value, layer 1's key,
    ...; each `heads` heads of C / heads), or with encoder_hidden_size a (P, C) table through an MLP to those
    rows. nn.Embedding's N(0, 1) start, as peft's RANDOM."""

    def __init__(self, kind, num_virtual_tokens, token_dim, num_layers, num_heads, encoder_hidden_size=None):
        super().__init__()
        assert kind in PEFT_TYPES, f"unknown virtual-token method {kind!r}"
        assert kind == "prefix" or encoder_hidden_size is None, "only a prefix has a projection"
        self.kind, self.num_virtual_tokens = kind, num_virtual_tokens
        self.num_layers, self.num_heads = num_layers, num_heads
        width = token_dim if kind == "prompt" else num_layers * 2 * token_dim
        if encoder_hidden_size:
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(encoder_hidden_size, width))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, width)
            self.transform = None

    def table(self):
        """(P, width): the virtual tokens as peft saves them (prompt_embeddings)."""
        w = self.embedding.weight
        return w if self.transform is None else self.transform(w)

    def prompt(self, batch):
        """(batch, P, C) input embeddings."""
        return self.table()[None].expand(batch, -1, -1)

    def prefix(self, batch):
        """One (k, v) pair a layer, each (batch, heads, P, head size)."""
        kv = self.table().view(self.num_virtual_tokens, 2 * self.num_layers, self.num_heads, -1).permute(1, 2, 0, 3)
        return [(kv[2 * i].expand(batch, -1, -1, -1), kv[2 * i + 1].expand(batch, -1, -1, -1))
                for i in range(self.num_layers)]

    def classify(self, model, idx, attention_mask=None):
        """The logits of a classifier (our GPTClassifier or an HFClassifier) with the virtual tokens first."""
        B = idx.shape[0]
        mask = torch.ones_like(idx) if attention_mask is None else attention_mask
        full = F.pad(mask, (self.num_virtual_tokens, 0), value=1)  # the virtual tokens are always seen
        if isinstance(model, GPT):
            if self.kind == "prompt":
                h, mask = model.hidden_states(idx, mask, prompt=self.prompt(B)), full
            else:
                h = model.hidden_states(idx, mask, prefix=self.prefix(B))
            return model.score(h[torch.arange(B, device=idx.device), last_real(mask)])
        hf = model.hf
        if self.kind == "prefix":
            return hf(input_ids=idx, attention_mask=full, past_key_values=self.cache(B)).logits
        embeds = hf.get_input_embeddings()(idx)
        embeds = torch.cat([self.prompt(B).to(embeds.dtype), embeds], 1)
        if not reads_last_token(hf):  # an encoder's head reads position 0: the first virtual token, as in peft
            return hf(inputs_embeds=embeds, attention_mask=full).logits
        # A decoder's head finds the last real token by the input ids, which inputs_embeds lacks (transformers
        # then reads the last position, a pad with right padding): found here by the mask instead.
        h = hf.base_model(inputs_embeds=embeds, attention_mask=full).last_hidden_state
        return hf.score(h[torch.arange(B, device=idx.device), last_real(full)])

    def cache(self, batch):
        """The prefix as a transformers DynamicCache, a fresh one a forward (the model appends to it)."""
        from transformers import DynamicCache
        return DynamicCache([(k, v) for k, v in self.prefix(batch)])

    def prefill(self, model, idx, cache):
        """Generation's first step on our GPT: the hidden states of idx after the virtual tokens, with the
        prompt's (or the prefix's) keys and values in `cache`, which then holds P + T positions."""
        if self.kind == "prompt":
            return model.hidden_states(idx, cache=cache, prompt=self.prompt(idx.shape[0]))
        P = self.num_virtual_tokens
        with torch.no_grad():
            for (k, v), (pk, pv) in zip(cache, self.prefix(idx.shape[0])):
                k[:, :, :P], v[:, :, :P] = pk, pv
        return model.hidden_states(idx, cache=cache, pos=P)

    def extra_repr(self):
        return f"{self.kind}, num_virtual_tokens={self.num_virtual_tokens}"


def last_real(mask):
    """(B,) each row's rightmost real position, whichever side the padding is on."""
    return (torch.arange(mask.shape[1], device=mask.device) * mask.long()).argmax(-1)


def reads_last_token(hf):
    """A decoder classifier (GPT-2, Llama, Mistral, Qwen2, ...): its head, `score`, reads the last real token."""
    return isinstance(getattr(hf, "score", None), nn.Linear)


# --------------------------------------------------------------------------- which model, how many

def model_dims(model, kind):
    """(token_dim, num_layers, num_heads) of the table, as peft counts them: a prefix of a model with grouped-query
    attention holds its key-value heads only (token_dim = head size * key-value heads)."""
    if isinstance(model, GPT):
        c = model.config
        return c.n_embd, c.n_layer, c.n_head
    c = model.config
    token_dim, heads = c.hidden_size, c.num_attention_heads
    if kind == "prefix" and getattr(c, "num_key_value_heads", None):
        head_dim = getattr(c, "head_dim", None) or token_dim // heads
        token_dim, heads = head_dim * c.num_key_value_heads, c.num_key_value_heads
    return token_dim, c.num_hidden_layers, heads


def check_fits(model, kind, flag="--peft"):
    """A UserError when the backbone cannot take the method: a prefix needs attention that takes a cache."""
    if kind != "prefix" or isinstance(model, GPT):
        return
    backbone = model.hf.base_model
    if "past_key_values" not in inspect.signature(backbone.forward).parameters:
        raise UserError(f"{flag} prefix needs a model whose attention takes a cache of keys and values "
                        f"(past_key_values); {type(backbone).__name__} ({model.config.model_type}) has none. Use "
                        f"--peft prompt, lora or ia3 with it, or a decoder (GPT-2, Llama) or BERT.")


def word_embeddings(model):
    return model.transformer.wte if isinstance(model, GPT) else model.hf.get_input_embeddings()


def text_init(model, tok, text, n):
    """(n, C) the embeddings of `text`'s tokens (the tokenizer's special tokens included, as peft encodes it),
    cut to n or repeated to fill n rows: peft's prompt_tuning_init TEXT."""
    ids = tok(text)["input_ids"]
    if not ids:
        raise UserError(f"--prompt-init {text!r} is no tokens: give some words to start the prompt from.")
    ids = (ids * -(-n // len(ids)))[:n]
    with torch.no_grad():
        return word_embeddings(model).weight[torch.tensor(ids)].detach().float().clone()


def add_virtual_tokens(model, kind, n, encoder_hidden_size=None, init=None):
    """Put a new VirtualTokens in model.prompt_encoder (a submodule: it trains, saves to last.pt and resumes
    like any parameter). init: (n, C) starting rows of a prompt (text_init). Returns it."""
    token_dim, layers, heads = model_dims(model, kind)
    device = word_embeddings(model).weight.device
    vt = VirtualTokens(kind, n, token_dim, layers, heads, encoder_hidden_size).to(device)
    if init is not None:
        with torch.no_grad():
            vt.embedding.weight.copy_(init)
    model.prompt_encoder = vt
    return vt


def remove_virtual_tokens(model):
    model._modules.pop("prompt_encoder", None)


# --------------------------------------------------------------------------- peft's files

def prompt_settings(kind, n, dims, modules_to_save, init_text=None, tokenizer=None, encoder_hidden_size=None):
    """peft's adapter_config.json for prompt (PromptTuningConfig) or prefix tuning (PrefixTuningConfig)."""
    token_dim, layers, heads = dims
    common = {"peft_type": PEFT_TYPES[kind], "task_type": "SEQ_CLS", "num_virtual_tokens": n, "token_dim": token_dim,
              "num_transformer_submodules": 1, "num_attention_heads": heads, "num_layers": layers,
              "modules_to_save": list(modules_to_save), "inference_mode": True}
    if kind == "prompt":
        return {**common, "prompt_tuning_init": "TEXT" if init_text else "RANDOM", "prompt_tuning_init_text": init_text,
                "tokenizer_name_or_path": str(tokenizer) if init_text else None, "tokenizer_kwargs": None}
    return {**common, "encoder_hidden_size": encoder_hidden_size or token_dim,
            "prefix_projection": bool(encoder_hidden_size), "init_weights": None}


def adapter_tensors(model):
    """{peft key: tensor} of a model with virtual tokens: the table as prompt_embeddings, every other trainable
    parameter (the head, the layer norms) under base_model.<name>, as peft saves prompt learning."""
    tensors = {"prompt_embeddings": model.prompt_encoder.table().detach().float().cpu().contiguous()}
    for name, p in model.named_parameters():
        if p.requires_grad and not name.startswith("prompt_encoder."):
            tensors["base_model." + name] = p.detach().float().cpu().contiguous()
    return tensors


def read_tensors(where, settings, tensors):
    """(settings with our kind, {our name: tensor}) of a prompt or prefix adapter's files."""
    kind = {v: k for k, v in PEFT_TYPES.items()}[settings["peft_type"]]
    missing = [k for k in ("num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads") if not settings.get(k)]
    if missing or "prompt_embeddings" not in tensors or settings.get("num_transformer_submodules", 1) != 1:
        raise UserError(f"--adapter {where}: cannot load this {settings['peft_type']} adapter: "
                        + (f"its config lacks {', '.join(missing)}" if missing else "it holds no prompt_embeddings"
                           if "prompt_embeddings" not in tensors else "it is for an encoder-decoder model") + ".")
    ours = {}
    for key, t in tensors.items():
        name = "prompt_encoder.embedding.weight" if key == "prompt_embeddings" else key.removeprefix("base_model.")
        ours[name] = t
    return {"kind": kind, **settings}, ours


def saved_tokens(model, settings, tensors):
    """The VirtualTokens of a prompt or prefix adapter's files (read_tensors' settings and tensors) for `model`:
    its table loaded, without projection (peft's inference mode), on the model's device. ValueError, saying
    why, when the table does not fit the model."""
    kind = settings["kind"]
    dims = model_dims(model, kind)
    saved = (settings["token_dim"], settings["num_layers"], settings["num_attention_heads"])
    if saved != dims:
        raise ValueError(f"its virtual tokens are for a model of {saved[1]} layers, {saved[2]} heads and width "
                         f"{saved[0]}, this one has {dims[1]}, {dims[2]} and {dims[0]}: it belongs to another model")
    vt = VirtualTokens(kind, settings["num_virtual_tokens"], *dims)
    table = tensors.get("prompt_encoder.embedding.weight")
    if table is None or table.shape != vt.embedding.weight.shape:
        raise ValueError(f"its prompt_embeddings are {'missing' if table is None else tuple(table.shape)}, its "
                         f"config says {tuple(vt.embedding.weight.shape)}: the file is damaged")
    with torch.no_grad():
        vt.embedding.weight.copy_(table)
    return vt.to(word_embeddings(model).weight.device)


def attach_virtual_tokens(model, settings, tensors, head_names=("score",)):
    """Load a prompt or prefix adapter (read_tensors') into `model`: its table as a VirtualTokens without
    projection (peft's inference mode), its head and layer norms in place. Every tensor must find its
    parameter, except heads the model lacks (a classifier's `score` when generating)."""
    try:
        vt = saved_tokens(model, settings, tensors)
    except ValueError as e:
        raise UserError(f"the {settings['peft_type']} adapter does not fit this model: {e}; pass the base model it "
                        f"was trained on with --model.")
    check_fits(model, settings["kind"], "the adapter's")
    remove_virtual_tokens(model)
    state = matched_state(model, {k: t for k, t in tensors.items() if not k.startswith("prompt_encoder.")},
                          head_names)
    model.load_state_dict(state, strict=False)
    model.prompt_encoder = vt
    mark_trainable(model, train_layernorm=False, head_names=(*head_names, "prompt_encoder"))
    return model
