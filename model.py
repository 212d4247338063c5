"""The models: a hand-written GPT-2, parameter-efficient adapters, and the DistilRNN student.

Read top to bottom: config -> attention -> MLP -> Block -> GPT (+ classifier) -> adapters -> the student.
Everything here is plain PyTorch; files and the hub are utils.py's business.
"""
import functools
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------- GPT-2

@dataclass
class GPTConfig:
    block_size: int = 1024   # longest sequence (GPT-2's n_positions)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.1     # GPT-2 uses one rate for embeddings, residuals and attention
    bias: bool = True
    layer_norm_epsilon: float = 1e-5


# Named checkpoints on the Hugging Face hub and their shapes.
PRETRAINED = {
    "gpt2":        ("openai-community/gpt2",        dict(n_layer=12, n_head=12, n_embd=768)),   # 124M
    "gpt2-medium": ("openai-community/gpt2-medium", dict(n_layer=24, n_head=16, n_embd=1024)),  # 350M
    "gpt2-large":  ("openai-community/gpt2-large",  dict(n_layer=36, n_head=20, n_embd=1280)),  # 774M
    "gpt2-xl":     ("openai-community/gpt2-xl",     dict(n_layer=48, n_head=25, n_embd=1600)),  # 1558M
    "distilgpt2":  ("distilbert/distilgpt2",        dict(n_layer=6, n_head=12, n_embd=768)),    # 82M
}


def dropout_keep(shape, p):
    """Which elements of `shape` a CPU dropout at rate p keeps: an int16 tensor, 1 where kept, each with
    probability 1 - p rounded to a multiple of 2^-15 (0.9 becomes 0.899994), else 0. Cheaper than torch's mask,
    which draws a float64 uniform per element (bernoulli_, on one core): 15 random bits per element, four
    elements from each 64-bit draw of the global generator (so the same seeding), kept when they are below
    (1 - p) * 2^15. That comparison is made in integer arithmetic, in place on the draws, because a comparison,
    which writes a bool per element, runs at a fifth of the speed of arithmetic on int16 (0.76 against 0.08 ms
    for 1.7M elements on an AMD EPYC): with b the 15 bits and T the threshold, b - T is negative exactly when
    b < T, and its sign bit shifted down, negated, is 1 there and 0 elsewhere. The same masks as the comparison,
    bit for bit."""
    threshold = round((1.0 - p) * 2 ** 15)
    n = math.prod(shape)
    draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_()  # uniform on [0, 2^63)
    if threshold >= 2 ** 15:  # p below 2^-16: every element kept (T does not fit in 15 bits)
        return torch.ones(shape, dtype=torch.int16)
    bits = draws.view(torch.int16)[:n]  # four uniform 15-bit numbers per draw, in the low bits
    bits.bitwise_and_(0x7FFF).sub_(threshold).bitwise_right_shift_(15).neg_()  # 1 where b < T, else 0
    return bits.view(shape)


def dropout_mask(shape, p, dtype=torch.float32):
    """dropout_keep's mask as factors: 1 / (1 - p) where an element is kept, else 0."""
    return dropout_keep(shape, p).to(dtype).mul_(1.0 / (1.0 - p))


class _Masked(torch.autograd.Function):
    """x times a mask of 0s and 1s, times a scale; autograd keeps the mask as one byte per element (uint8), not
    as the float factors x * mask would keep (4 bytes in float32): the masks of a LoRA step are a quarter of its
    saved activations."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.scale = scale
        ctx.save_for_backward(keep)
        return (x * keep).mul_(scale)  # no float mask made: x * 1 * s is x * s, bit for bit

    @staticmethod
    def backward(ctx, grad):
        keep, = ctx.saved_tensors
        return (grad * keep).mul_(ctx.scale), None, None


def cpu_dropout(x, p):
    """Dropout at rate p (0 < p < 1) of a CPU tensor in training: x * dropout_mask, the mask kept for the
    backward as one byte per element."""
    return _Masked.apply(x, dropout_keep(x.shape, p).to(torch.uint8), 1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """nn.Dropout with a cheaper random mask on the CPU (dropout_keep, cpu_dropout), where dropout is a large share
    of a LoRA training step. Faster on any CPU by construction, so not measured per machine: torch's CPU
    generator is one serial Mersenne twister everywhere, and its draws are most of the cost of torch's mask (a
    555 x 3072 activation on a Xeon with AVX-512: torch's bernoulli_ 8.6 ms, these draws 1.3 ms, at 1 thread as
    at 2). The whole mask against one 31-bit draw per element and torch's: 2.0, 4.1, 7.6 ms on a 2-core VM;
    4.0, 9.6, 10.1 ms on the 2-core Xeon (5.7, 10.1, 10.4 ms at 1 thread). Other devices (CUDA's fused kernel)
    are plain nn.Dropout; in evaluation the input itself, as nn.Dropout returns it."""

    def forward(self, x):
        if not self.training:
            return x
        if x.device.type != "cpu" or not 0 < self.p < 1 or self.inplace:
            return super().forward(x)
        return cpu_dropout(x, self.p)


# A product of a few rows with a weight (a decoding step: one token per sequence) is bound by reading the
# weight, and which kernel reads it fastest depends on the CPU and the row count: on a 2-core VM MKL's
# matrix-matrix kernel with the weight first, W @ [x; 0]^T, took a step's matmuls from 34.8 ms (x @ W^T) to
# 20.0 ms; on a 2-core Xeon with AVX-512 it takes twice as long as x @ W^T or the matrix-vector kernel for
# one row (2304 x 768: 392 us against 181 and 192 us) and wins at 8 rows (371 against 450 us); on an AMD EPYC
# with AVX-512 (and one with AVX2 only) x @ W with the weight stored [in, out], transformers' Conv1D layout,
# is the fastest for 2304 x 768 and 3072 x 768 (0.37 against 0.46 ms for W @ x^T and 0.63 ms for x @ W^T,
# the weight not in the cache). So model.Linear times these paths for each weight shape and row count the
# first time it meets them and runs the fastest (fewrows_path); the [in, out] layout is a transposed copy of
# the weight, made once by each layer that takes that path (Linear.transposed_weight; its memory:
# transposed_bytes). All compute the same sums in other orders: equal to float rounding.

def _linear(x, w, b):
    return F.linear(x, w, b)


def _weight_first(x, w, b):
    rows = x.shape[0]
    if rows == 1:  # one row would take the matrix-vector kernel again: pad it to two
        x = torch.cat([x, x.new_zeros(1, x.shape[1])])
    y = torch.addmm(b[:, None], w, x.t()) if b is not None else w @ x.t()
    # Contiguous rows, as the other paths give: strided ones would send attention's q (from c_attn) down SDPA's
    # math path (its flash kernel wants the last stride 1): 157 against 77 us a call in a profile of decoding.
    return y.t()[:rows].contiguous()


def _matrix_vector(x, w, b):
    return (torch.addmv(b, w, x[0]) if b is not None else torch.mv(w, x[0]))[None]


def _input_first(x, w, b, wt=None):
    """x @ W with W stored [in, out]: wt, the transposed copy of w (out, in) that model.Linear keeps where
    this path is chosen; made here when not given (a test's call, or a timing's)."""
    wt = w.t().contiguous() if wt is None else wt
    return torch.addmm(b, x, wt) if b is not None else x @ wt


# name -> f(x (rows, in), weight (out, in), bias or None) -> (rows, out); the paths of TRANSPOSED take a
# fourth argument, the weight's transposed copy (in, out).
FEWROWS_PATHS = {"x @ W^T": _linear, "W @ x^T": _weight_first, "matrix-vector": _matrix_vector,
                 "x @ W": _input_first}
TRANSPOSED = ("x @ W",)  # the paths that read a copy of the weight, stored [in, out]: memory besides the model
FEWROWS_CHOSEN = {}  # (out, in, bias?, rows, threads, dtype) -> the name of the fastest path, measured once


def fewrows_candidates(rows):
    return [name for name in FEWROWS_PATHS if rows == 1 or name != "matrix-vector"]


@functools.lru_cache(maxsize=None)
def largest_cache_bytes():
    """The size of this CPU's largest cache (its last level, as one core sees it: /sys on Linux, sysctl on
    macOS); 32 MiB where neither says."""
    import glob
    import subprocess
    sizes = []
    try:
        for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
            with open(path) as f:
                text = f.read().strip().upper()
            scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
        if not sizes:
            for key in ("hw.l3cachesize", "hw.l2cachesize"):
                out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5)
                if out.returncode == 0 and out.stdout.strip().isdigit():
                    sizes.append(int(out.stdout.strip()))
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    return max(sizes, default=32 * 2 ** 20)


def fewrows_timings(x, w, b, min_rounds=3, max_rounds=10, budget=0.05):
    """{path name: its fastest time in seconds} for x (rows, in) with this weight and bias: the candidates
    in turns, after one untimed round that allocates, for min_rounds, then on up to max_rounds while under
    `budget` seconds of products in all. The fastest of several turns, so that a busy spell of a shared machine
    (which stalls a call by a time slice) rarely decides. With the copies below, 0.1-0.3 s for each of GPT-2's
    block shapes and about 0.8 s for its 50257-row head on a 2-core AMD EPYC, once per process (1.5 s before
    the first token: 0.2 s when the timings read the weight from the cache, and chose wrongly).
    Each call reads a weight that is not in the cache, as decoding does (it streams every weight of the model
    once a step; a weight read again at once is read from the cache, which favours other kernels: on an AMD
    EPYC, 2304 x 768, x @ W^T 0.13 ms hot, 0.63 ms cold, W @ x^T 0.36 and 0.46 ms): the calls go round
    copies of the weight, in each layout, that together exceed twice the largest cache."""
    names = fewrows_candidates(x.shape[0])
    calls = (max_rounds + 1) * len(names)
    size = w.numel() * w.element_size()
    # k copies of the weight that the calls take in turn: between two reads of one copy, at least 2 caches' worth
    # of other weights (a weight larger than that reads cold every time; a tiny one gets a copy a call, all in
    # the cache, as a tiny model's decoding has them).
    k = 1 if size >= 2 * largest_cache_bytes() else min(calls, 2 + 2 * largest_cache_bytes() // max(1, size))
    with torch.no_grad():
        weights = w.detach()[None] if k == 1 else w.detach().expand(k, *w.shape).contiguous()
        transposed = None
        if set(TRANSPOSED) & set(names):  # transposed once, then copied in order (a strided copy is slower)
            transposed = w.detach().t().contiguous()[None]
            transposed = transposed if k == 1 else transposed.expand(k, *w.shape[::-1]).contiguous()
    best = dict.fromkeys(names, math.inf)
    spent, turn = 0.0, 0
    for r in range(max_rounds + 1):
        if r > min_rounds and spent > budget:
            break
        for name in names:
            i, turn = turn % k, turn + 1
            args = (x, weights[i], b) if name not in TRANSPOSED else (x, weights[i], b, transposed[i])
            t0 = time.perf_counter()
            FEWROWS_PATHS[name](*args)
            seconds = time.perf_counter() - t0
            if r:
                best[name] = min(best[name], seconds)
                spent += seconds
    return best


def fewrows_path(x, w, b):
    """The name of the fastest path for x (rows, in) times this weight on this machine, measured the first
    time its shape, row count, torch thread count and dtype occur in this process."""
    key = (*w.shape, b is not None, x.shape[0], torch.get_num_threads(), w.dtype)
    if key not in FEWROWS_CHOSEN:
        FEWROWS_CHOSEN[key] = fewrows_choice(fewrows_timings(x, w, b))
    return FEWROWS_CHOSEN[key]


def fewrows_choice(timings, default="x @ W^T", margin=0.95):
    """nn.Linear's own path unless another is clearly faster (a near tie is the machine's noise); a path that
    needs a transposed copy of the weight (memory) only when it is also clearly faster than the fastest path
    that needs none."""
    plain = {k: t for k, t in timings.items() if k not in TRANSPOSED}
    choice = min(plain, key=plain.get)
    if timings[choice] >= margin * timings[default]:
        choice = default
    copying = {k: t for k, t in timings.items() if k in TRANSPOSED}
    if copying:
        fastest = min(copying, key=copying.get)
        if timings[fastest] < margin * timings[choice]:
            choice = fastest
    return choice


class Linear(nn.Linear):
    """nn.Linear, except for a few rows at inference on the CPU, which take whichever of FEWROWS_PATHS this
    machine runs fastest for the weight's shape (fewrows_path). Training, autocast, longer inputs and other
    devices take nn.Linear's own path."""
    SMALL = 8  # decoding's row counts (one per sequence); a prompt's prefill, run once, is nn.Linear's

    def forward(self, x):
        if torch.is_grad_enabled() or x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return super().forward(x)
        rows = x.numel() // max(1, x.shape[-1])
        if not 0 < rows <= self.SMALL:
            return super().forward(x)
        x2 = x if x.dim() == 2 else x.reshape(rows, x.shape[-1])
        name = fewrows_path(x2, self.weight, self.bias)
        if name in TRANSPOSED:
            y = FEWROWS_PATHS[name](x2, self.weight, self.bias, self.transposed_weight())
        else:
            y = FEWROWS_PATHS[name](x2, self.weight, self.bias)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def transposed_weight(self):
        """The weight stored [in, out], for the paths of TRANSPOSED: a copy made the first time, and again only
        when the weight has changed since (an adapter merged into it, a load, a move); dropped when the layer
        goes back to training (train()), where nn.Linear's path never reads it."""
        w = self.weight
        try:
            version = w._version
        except RuntimeError:  # an inference tensor keeps no version: it cannot change in place either
            version = None
        key = (w.data_ptr(), version, w.dtype, w.device, tuple(w.shape))
        copy = self.__dict__.get("_transposed")
        if copy is None or copy[0] != key:
            with torch.no_grad():
                copy = self.__dict__["_transposed"] = (key, w.detach().t().contiguous())
        return copy[1]

    def train(self, mode=True):
        if mode:
            self.__dict__.pop("_transposed", None)
        return super().train(mode)


def transposed_bytes(module):
    """The memory of the transposed weight copies that module's model.Linear layers hold now, in bytes."""
    return sum(m.__dict__["_transposed"][1].nbytes for m in module.modules()
               if isinstance(m, Linear) and "_transposed" in m.__dict__)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must split evenly into heads"
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x, mask=None, cache=None, pos=0, packing=None, prefix=None):
        """x: (B, T, C), or (N, C) real tokens only when `packing` (a Packing) is given.
        mask: None (plain causal) or a boolean (B, 1, T, keys) 'may attend' mask.
        cache: None or a (k, v) pair of preallocated (B, nh, block_size, hs) tensors that this call
        fills at positions pos..pos+T-1 and then attends over (the KV cache of generation).
        prefix: None or a (k, v) pair (B, nh, P, hs) of keys and values before the tokens' own (prefix tuning)."""
        qkv = self.c_attn(x)
        dropout = self.dropout if self.training else 0.0
        # Training with dropout on the CPU, packed: PackedAttention, which keeps less for the backward. Below, the
        # rest: inference, no dropout, other devices, caches and prefixes.
        if packing is not None and 0 < dropout < 1 and qkv.device.type == "cpu" and cache is None and prefix is None:
            return self.resid_dropout(self.c_proj(PackedAttention.apply(qkv, packing, self.n_head, dropout)))
        if packing is not None:
            qkv = packing.unpack(qkv)  # back to (B, T, 3C) for attention, zeros at the pads
        B, T, _ = qkv.shape
        C = self.n_embd
        q, k, v = qkv.split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            assert pos == 0 or T == 1 or mask is not None, "a prefill after a prefix needs its mask"
            cache[0][:, :, pos:pos + T] = k
            cache[1][:, :, pos:pos + T] = v
            k, v = cache[0][:, :, :pos + T], cache[1][:, :, :pos + T]
        if prefix is not None:
            k, v = torch.cat([prefix[0], k], 2), torch.cat([prefix[1], v], 2)
        if 0 < dropout < 1 and q.device.type == "cpu":
            y = attention_with_dropout(q, k, v, mask, dropout)
        elif mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        else:
            # One new token attends to everything before it: no mask needed.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T > 1)
        y = y.transpose(1, 2).reshape(B, T, C)
        if packing is not None:
            y = packing.pack(y)
        return self.resid_dropout(self.c_proj(y))


ATTENTION_BLOCK = 256  # queries a block in attention_with_dropout


def attention_with_dropout(q, k, v, mask, p):
    """softmax(q k^T / sqrt(head size), masked) with dropout at rate p, times v: what SDPA computes on the CPU when
    it has a dropout (its math path, which makes the whole B x heads x T x keys matrix of weights), with
    cpu_dropout's mask instead of its float64 draw per attention weight, and in blocks of ATTENTION_BLOCK queries:
    plain causal attention then computes each block against the keys up to its last query only, about half the
    work for long inputs, and every block's weights are a fraction of the whole matrix. On a 2-core AMD EPYC, one
    thread, 2 rows of 704 tokens, 12 heads, forward and backward: SDPA with dropout 642 ms, the whole matrix with
    this mask 563 ms, in blocks of 256 queries 208 ms (SDPA without dropout, its flash kernel: 185 ms).
    mask: None for plain causal attention (as many keys as queries), or a boolean 'may attend' mask that
    broadcasts to (B, heads, T, keys)."""
    T, n = q.shape[-2], ATTENTION_BLOCK
    if mask is None:  # query s + i sees keys 0 .. s + i
        blocks = [cpu_dropout(_softmax_weights(q[..., s:e, :], k[..., :e, :], bias), p) @ v[..., :e, :]
                  for s, e, bias in _causal_blocks(T, q.device)]
    else:
        blocks = [_attention_block(q[..., s:s + n, :], k, v, mask[..., s:s + n, :] if mask.shape[-2] > 1 else mask, p)
                  for s in range(0, T, n)]
    return torch.cat(blocks, -2) if len(blocks) > 1 else blocks[0]


class PackedAttention(torch.autograd.Function):
    """Causal attention with dropout over a packed batch (Packing), in training on the CPU: what
    attention_with_dropout computes for plain causal attention (mask None) on the unpacked q, k and v, with the
    same draws, and what it keeps for the backward is less. Autograd would keep q, k and v in the padded (B, T)
    layout, as bmm's copies (a CoLA batch of 32 is mostly padding), the softmax's weights and the dropped-out
    weights besides; this keeps the packed qkv (N x 3C, the real tokens: c_attn's own output, no copy), the
    weights and the dropout's byte mask, and in the backward unpacks qkv again and multiplies weights by mask
    again. On a CoLA batch of 32 x 29 tokens (329 real) in GPT-2: a layer keeps 4.4 MiB instead of 13.8, a
    training step 231 MB instead of 344. Differentiable once (a second derivative raises).
    qkv: (N, 3C) -> (N, C)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, qkv, packing, n_head, p):
        q, k, v = _heads(packing.unpack(qkv), n_head)
        weights, keeps, ys = [], [], []
        for s, e, bias in _causal_blocks(q.shape[-2], q.device):
            w = _softmax_weights(q[..., s:e, :], k[..., :e, :], bias)
            keep = dropout_keep(w.shape, p).to(torch.uint8)
            ys.append((w * keep).mul_(1.0 / (1.0 - p)) @ v[..., :e, :])
            weights.append(w)
            keeps.append(keep)
        ctx.packing, ctx.n_head, ctx.p = packing, n_head, p
        ctx.save_for_backward(qkv, *weights, *keeps)
        y = torch.cat(ys, -2) if len(ys) > 1 else ys[0]
        return packing.pack(y.transpose(1, 2).flatten(2))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        qkv, *saved = ctx.saved_tensors
        weights, keeps = saved[:len(saved) // 2], saved[len(saved) // 2:]
        q, k, v = _heads(ctx.packing.unpack(qkv), ctx.n_head)
        B, nh, T, hs = q.shape
        dy = ctx.packing.unpack(grad).view(B, T, nh, hs).transpose(1, 2)
        dqkv = qkv.new_zeros(B, T, qkv.shape[-1])  # the gradient in qkv's own layout: no shuffle after
        dq, dk, dv = _heads(dqkv, nh)
        scale, factor = 1.0 / math.sqrt(hs), 1.0 / (1.0 - ctx.p)
        for s, w, keep in zip(range(0, T, ATTENTION_BLOCK), weights, keeps):
            e = s + w.shape[-2]  # queries s..e-1 saw the keys 0..e-1
            dv[..., :e, :] += ((w * keep).mul_(factor)).transpose(-2, -1) @ dy[..., s:e, :]
            dw = (dy[..., s:e, :] @ v[..., :e, :].transpose(-2, -1)).mul_(keep).mul_(factor)
            ds = w * (dw - (dw * w).sum(-1, keepdim=True)) * scale  # softmax's backward, then q k^T's scale
            dq[..., s:e, :] = ds @ k[..., :e, :]
            dk[..., :e, :] += ds.transpose(-2, -1) @ q[..., s:e, :]
        return ctx.packing.pack(dqkv), None, None, None


def _heads(qkv, n_head):
    """(B, T, 3C) -> q, k, v, each (B, heads, T, head size)."""
    B, T, C3 = qkv.shape
    return qkv.view(B, T, 3, n_head, C3 // (3 * n_head)).permute(2, 0, 3, 1, 4).unbind(0)


def _causal_blocks(T, device):
    """attention_with_dropout's blocks of queries for plain causal attention: (start, end, bias), where the
    queries start..end-1 see the keys 0..end-1 and bias (0 or -inf) masks the later ones."""
    for s in range(0, T, ATTENTION_BLOCK):
        e = min(T, s + ATTENTION_BLOCK)
        yield s, e, _bias(torch.ones(e - s, e, dtype=torch.bool, device=device).tril_(s))


def _bias(mask):
    """A boolean 'may attend' mask as an additive bias (0 or -inf): an addition runs several times faster than
    masked_fill."""
    return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))


def _softmax_weights(q, k, bias):
    att = (q @ k.transpose(-2, -1)).mul_(1.0 / math.sqrt(q.shape[-1]))
    return att.add_(bias.to(att.dtype)).softmax(-1)


def _attention_block(q, k, v, mask, p):
    return cpu_dropout(_softmax_weights(q, k, _bias(mask)), p) @ v


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)

    def forward(self, x):
        # GPT-2 uses the tanh approximation of GELU ("gelu_new"); the exact erf GELU differs by ~1e-3.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, cache=None, pos=0, packing=None, prefix=None):
        x = x + self.attn(self.ln_1(x), mask, cache, pos, packing, prefix)
        return x + self.mlp(self.ln_2(x))


def padding_mask(attention_mask, past=0):
    """(B, T) 1-for-real/0-for-pad -> boolean (B, 1, T, past + T) mask: causal AND key is real, for tokens
    at positions past..past+T-1 after `past` keys that are all real (a cache's, a prefix's).
    Every position may also see itself, so a pad row is never all-False (SDPA would give NaN);
    real positions are unaffected, they see themselves anyway."""
    T, device = attention_mask.shape[1], attention_mask.device
    query, key = torch.arange(past, past + T, device=device)[:, None], torch.arange(past + T, device=device)
    real = F.pad(attention_mask.bool(), (past, 0), value=True)
    return (key <= query) & real[:, None, None, :] | (key == query)


class Packing:
    """A right-padded batch with its padding taken out: the real tokens of all rows one after the
    other, as (N, C). Everything but attention works token by token, so the matmuls, layer norms,
    MLPs and dropouts run on the N real tokens only (CoLA batches are about half padding).
    Attention puts q, k, v back in (B, T) place, where plain causal attention is exact for every real
    token: with right padding a real token only ever looks back at real tokens."""

    def __init__(self, attention_mask):
        self.B, self.T = attention_mask.shape
        self.index = attention_mask.reshape(-1).nonzero().squeeze(1)  # where the real tokens sit in B*T
        # Row i's last real token, in packed order.
        self.last = attention_mask.long().sum(1).cumsum(0) - 1

    @staticmethod
    def worthwhile(attention_mask):
        """Right padding (each row: ones, then zeros; at least one real token) with some padding."""
        m = attention_mask.bool()
        return not bool(m.all()) and bool(m[:, 0].all()) and bool((m[:, 1:] <= m[:, :-1]).all())

    def pack(self, x):
        """(B, T, ...) -> (N, ...)"""
        return x.reshape(self.B * self.T, *x.shape[2:]).index_select(0, self.index)

    def unpack(self, x):
        """(N, D) -> (B, T, D), zeros at the pads."""
        full = x.new_zeros(self.B * self.T, x.shape[-1])  # index_put_'s backward keeps the index, index_copy_'s x too
        return full.index_put_((self.index,), x).view(self.B, self.T, -1)


class GPT(nn.Module):
    """GPT-2 with module names as in transformers (transformer.h.0.attn.c_attn, ...), so that
    checkpoints load by name and adapters target the same names in ours and theirs."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        # GPT-2's initialisation; only matters for models trained from scratch (tests, tiny demos).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def hidden_states(self, idx, attention_mask=None, cache=None, pos=0, packing=None, prompt=None, prefix=None):
        """(B, T) token ids -> (B, T, n_embd) final hidden states (after ln_f); with a Packing,
        (N, n_embd) for the real tokens only (attention_mask is then not needed).
        The virtual tokens of prompts.py, neither with a Packing: prompt (B, P, n_embd), embeddings put before
        the tokens' own (prompt tuning; the output then has P + T rows); prefix, one (k, v) pair (B, nh, P, hs)
        a layer that the tokens attend to before themselves, as to a cache (prefix tuning: their positions
        start at P)."""
        B, T = idx.shape
        x = self.transformer.wte(idx if packing is None else packing.pack(idx))
        if prompt is not None:
            x, T = torch.cat([prompt, x], 1), T + prompt.shape[1]
            attention_mask = None if attention_mask is None else F.pad(attention_mask, (prompt.shape[1], 0), value=1)
        if prefix is not None:
            assert cache is None and pos == 0, "a prefix is the past: no cache besides"
            pos = prefix[0][0].shape[2]
        assert pos + T <= self.config.block_size, f"sequence of {pos + T} tokens > block_size {self.config.block_size}"
        positions = torch.arange(pos, pos + T, device=idx.device)
        if packing is not None:
            assert prompt is None and prefix is None, "virtual tokens are not packed"
            positions = positions.expand(B, T).reshape(-1)[packing.index]
            mask = None
        elif attention_mask is None or bool(attention_mask.all()):
            # Plain causal attention: SDPA's faster is_causal path, unless several tokens follow a past.
            mask = None if pos == 0 or T == 1 else padding_mask(idx.new_ones(B, T), past=pos)
        else:
            mask = padding_mask(attention_mask, past=pos)
        x = self.transformer.drop(x + self.transformer.wpe(positions))
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, None if cache is None else cache[i], pos, packing, None if prefix is None else prefix[i])
        return self.transformer.ln_f(x)

    def forward(self, idx, attention_mask=None):
        """Language-model logits (B, T, vocab_size)."""
        return self.lm_head(self.hidden_states(idx, attention_mask))

    def new_cache(self, batch_size, length=None):
        """One preallocated (k, v) pair per layer, so decoding never copies the past."""
        c = self.config
        length = length or c.block_size
        p = self.lm_head.weight
        shape = (batch_size, c.n_head, length, c.n_embd // c.n_head)
        return [(torch.empty(shape, dtype=p.dtype, device=p.device),
                 torch.empty(shape, dtype=p.dtype, device=p.device)) for _ in range(c.n_layer)]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 generator=None, eos_token_id=None, num_samples=1):
        """Yields (B,) tensors of new token ids, one step at a time, with a KV cache.
        temperature 0 = greedy. Stops after max_new_tokens, at the block size, or when every
        row has produced eos_token_id (if given). num_samples K > 1 decodes K continuations of a
        one-row prompt as one batch: one prefill, its cache copied to K rows; then `generator` is a
        list of K generators, one per row, so a sample does not depend on how many are drawn with it."""
        B, T = idx.shape
        assert num_samples == 1 or B == 1, "several samples are drawn from one prompt"
        virtual = self._modules.get("prompt_encoder")  # prompt or prefix tuning's tokens before the prompt
        P = 0 if virtual is None else virtual.num_virtual_tokens
        max_new_tokens = min(max_new_tokens, self.config.block_size - P - T)
        if max_new_tokens <= 0:
            return
        cache = self.new_cache(B, P + T + max_new_tokens)
        # Prefill: only the last position's logits are needed.
        h = self.hidden_states(idx, cache=cache) if virtual is None else virtual.prefill(self, idx, cache)
        logits = self.lm_head(h[:, -1])
        if num_samples > 1:  # decoding a batch of K costs about what one row does: it is bound by weight reads
            cache = [(k.expand(num_samples, -1, -1, -1).clone(), v.expand(num_samples, -1, -1, -1).clone())
                     for k, v in cache]
            logits = logits.expand(num_samples, -1)
        done = torch.zeros(logits.shape[0], dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            nxt = sample_next(logits.float(), temperature, top_k, top_p, generator)
            yield nxt
            if eos_token_id is not None:
                done |= nxt == eos_token_id
                if bool(done.all()):
                    return
            if step + 1 < max_new_tokens:
                logits = self.lm_head(self.hidden_states(nxt[:, None], cache=cache, pos=P + T + step)[:, -1])

    @classmethod
    def from_state_dict(cls, config, sd, **kwargs):
        """Build from a transformers GPT-2 state dict (names with or without 'transformer.' prefix).
        Every tensor must map and match in shape: a partial load is an error, never silent."""
        model = cls(config, **kwargs)
        ours = {k: v for k, v in model.state_dict().items()
                if k.startswith("transformer.") and not k.endswith(".attn.bias")}
        theirs, head = {}, sd.get("score.weight")  # a GPT2ForSequenceClassification checkpoint's head
        for k, v in sd.items():
            if k == "score.weight":
                continue
            k = k if k.startswith("transformer.") or k == "lm_head.weight" else "transformer." + k
            # Buffers (causal-mask 'bias', 'masked_bias') and the tied lm_head carry no weights of their own.
            if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
                continue
            theirs[k] = v
        missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match a GPT-2 of this shape: missing {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                             f"{' ...' if len(unexpected) > 8 else ''}")
        conv1d = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
        with torch.no_grad():
            for k, target in ours.items():
                src = theirs[k]
                if k.endswith(conv1d):
                    src = src.t()  # transformers' Conv1D stores the weight as (in, out); nn.Linear as (out, in)
                if src.shape != target.shape:
                    raise ValueError(f"checkpoint tensor {k} has shape {tuple(src.shape)}, "
                                     f"expected {tuple(target.shape)}")
                target.copy_(src)
            if head is not None and hasattr(model, "score") and head.shape == model.score.weight.shape:
                model.score.weight.copy_(head)
        return model


class GPTClassifier(GPT):
    """GPT-2 + a bias-free linear head on the last real token, like transformers'
    GPT2ForSequenceClassification (same module name, `score`, so its weights map both ways)."""

    def __init__(self, config, num_labels=2):
        super().__init__(config)
        self.score = nn.Linear(config.n_embd, num_labels, bias=False)
        nn.init.normal_(self.score.weight, std=0.02)

    def forward(self, idx, attention_mask=None):
        if "prompt_encoder" in self._modules:  # prompt or prefix tuning: prompts.py puts its tokens first
            return self.prompt_encoder.classify(self, idx, attention_mask)
        if attention_mask is not None and Packing.worthwhile(attention_mask):
            # Only the last real token of each row is classified: compute real tokens only.
            packing = Packing(attention_mask)
            return self.score(self.hidden_states(idx, packing=packing)[packing.last])
        h = self.hidden_states(idx, attention_mask)  # (B, T, C)
        if attention_mask is None:
            last = torch.full((idx.shape[0],), idx.shape[1] - 1, device=idx.device)
        else:
            # The rightmost real token, whichever side the padding is on.
            positions = torch.arange(idx.shape[1], device=idx.device)
            last = (positions * attention_mask.long()).argmax(-1)
        return self.score(h[torch.arange(idx.shape[0], device=idx.device), last])


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """(B, V) logits -> (B,) next token ids. temperature 0 means greedy. With top_k the draw is among the
    k likeliest tokens alone (k numbers to draw from, not the vocabulary's 50k: a draw over the whole
    vocabulary took 0.7 ms of a 19 ms decoding step here, per row)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    candidates = None  # the token ids that logits' columns stand for, when not the whole vocabulary
    if top_k is not None and top_k < logits.shape[-1]:
        logits, candidates = torch.topk(logits, top_k)  # sorted, likeliest first
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = (logits, None) if candidates is not None else torch.sort(logits, descending=True)
        p = sorted_logits.softmax(-1)
        drop = p.cumsum(-1) - p > top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.masked_fill(drop if order is None else drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    if isinstance(generator, (list, tuple)):  # one generator per row: each row's draws its own
        assert len(generator) == probs.shape[0], "one generator per row"
        picks = torch.cat([torch.multinomial(p[None], 1, generator=g) for p, g in zip(probs, generator)])
    else:
        picks = torch.multinomial(probs, 1, generator=generator)
    return (picks if candidates is None else candidates.gather(1, picks)).squeeze(1)


# --------------------------------------------------------------------------- adapters

class LoRALinear(nn.Module):
    """base(x) + B(A(dropout(x))) * scaling, with the base layer frozen.
    B starts at zero, so injecting an adapter never changes the model's outputs."""

    def __init__(self, base: nn.Linear, r=4, alpha=4.0, dropout=0.0, rslora=False):
        super().__init__()
        assert r > 0, "LoRA rank must be positive"
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.dropout = Dropout(dropout)
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.merged = False

    def delta_weight(self):
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merge(self):
        """Fold B·A·scaling into the base weight: inference at the base layer's speed."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        delta = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        # alpha == r (our default) scales by exactly 1: skip a pass over the output, forward and backward.
        return y + (delta if self.scaling == 1 else delta * self.scaling)

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


class IA3Linear(nn.Module):
    """(IA)^3: a learned vector, initialised to ones (a no-op), that rescales the layer's output,
    or, for feed-forward layers, its input."""

    def __init__(self, base: nn.Linear, feedforward=False):
        super().__init__()
        self.base = base
        self.feedforward = feedforward
        n = base.in_features if feedforward else base.out_features
        self.ia3_l = nn.Parameter(torch.ones(n, device=base.weight.device))
        self.merged = False

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            if self.feedforward:
                self.base.weight *= self.ia3_l[None, :]
            else:
                self.base.weight *= self.ia3_l[:, None]
                if self.base.bias is not None:
                    self.base.bias *= self.ia3_l
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:  # exact up to rounding while no entry of ia3_l is zero
            if self.feedforward:
                self.base.weight /= self.ia3_l[None, :]
            else:
                self.base.weight /= self.ia3_l[:, None]
                if self.base.bias is not None:
                    self.base.bias /= self.ia3_l
            self.merged = False

    def forward(self, x):
        if self.merged:
            return self.base(x)
        if self.feedforward:
            return self.base(x * self.ia3_l)
        return self.base(x) * self.ia3_l

    def extra_repr(self):
        return f"feedforward={self.feedforward}, merged={self.merged}"


class DoRALinear(LoRALinear):
    """DoRA (weight-decomposed LoRA, Liu et al. 2024), as peft's use_dora computes it: the adapted weight
    W + scaling·B·A split into a direction, normalised per output row, and a learned magnitude m per output,
    y = m / ||W + scaling·B·A|| ⊙ (W x + scaling·B·A x) + bias. m starts at ||W||'s rows (with B = 0 a no-op).
    The norm is a constant for the gradient (detached: the paper's §4.3, and peft); it is recomputed every
    forward, since B·A changes while training."""

    def __init__(self, base: nn.Linear, r=4, alpha=4.0, dropout=0.0, rslora=False):
        super().__init__(base, r=r, alpha=alpha, dropout=dropout, rslora=rslora)
        # peft's name, so our adapter files carry peft's key (...lora_magnitude_vector).
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm())
        self.merged_scale = None  # m / ||W + scaling·B·A|| as merged, to divide out again on unmerging

    @torch.no_grad()
    def weight_norm(self):
        """||W + scaling·B·A|| of each output row (out,), in float32, without a gradient."""
        return torch.linalg.vector_norm(self.base.weight.float() + self.delta_weight().float(), dim=1)

    def scale(self):
        return self.lora_magnitude_vector / self.weight_norm()

    @torch.no_grad()
    def merge(self):
        """W <- m / ||W + scaling·B·A|| ⊙ (W + scaling·B·A): the bias stays as it is."""
        if not self.merged:
            s = self.scale()
            w = self.base.weight
            w.copy_((s[:, None] * (w.float() + self.delta_weight().float())).to(w.dtype))
            self.merged_scale, self.merged = s, True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:  # exact up to rounding while no entry of m is zero
            w = self.base.weight
            w.copy_((w.float() / self.merged_scale[:, None] - self.delta_weight().float()).to(w.dtype))
            self.merged_scale, self.merged = None, False

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        s = self.scale()
        if self.training and self.dropout.p > 0:
            # peft's choice: with dropout, the magnitude's term W x sees the dropped-out input as B·A does.
            x = self.dropout(x)
            wx = F.linear(x, self.base.weight)
        else:
            wx = y if self.base.bias is None else y - self.base.bias
        delta = F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling
        return y + (s - 1) * wx + s * delta

    def extra_repr(self):
        return super().extra_repr() + ", dora=True"


ADAPTERS = (LoRALinear, IA3Linear)  # DoRALinear is a LoRALinear
LORA_KINDS = {"lora": LoRALinear, "dora": DoRALinear}  # the kinds with a rank and a scaling (IA3 has neither)
GPT2_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def matches(name, targets):
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_adapters(model, kind="lora", target_modules=GPT2_TARGETS, feedforward_modules=(),
                    r=4, alpha=4.0, dropout=0.0, rslora=False):
    """Replace every nn.Linear whose qualified name ends with one of target_modules by an adapter
    around it. Works on any nn.Module tree (ours, or a transformers model). Returns the names."""
    assert kind in ("lora", "dora", "ia3"), f"unknown adapter kind {kind!r}"
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and not isinstance(m, ADAPTERS) and matches(n, target_modules)]
    if not names:
        linears = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no nn.Linear matches target modules {list(target_modules)}; "
                         f"this model's linear layers end in {linears}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if kind in LORA_KINDS:
            adapter = LORA_KINDS[kind](base, r=r, alpha=alpha, dropout=dropout, rslora=rslora)
        else:
            adapter = IA3Linear(base, feedforward=matches(name, feedforward_modules))
        adapter.train(base.training)  # a model in eval mode stays so: no LoRA dropout at inference
        setattr(parent, child, adapter)
    return names


def adapter_modules(model):
    return [m for m in model.modules() if isinstance(m, ADAPTERS)]


def merge_adapters(model, merge=True):
    for m in adapter_modules(model):
        m.merge() if merge else m.unmerge()


def remove_adapters(model, merge=False):
    """Undo inject_adapters: put each adapter's base layer back in its place, unmerged (the base model again),
    or with merge=True with the adapter folded in (peft's merge_and_unload: one plain model, no adapter left)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, ADAPTERS):
            m.merge() if merge else m.unmerge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, m.base)


def is_norm(module):
    """A layer norm, ours or a transformers model's: nn.LayerNorm and nn.RMSNorm, or a class of its own whose
    name says so (LlamaRMSNorm, T5LayerNorm, ... subclass nothing but nn.Module)."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def mark_trainable(model, train_layernorm=True, head_names=("score",)):
    """Freeze everything, then unfreeze the adapters, the layer norms (optional) and the heads (modules whose
    own name, the last part of the qualified one, is in head_names). Returns the names of the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in adapter_modules(model):
        for n, p in m.named_parameters():
            if not n.startswith("base."):
                p.requires_grad_(True)
    for name, m in model.named_modules():
        if (train_layernorm and is_norm(m)) or name.split(".")[-1] in head_names:
            for p in m.parameters():
                p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def cast_frozen_linears(model, dtype):
    """The frozen base layers of the adapters (LoRA's and IA3's) in dtype, for training under autocast to
    dtype: autocast casts a weight that needs no gradient again at every forward (it caches only the casts of
    trainable leaves), which for GPT-2 is a copy of every weight every step, a tenth of a bf16 CPU step. Cast
    once, the products are the same (the same rounding of the same weights) and the base takes half the
    memory. Only for autocast: outside it these layers want inputs in dtype."""
    for m in adapter_modules(model):
        if not any(p.requires_grad for p in m.base.parameters()):
            m.base.to(dtype)


# --------------------------------------------------------------------------- the student

@dataclass
class RNNConfig:
    vocab_size: int = 50257
    num_labels: int = 2
    rnn_type: str = "gru"        # gru, lstm, or rnn (the plain tanh RNN of the course assignment)
    emb_dim: int = 64
    hidden: int = 128
    n_layers: int = 1
    bidirectional: bool = True
    pool: str = "max"            # last (final hidden states), mean or max over the real tokens
    dropout: float = 0.2
    rows: int = 0                # embedding rows: 0 = one per token id; else a vocabulary cut to the data


class DistilRNN(nn.Module):
    """The student: token embedding -> recurrent encoder -> pooled sentence vector -> dropout -> linear.
    Padding never reaches the sentence vector, on whichever side it is (tested)."""

    def __init__(self, config):
        super().__init__()
        assert config.rnn_type in ("gru", "lstm", "rnn"), f"unknown rnn_type {config.rnn_type!r}"
        assert config.pool in ("last", "mean", "max"), f"unknown pool {config.pool!r}"
        self.config = config
        self.embed = nn.Embedding(config.rows or config.vocab_size, config.emb_dim)
        if config.rows:
            # The vocabulary cut to the data: tokenizer id -> embedding row (0, the unknown token, for the ids
            # the data never had). A buffer, so it is saved in student.safetensors and applied wherever the
            # student runs: the tokenizer's ids go in, as for a full-vocabulary student.
            self.register_buffer("vocab_map", torch.zeros(config.vocab_size, dtype=torch.int32))
        rnn = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}[config.rnn_type]
        self.rnn = rnn(config.emb_dim, config.hidden, num_layers=config.n_layers, batch_first=True,
                       bidirectional=config.bidirectional, dropout=config.dropout if config.n_layers > 1 else 0.0)
        self.dropout = nn.Dropout(config.dropout)
        self.score = nn.Linear(config.hidden * (2 if config.bidirectional else 1), config.num_labels)

    def keep_tokens(self, token_ids):
        """Cut the vocabulary to token_ids (config.rows - 1 distinct ids): each gets a row, in order, after the
        unknown token's row 0, which starts at zero (no token of the data trains it: an unseen token adds
        nothing to the sentence)."""
        kept = torch.as_tensor(sorted(token_ids), dtype=torch.long)
        assert self.config.rows == len(kept) + 1, f"{len(kept)} tokens for {self.config.rows - 1} rows"
        with torch.no_grad():
            self.vocab_map.zero_()
            self.vocab_map[kept] = torch.arange(1, len(kept) + 1, dtype=torch.int32)
            self.embed.weight[0].zero_()

    def forward(self, idx, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        if self.config.rows:
            idx = self.vocab_map[idx].long()
        mask = attention_mask.bool()
        # Move each row's real tokens to the front, in order (a stable sort): left padding becomes right
        # padding, which is what pack_padded_sequence expects.
        if not bool(mask[:, 0].all()):
            order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices
            idx, mask = idx.gather(1, order), mask.gather(1, order)
        lengths = mask.sum(1)
        assert bool((lengths > 0).all()), "every sentence needs at least one real token"
        # The recurrence never sees a pad: packed sequences stop each row at its own length.
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(idx), lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        out, h = self.rnn(packed)
        if self.config.pool == "last":
            h = h[0] if isinstance(h, tuple) else h  # an LSTM returns (h, c)
            # The top layer's final states: forward after the last real token, backward after the first.
            v = torch.cat([h[-2], h[-1]], 1) if self.config.bidirectional else h[-1]
        else:
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=idx.shape[1])
            real = mask[:, :, None]
            if self.config.pool == "mean":
                v = (out * real).sum(1) / lengths[:, None].to(out.dtype)
            else:
                v = out.masked_fill(~real, float("-inf")).max(1).values
        return self.score(self.dropout(v))


def pca_embeddings(weight, dim):
    """The rows of a (vocab, d) embedding matrix projected on its top `dim` principal directions and
    scaled to unit variance (nn.Embedding's own initial scale): the student's start from the teacher's
    token geometry. Deterministic (an eigendecomposition of the d x d covariance, no random SVD)."""
    assert dim <= weight.shape[1], f"cannot keep {dim} of {weight.shape[1]} dimensions"
    x = weight.double() - weight.double().mean(0)
    _, vectors = torch.linalg.eigh(x.T @ x)            # ascending eigenvalues
    projected = x @ vectors[:, -dim:].flip(1)          # the largest first
    return (projected / projected.std()).float()
