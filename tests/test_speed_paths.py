"""The speed paths of issue 23: model.Linear's x @ W path (a transposed copy of the weight, made once where it is
chosen), the chooser's rules, the arithmetic dropout mask and attention's dropout with it."""
import pytest
import torch
import torch.nn.functional as F

import model


def force(monkeypatch, layer, rows, name):
    """Make model.Linear take path `name` for `rows` rows of this layer in this process."""
    key = (*layer.weight.shape, layer.bias is not None, rows, torch.get_num_threads(), layer.weight.dtype)
    monkeypatch.setitem(model.FEWROWS_CHOSEN, key, name)


@pytest.mark.parametrize("bias", [True, False])
def test_the_transposed_path_copies_the_weight_once_and_follows_it(bias, monkeypatch):
    torch.manual_seed(0)
    layer = model.Linear(48, 80, bias=bias).eval()
    x = torch.randn(1, 48)
    force(monkeypatch, layer, 1, "x @ W")
    with torch.no_grad():
        y = layer(x)
        assert torch.allclose(y, F.linear(x, layer.weight, layer.bias), atol=1e-6)
        copy = layer.transposed_weight()
        assert copy.shape == (48, 80) and copy.is_contiguous() and torch.equal(copy, layer.weight.t())
        assert model.transposed_bytes(layer) == layer.weight.nbytes
        layer(x)
        assert layer.transposed_weight() is copy  # made once
        layer.weight.mul_(2)  # changed in place (an adapter merged into it): the copy follows
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-6)
        assert layer.transposed_weight() is not copy
    layer.train()  # training never reads it: dropped
    assert model.transposed_bytes(layer) == 0
    layer.eval()
    force(monkeypatch, layer, 1, "x @ W^T")
    with torch.no_grad():
        layer(x)
    assert model.transposed_bytes(layer) == 0  # no copy where another path is chosen


def test_a_merged_adapter_reaches_the_transposed_path(monkeypatch):
    """A LoRA merged into the base weights (changed in place) is what the x @ W path computes with afterwards: one
    row's logits merged equal them unmerged, and after unmerging again (a stale copy would give the base model's, or
    the adapter twice)."""
    torch.manual_seed(0)
    gpt = model.GPT(model.GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=16)).eval()
    for m in gpt.modules():
        if isinstance(m, model.Linear):
            force(monkeypatch, m, 1, "x @ W")
    ids = torch.tensor([[5]])
    with torch.no_grad():
        base = gpt(ids)
        model.inject_adapters(gpt, "lora", model.GPT2_TARGETS, r=2, alpha=2.0)
        for m in model.adapter_modules(gpt):
            m.lora_B.normal_(0, 0.5)
        unmerged = gpt(ids)
        model.merge_adapters(gpt)
        merged = gpt(ids)
        model.merge_adapters(gpt, merge=False)
        again = gpt(ids)
    assert model.transposed_bytes(gpt) > 0
    assert not torch.allclose(unmerged, base, atol=1e-3)
    assert torch.allclose(merged, unmerged, atol=1e-5) and torch.allclose(again, unmerged, atol=1e-5)


def test_the_chooser_takes_a_copy_only_when_clearly_faster_than_every_path_without_one():
    t = {"x @ W^T": 1.0, "W @ x^T": 0.6, "matrix-vector": 1.0}
    assert model.fewrows_choice({**t, "x @ W": 0.59}) == "W @ x^T"  # a tie: no copy for nothing
    assert model.fewrows_choice({**t, "x @ W": 0.5}) == "x @ W"
    assert model.fewrows_choice({"x @ W^T": 1.0, "W @ x^T": 0.97, "x @ W": 0.96}) == "x @ W^T"
    assert model.fewrows_choice({"x @ W^T": 1.0, "W @ x^T": 0.97, "x @ W": 0.9}) == "x @ W"


def test_the_timings_cover_every_candidate_and_leave_no_copy():
    w, b = torch.randn(96, 64), torch.randn(96)
    for rows in (1, 3):
        timings = model.fewrows_timings(torch.randn(rows, 64), w, b)
        assert set(timings) == set(model.fewrows_candidates(rows))
        assert all(0 < t < 1 for t in timings.values())
    assert model.largest_cache_bytes() > 0


def test_the_arithmetic_mask_is_the_comparisons_bit_for_bit():
    """dropout_mask's integer arithmetic keeps exactly the elements the comparison bits < T keeps, from the
    same draws, for any rate; below 2^-16 (where the threshold 2^15 no longer fits the comparison's int16) it keeps
    everything."""
    assert torch.equal(model.dropout_mask((5, 3), 1e-6), torch.full((5, 3), 1 / (1 - 1e-6)))
    for p in (0.1, 0.5, 0.3, 0.999):
        for shape in ((7,), (3, 5, 7), (1000, 33)):
            torch.manual_seed(1)
            got = model.dropout_mask(shape, p)
            torch.manual_seed(1)
            n = torch.Size(shape).numel()
            bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_().view(torch.int16)[:n].view(shape) & 0x7FFF
            want = (bits < round((1 - p) * 2 ** 15)).float().mul_(1 / (1 - p))
            assert torch.equal(got, want), (p, shape)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_with_dropout_is_sdpas_with_our_mask(masked):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8) for _ in range(3))
    mask = None
    if masked:
        mask = (torch.rand(2, 1, 9, 9) > 0.3) | torch.eye(9, dtype=torch.bool)
    # At a vanishing rate, nothing is dropped: SDPA's attention.
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    assert torch.allclose(model.attention_with_dropout(q, k, v, mask, 1e-9), want, atol=1e-6)
    # At rate p: softmax's weights times dropout_mask's mask (the same draws), times v.
    torch.manual_seed(3)
    got = model.attention_with_dropout(q, k, v, mask, 0.25)
    torch.manual_seed(3)
    bias = torch.zeros(9, 9).masked_fill_(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf")) if mask is None \
        else torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
    weights = ((q @ k.transpose(-2, -1)) / 8 ** 0.5 + bias).softmax(-1)
    assert torch.allclose(got, (weights * model.dropout_mask(weights.shape, 0.25)) @ v, atol=1e-6)
    # About a quarter of the weights dropped.
    torch.manual_seed(4)
    ones = torch.ones(1, 1, 400, 1)
    dropped = model.attention_with_dropout(ones, ones, torch.eye(400)[None, None], None, 0.25) == 0
    real = torch.ones(400, 400, dtype=torch.bool).tril()
    assert abs(dropped[0, 0][real].float().mean().item() - 0.25) < 0.01


def test_cpu_dropout_keeps_a_byte_a_mask_and_its_gradient_is_the_mask():
    """Dropout's output is x times dropout_mask (the same draws), its gradient the same mask, and what autograd
    keeps of it is the uint8 mask, not float factors."""
    x = torch.randn(37, 53, requires_grad=True)
    torch.manual_seed(5)
    y = model.Dropout(0.2).train()(x)
    torch.manual_seed(5)
    factors = model.dropout_mask(x.shape, 0.2)
    assert torch.equal(y, x * factors)
    g = torch.randn(37, 53)
    y.backward(g)
    assert torch.equal(x.grad, g * factors)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model.Dropout(0.2).train()(x)
    assert [t.dtype for t in saved] == [torch.uint8]
    assert model.Dropout(0.2).eval()(x) is x


@pytest.mark.parametrize("masked", [False, True])
def test_attention_in_blocks_is_the_whole_attention(masked, monkeypatch):
    """Longer than a block, attention goes block by block of queries: at a vanishing rate SDPA's result, causal
    or masked, and at rate p the same as one block with the same draws when the blocks see the same keys."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 21, 8) for _ in range(3))
    mask = ((torch.rand(2, 1, 21, 21) > 0.3) | torch.eye(21, dtype=torch.bool)) if masked else None
    monkeypatch.setattr(model, "ATTENTION_BLOCK", 8)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    assert torch.allclose(model.attention_with_dropout(q, k, v, mask, 1e-9), want, atol=1e-6)
    y = model.attention_with_dropout(q, k, v, mask, 0.5)
    assert y.shape == want.shape and torch.isfinite(y).all()


def packed_batch():
    """A right-padded batch of four rows (11, 5, 7 and 1 real tokens), packed."""
    mask = torch.zeros(4, 11, dtype=torch.long)
    for row, length in enumerate([11, 5, 7, 1]):
        mask[row, :length] = 1
    return model.Packing(mask)


def unpacked_attention(qkv, packing, n_head, p):
    """PackedAttention's reference: unpack, attention_with_dropout on autograd's own, pack again."""
    B, T = packing.B, packing.T
    q, k, v = (t.view(B, T, n_head, -1).transpose(1, 2) for t in packing.unpack(qkv).chunk(3, -1))
    return packing.pack(model.attention_with_dropout(q, k, v, None, p).transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("block", [256, 4])
def test_packed_attention_is_attention_with_dropout_and_keeps_the_packed_qkv(block, monkeypatch):
    """The same output as attention_with_dropout on the unpacked q, k, v (same draws, bit for bit), the same
    gradient, in one block or several; for the backward it keeps the packed qkv itself (no copy), the softmax
    weights and the byte masks: nothing in the padded layout of q, k or v."""
    monkeypatch.setattr(model, "ATTENTION_BLOCK", block)
    packing = packed_batch()
    torch.manual_seed(0)
    qkv = torch.randn(24, 3 * 3 * 8, requires_grad=True)  # 24 real tokens, 3 heads of 8
    saved = []
    torch.manual_seed(7)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = model.PackedAttention.apply(qkv, packing, 3, 0.3)
    grad = torch.randn_like(y)
    got, = torch.autograd.grad(y, qkv, grad)
    torch.manual_seed(7)
    want = unpacked_attention(qkv, packing, 3, 0.3)
    assert torch.equal(y, want)
    assert torch.allclose(got, torch.autograd.grad(want, qkv, grad)[0], atol=1e-6)
    assert saved[0].data_ptr() == qkv.data_ptr()
    blocks = [(s, min(11, s + block)) for s in range(0, 11, block)]
    assert [(t.dtype, tuple(t.shape)) for t in saved[1:]] == \
        [(torch.float32, (4, 3, e - s, e)) for s, e in blocks] + [(torch.uint8, (4, 3, e - s, e)) for s, e in blocks]


@pytest.mark.parametrize("autocast", [False, True])
def test_a_packed_training_step_takes_packed_attention_with_the_same_result(autocast, monkeypatch):
    """A GPT-2 classifier in training on a padded batch goes through PackedAttention, and its gradients are
    those of the same step with attention_with_dropout in its place (same seed, same draws), in float32 and
    under bf16 autocast (the weights kept in bf16, the gradient handed back in qkv's dtype)."""
    torch.manual_seed(0)
    config = model.GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=50, block_size=32)
    net = model.GPTClassifier(config, num_labels=2).train()
    ids, mask = torch.randint(0, 50, (3, 9)), torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:], mask[2, 2:] = 0, 0

    def step():
        net.zero_grad()
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = net(ids, mask)
        F.cross_entropy(logits.float(), torch.tensor([0, 1, 1])).backward()
        return [p.grad.clone() for p in net.parameters()]

    calls, real = [], model.PackedAttention.apply
    monkeypatch.setattr(model.PackedAttention, "apply", lambda *a: calls.append(a[2]) or real(*a))
    got = step()
    assert calls == [2, 2]  # each layer's attention, with its two heads
    monkeypatch.setattr(model.PackedAttention, "apply", unpacked_attention)
    want = step()
    tolerance = 1e-3 if autocast else 1e-5  # of each gradient's largest entry: bf16 rounds at 2^-8
    assert all(torch.isfinite(g).all() and (g - w).abs().max() <= tolerance * w.abs().max()
               for g, w in zip(got, want))


def test_packed_attention_refuses_a_second_derivative():
    """Its backward is not itself differentiable: a second derivative raises instead of coming out wrong."""
    qkv = torch.randn(24, 3 * 3 * 8, requires_grad=True)
    y = model.PackedAttention.apply(qkv, packed_batch(), 3, 0.3)
    g, = torch.autograd.grad(y.sum(), qkv, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()
