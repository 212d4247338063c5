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
