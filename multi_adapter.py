"""Several adapters over one base model in one batch, for serving t tasks on one model (serve.py): each row
of a batch runs with its own adapter, none merged.

The rows come sorted by adapter, so each adapter's rows are one contiguous span: of the batch's rows (hidden
states (B, T, C), a pooled (B, C)) or of its packed real tokens ((N, C): GPTClassifier takes the padding out).
base(x) runs once over all rows; only the low-rank term, the IA3 scaling, a trained layer norm and the head
run per span, with the operations of one adapter alone (LoRALinear, DoRALinear, IA3Linear): equal to float rounding.
Prompt and prefix tuning rows (our GPT-2) carry their own virtual tokens, padded and masked: `classify`.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import ADAPTERS, GPT, matches
from prompts import saved_tokens


class Routing:
    """The spans [(adapter name, first row, end row)] of the next forward, in row order and covering the
    batch; given the rows' token counts, the same spans in packed tokens too. index(x) gives each row (or
    token) of x its span's position, to gather per-row weights with; layers cache what they derive from it
    here, for the one forward (cache)."""

    def __init__(self, spans, lengths=None):
        self.rows = list(spans)
        self.names = tuple(n for n, _, _ in self.rows)
        self.B = self.rows[-1][2] if self.rows else 0
        self.tokens, self.N = None, None
        if lengths is not None:
            ends = [0, *torch.as_tensor(lengths).cumsum(0).tolist()]
            self.tokens, self.N = [(n, ends[s], ends[e]) for n, s, e in self.rows], ends[-1]
        self.cache = {}

    def spans(self, x):
        """The spans over x's first dimension: rows (B) or packed tokens (N; N == B only with one token a row,
        where the two agree)."""
        if x.shape[0] == self.B:
            return self.rows
        if self.tokens is not None and x.shape[0] == self.N:
            return self.tokens
        raise ValueError(f"a routed layer got {x.shape[0]} rows, not the batch's {self.B} rows or {self.N} tokens")

    def index(self, x):
        """(x.shape[0],) the position in self.names of each row's (or token's) adapter, shaped to broadcast
        against x's other dimensions but the last."""
        key = ("index", x.shape[0], x.dim(), x.device)
        if key not in self.cache:
            sizes = torch.tensor([e - s for _, s, e in self.spans(x)])
            idx = torch.repeat_interleave(torch.arange(len(sizes)), sizes).to(x.device)
            self.cache[key] = idx.view(-1, *[1] * (x.dim() - 2))
        return self.cache[key]


class MultiAdapterLinear(nn.Module):
    """A frozen linear layer with several named adapters beside it (LoRA of any rank, DoRA, IA3), none merged:
    base(x) once for every row, then every row gets its own adapter's term. Without a routing (or for an
    adapter that does not adapt this layer) it is the base layer.

    The terms are gathered, not looped over: a batch's LoRA adapters stacked, A as (sum of ranks, in) and B
    as (out, sum of ranks), so that x @ A^T holds every row's product with every adapter's A; a mask keeps
    each row's own columns (times its scaling) and zeroes the others, exactly, so one more product adds each
    row's own B A x. IA3 vectors are gathered per row (ones for the rows of other adapters: exact). DoRA is a
    LoRA whose output rows are scaled by s = m / ||W + scaling·B·A|| (a constant at inference): y = s ⊙ (W x +
    scaling·B·A x) + bias, kept as LoRA with s folded into B and a gathered s - 1 on the base's output without its
    bias, y + (s - 1) ⊙ (y - bias) (zeros for the rows of other adapters: exact). A few
    operations per layer however many adapters share the batch; the extra products (the other adapters'
    ranks) cost sum(r) / out of the base layer's (8 adapters of r=4 on GPT-2's c_attn: 1.4%)."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.lora = {}     # name -> (A (r, in), B (out, r), scaling)
        self.ia3 = {}      # name -> (vector, feedforward)
        self.dora = {}     # name -> s - 1 (out,), s = m / ||W + scaling·B·A||; its LoRA term (B scaled by s) in lora
        self.routing = None
        self._stacked = (None, None)  # (the names of a batch, what they stack to): reused while they recur

    def add_lora(self, name, A, B, scaling):
        assert A.shape[1] == self.base.in_features and B.shape == (self.base.out_features, A.shape[0])
        self.lora[name] = (A, B, scaling)
        self._stacked = (None, None)

    @torch.no_grad()
    def add_dora(self, name, A, B, scaling, magnitude):
        """DoRA as DoRALinear computes it, with its per-output scale s computed here once."""
        assert magnitude.shape == (self.base.out_features,)
        w = self.base.weight
        s = magnitude.float() / torch.linalg.vector_norm(w.float() + scaling * (B.float() @ A.float()), dim=1)
        self.add_lora(name, A, (s[:, None] * B.float()).to(B.dtype), scaling)
        self.dora[name] = (s - 1).to(w.dtype)

    def add_ia3(self, name, vector, feedforward):
        assert vector.shape == ((self.base.in_features if feedforward else self.base.out_features),)
        self.ia3[name] = (vector, feedforward)
        self._stacked = (None, None)

    def remove(self, name):
        self.lora.pop(name, None)
        self.ia3.pop(name, None)
        self.dora.pop(name, None)
        self._stacked = (None, None)

    def stacked(self, names):
        """For a batch's adapters (in span order): (A (R, in), B (out, R), the span position of each of the R
        columns, their scalings, a key of these two) of its LoRA adapters, or None; the IA3 vectors per span
        position for the input and for the output (ones where a span's adapter has none), or None; DoRA's s - 1
        per span position (zeros where a span's adapter is no DoRA), or None."""
        if self._stacked[0] == names:
            return self._stacked[1]
        w = self.base.weight
        lora = [(k, *self.lora[n]) for k, n in enumerate(names) if n in self.lora]
        if lora:
            A = torch.cat([a for _, a, _, _ in lora])
            B = torch.cat([b for _, _, b, _ in lora], dim=1)
            slot = torch.cat([torch.full((a.shape[0],), k) for k, a, _, _ in lora]).to(w.device)
            scale = torch.cat([torch.full((a.shape[0],), float(s)) for _, a, _, s in lora]).to(w.device, w.dtype)
            signature = tuple((k, a.shape[0], float(s)) for k, a, _, s in lora)  # layers alike share a mask
            lora = (A, B, slot, scale, signature)
        ia3 = {}
        for ff in (True, False):
            if any(n in self.ia3 and self.ia3[n][1] == ff for n in names):
                ones = w.new_ones(self.base.in_features if ff else self.base.out_features)
                ia3[ff] = torch.stack([self.ia3[n][0] if n in self.ia3 and self.ia3[n][1] == ff else ones
                                       for n in names])
        dora = None
        if any(n in self.dora for n in names):
            zeros = w.new_zeros(self.base.out_features)
            dora = torch.stack([self.dora.get(n, zeros) for n in names])
        self._stacked = (names, (lora or None, ia3.get(True), ia3.get(False), dora))
        return self._stacked[1]

    def forward(self, x):
        r = self.routing
        if r is None or not any(n in self.lora or n in self.ia3 for n in r.names):
            return self.base(x)
        lora, ia3_in, ia3_out, dora = self.stacked(r.names)
        idx = r.index(x)
        y = self.base(x if ia3_in is None else x * ia3_in[idx])  # IA3 of a feed-forward layer scales its input
        if ia3_out is not None:
            y = y * ia3_out[idx]
        if dora is not None:  # s ⊙ (W x) + bias: the bias is not scaled (IA3's output scaling scales it)
            y = y + dora[idx] * (y if self.base.bias is None else y - self.base.bias)
        if lora is not None:
            A, B, slot, scale, signature = lora
            key = ("lora mask", signature, x.shape[0], x.dim(), x.dtype)
            if key not in r.cache:  # each row's own columns, times its scaling; zeros elsewhere
                r.cache[key] = (idx[..., None] == slot).to(scale.dtype) * scale
            y = y + F.linear(F.linear(x, A) * r.cache[key], B)
        return y

    def extra_repr(self):
        return f"lora={sorted(self.lora)}, dora={sorted(self.dora)}, ia3={sorted(self.ia3)}"


class MultiModule(nn.Module):
    """A module that adapters train and save whole (peft's modules_to_save: a layer norm, the classification
    head) with one copy per adapter: each row runs through its adapter's copy, or the base module for an
    adapter that did not train it. A layer norm normalises every row at once and gathers each row's weight
    and bias; other modules (heads) run once per span. Heads of different label counts give rows of
    different widths: the narrower are padded with -inf, which softmax turns into probability 0."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.copies = {}   # name -> the adapter's copy of base
        self.routing = None
        self._stacked = (None, None)

    @property
    def weight(self):  # for code that reads a layer norm's or a head's weight directly
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def remove(self, name):
        self.copies.pop(name, None)
        self._stacked = (None, None)

    def forward(self, x):
        r = self.routing
        if r is None or not any(n in self.copies for n in r.names):
            return self.base(x)
        if isinstance(self.base, nn.LayerNorm) and self.base.weight is not None and self.base.bias is not None:
            if self._stacked[0] != r.names:
                mods = [self.copies.get(n, self.base) for n in r.names]
                self._stacked = (r.names, (torch.stack([m.weight for m in mods]),
                                           torch.stack([m.bias for m in mods])))
            weight, bias = self._stacked[1]
            idx = r.index(x)
            return torch.addcmul(bias[idx], F.layer_norm(x, self.base.normalized_shape, eps=self.base.eps),
                                 weight[idx])
        outs = [self.copies.get(n, self.base)(x[s:e]) for n, s, e in r.spans(x)]
        width = max(o.shape[-1] for o in outs)
        outs = [o if o.shape[-1] == width else F.pad(o, (0, width - o.shape[-1]), value=float("-inf")) for o in outs]
        return torch.cat(outs)

    def extra_repr(self):
        return f"copies={sorted(self.copies)}"


class MultiVirtualTokens(nn.Module):
    """Prompt and prefix tuning adapters' virtual tokens (prompts.VirtualTokens), one table per adapter, as
    `model.virtual_tokens`: `classify` puts each row's own before it."""

    def __init__(self):
        super().__init__()
        self.tables = {}   # name -> VirtualTokens
        self.routing = None

    def remove(self, name):
        self.tables.pop(name, None)

    def extra_repr(self):
        return f"tables={sorted(self.tables)}"


ROUTED = (MultiAdapterLinear, MultiModule, MultiVirtualTokens)


def classify(model, idx, attention_mask):
    """The logits of a routed batch (right padded): model(idx, attention_mask), unless some of its adapters are
    prompt or prefix tuning; then (our GPT-2) each row runs as its adapter's VirtualTokens.classify runs it
    alone. A row is [its prompt's P embeddings, its tokens, padding] at positions from its prefix's P (0 without
    one); each layer's keys are [the prefixes' keys, padded to the longest, the row's own], and a row attends
    to its own prefix, then causally to its own real tokens; the head reads its last real token. Masked keys
    weigh exactly 0, so the rows are what they are alone, to float rounding."""
    virtual = model._modules.get("virtual_tokens")
    r = None if virtual is None else virtual.routing
    if r is None or not any(n in virtual.tables for n in r.names):
        return model(idx, attention_mask)
    B, T = idx.shape
    dev, tr, c = idx.device, model.transformer, model.config
    prompt, prefix = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)  # each row's P
    for n, s, e in r.rows:
        vt = virtual.tables.get(n)
        if vt is not None:
            (prompt if vt.kind == "prompt" else prefix)[s:e] = vt.num_virtual_tokens
    prompt, prefix = prompt.to(dev), prefix.to(dev)
    L, past = T + int(prompt.max()), int(prefix.max())  # a row's inputs; the keys before them
    tokens = tr.wte(idx)
    x = tokens.new_zeros(B, L, c.n_embd)
    kv = [tokens.new_zeros(2, B, c.n_head, past, c.n_embd // c.n_head) for _ in range(c.n_layer)] if past else None
    for n, s, e in r.rows:
        vt = virtual.tables.get(n)
        P = 0 if vt is None or vt.kind == "prefix" else vt.num_virtual_tokens
        x[s:e, P:P + T] = tokens[s:e]
        if P:
            x[s:e, :P] = vt.prompt(e - s)
        elif vt is not None:
            for layer, (k, v) in zip(kv, vt.prefix(e - s)):
                layer[:, s:e, :, :k.shape[2]] = torch.stack([k, v])
    ends = prompt + attention_mask.long().sum(1)  # each row's end of real inputs
    at = torch.arange(L, device=dev)
    positions = (prefix[:, None] + at).clamp(max=c.block_size - 1)  # only pads go past the end
    real = at < ends[:, None]
    own = (at[None, :, None] >= at[None, None, :]) & real[:, None, :] | (at[:, None] == at)[None]
    seen = (torch.arange(past, device=dev) < prefix[:, None])[:, None, :].expand(B, L, past)
    mask = torch.cat([seen, own], 2)[:, None]
    x = tr.drop(x + tr.wpe(positions))
    for i, block in enumerate(tr.h):
        x = block(x, mask, None, 0, None, None if kv is None else kv[i])  # kv[i]: (k, v)
    h = tr.ln_f(x)
    return model.score(h[torch.arange(B, device=dev), ends - 1])


def _set_module(model, name, module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def add_adapter(model, name, settings, tensors, head_names=("score",)):
    """Add adapter `name` to `model` for mixed batches: settings and tensors as utils.read_adapter gives them
    (kind, target_modules, feedforward_modules, r, lora_alpha, use_rslora; {our parameter name: tensor}), its
    layer norms and head (modules_to_save) kept as its own copies; a prompt or prefix adapter's table (our
    GPT-2 only) in model.virtual_tokens, for `classify`. Everything is checked before anything
    changes: ValueError (the model as it was) when the adapter does not fit. Returns its number of parameters."""
    kind, targets = settings["kind"], settings.get("target_modules") or ()
    table = None
    if kind in ("prompt", "prefix"):  # virtual tokens: no layer of its own; its head and norms as any adapter's
        table = virtual_table(model, settings, tensors)
        tensors = {k: t for k, t in tensors.items() if not k.startswith("prompt_encoder.")}
    feedforward = settings.get("feedforward_modules") or ()
    r, alpha = settings.get("r", 4), settings.get("lora_alpha", 4)
    scaling = alpha / math.sqrt(r) if settings.get("use_rslora") else alpha / r
    modules = dict(model.named_modules())
    layers = [n for n, m in modules.items() if matches(n, targets) and (
        isinstance(m, MultiAdapterLinear) or isinstance(m, nn.Linear) and not isinstance(m, ADAPTERS))]
    if not layers and table is None:
        linears = sorted({n.split(".")[-1] for n, m in modules.items() if isinstance(m, (nn.Linear, MultiAdapterLinear))
                          and not isinstance(modules.get(n.rpartition(".")[0]), MultiAdapterLinear)})
        raise ValueError(f"no linear layer matches its target modules {list(targets)} (this model's linear layers "
                         f"end in {linears}): it was trained on another architecture")
    wanted = {}  # tensor name -> expected shape
    for n in layers:
        base = modules[n].base if isinstance(modules[n], MultiAdapterLinear) else modules[n]
        if kind in ("lora", "dora"):
            wanted[f"{n}.lora_A"] = (r, base.in_features)
            wanted[f"{n}.lora_B"] = (base.out_features, r)
            if kind == "dora":
                wanted[f"{n}.lora_magnitude_vector"] = (base.out_features,)
        else:
            wanted[f"{n}.ia3_l"] = (base.in_features if matches(n, feedforward) else base.out_features,)
    saved = {}  # module name -> {parameter name: tensor}: the adapter's own layer norms and head
    for key, t in tensors.items():
        if key in wanted:
            if tuple(t.shape) != wanted[key]:
                raise ValueError(f"its tensor {key} has shape {tuple(t.shape)}, this model's layer wants "
                                 f"{wanted[key]}: it belongs to another model size")
            continue
        module, _, param = key.rpartition(".")
        own = modules.get(module)
        own = own.base if isinstance(own, MultiModule) else own
        if own is None or not isinstance(getattr(own, param, None), nn.Parameter):
            raise ValueError(f"its tensor {key} has no place in this model: it was trained on another architecture")
        expected = tuple(getattr(own, param).shape)
        head = module.split(".")[0] in head_names
        if tuple(t.shape) != expected and not (head and t.shape[1:] == expected[1:]):  # a head: any label count
            raise ValueError(f"its tensor {key} has shape {tuple(t.shape)}, this model's wants {expected}: it "
                             f"belongs to another model size")
        saved.setdefault(module, {})[param] = t
    lost = sorted(set(wanted) - set(tensors))
    if lost:
        raise ValueError(f"it lacks {len(lost)} of its adapter tensors (e.g. {lost[0]}): the file is incomplete")
    for module, params in saved.items():
        own = modules[module].base if isinstance(modules[module], MultiModule) else modules[module]
        missing = [p for p, _ in own.named_parameters(recurse=False) if p not in params]
        if missing:
            raise ValueError(f"it holds {module}.{next(iter(params))} but not {module}.{missing[0]}")
    heads = [h for h in head_names if h in modules and any(True for _ in modules[h].parameters())]
    if not heads or any(not any(m == h or m.startswith(h + ".") for m in saved) for h in heads):
        raise ValueError(f"it holds no classification head ({', '.join(h + '.weight' for h in head_names)}): it was "
                         f"not trained for sequence classification")

    if table is not None:  # the checks passed: install
        if "virtual_tokens" not in model._modules:
            model.virtual_tokens = MultiVirtualTokens()
        model.virtual_tokens.tables[name] = table
    for n in layers:
        layer = modules[n]
        if not isinstance(layer, MultiAdapterLinear):
            layer = MultiAdapterLinear(layer)
            _set_module(model, n, layer)
        w = layer.base.weight
        get = lambda key: tensors[key].to(w.device, w.dtype)  # noqa: E731
        if kind == "lora":
            layer.add_lora(name, get(f"{n}.lora_A"), get(f"{n}.lora_B"), scaling)
        elif kind == "dora":
            layer.add_dora(name, get(f"{n}.lora_A"), get(f"{n}.lora_B"), scaling, get(f"{n}.lora_magnitude_vector"))
        else:
            layer.add_ia3(name, get(f"{n}.ia3_l"), matches(n, feedforward))
    for module, params in saved.items():
        wrapper = modules[module]
        if not isinstance(wrapper, MultiModule):
            wrapper = MultiModule(wrapper)
            _set_module(model, module, wrapper)
        own = copy.deepcopy(wrapper.base).eval()
        for p, t in params.items():
            old = getattr(own, p)
            setattr(own, p, nn.Parameter(t.to(old.device, old.dtype), requires_grad=False))
        wrapper.copies[name] = own
        wrapper._stacked = (None, None)
    return sum(t.numel() for t in tensors.values()) + (0 if table is None else table.embedding.weight.numel())


def virtual_table(model, settings, tensors):
    """The VirtualTokens of a prompt or prefix adapter (prompts.read_tensors' settings and tensors), checked."""
    if not isinstance(model, GPT):
        raise ValueError(f"{settings['kind']} tuning is served in mixed batches on our GPT-2 only, and this base "
                         f"model is a transformers {type(model.hf).__name__}, whose forward cannot take other virtual "
                         f"tokens for every row; classify with it alone (`run.py predict --adapter`), or serve it on a "
                         f"GPT-2 base")
    vt = saved_tokens(model, settings, tensors)
    return vt.to(dtype=model.transformer.wte.weight.dtype).eval().requires_grad_(False)


def remove_adapter(model, name):
    """Take adapter `name` out of every routed layer (the layers stay, for the other adapters)."""
    for m in model.modules():
        if isinstance(m, ROUTED):
            m.remove(name)


def rename_adapter(model, old, new):
    """Adapter `old` goes by `new` in every routed layer (serve.py adds a replacement beside the adapter it
    replaces, under another name, so that a replacement that does not fit leaves the old one in place)."""
    for m in model.modules():
        tables = (m.lora, m.ia3, m.dora) if isinstance(m, MultiAdapterLinear) else (m.copies,) if isinstance(m, MultiModule) \
            else (m.tables,) if isinstance(m, MultiVirtualTokens) else ()
        for table in tables:
            if old in table:
                table[new] = table.pop(old)
        if isinstance(m, ROUTED):
            m._stacked = (None, None)


class routed:
    """with routed(model, Routing(...)): the next forwards run each span of rows with its own adapter."""

    def __init__(self, model, routing):
        self.layers, self.routing = [m for m in model.modules() if isinstance(m, ROUTED)], routing

    def __enter__(self):
        for m in self.layers:
            m.routing = self.routing

    def __exit__(self, *exc):
        for m in self.layers:
            m.routing = None
