"""The adapters (LoRA, DoRA, IA3), their injection into ours and transformers' models, the trainable-parameter
counts, the classifier's padding and parity with transformers, and our adapter files against peft's."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (GPT, GPT2_TARGETS, DoRALinear, GPTClassifier, GPTConfig, IA3Linear, LoRALinear, adapter_modules,
                   inject_adapters, mark_trainable, merge_adapters, remove_adapters)
from utils import UserError, adapter_settings, attach_adapter, load_gpt, read_adapter, save_adapter

PAD = 50256  # GPT-2's EOS, the pad token of GPT2ForSequenceClassification here
LAYERNORMS = ("ln_1", "ln_2", "ln_f")  # a tuple: peft extends a modules_to_save list in place
# Logits of the tiny models here (|x| <= 1) after two layers of float32 sums of <= 256 terms: two computations of
# them in different orders (ours and transformers' or peft's, merged and not, padded and alone) differ by a few
# ulps, ~1e-7 (measured <= 3e-7); a wrong weight, mask or adapter moves them by > 1e-3.
LOGITS = dict(rtol=1e-5, atol=1e-5)


def perturb_trainable(model, seed, scale=0.1):
    """Give every trainable parameter random non-zero values (LoRA B starts at zero: a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def padded_batch(lengths, seed=0, vocab=50000, pad=PAD):
    """Right-padded random ids (never the pad id) and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad, dtype=torch.long)
    mask = torch.zeros((len(lengths), T), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(0, vocab, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


# --------------------------------------------------------------------------- LoRALinear, IA3Linear

def make_linear(seed=0, n_in=32, n_out=48, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias)


def test_lora_linear_starts_as_exact_noop():
    base = make_linear()
    x = torch.randn(5, 7, 32)
    expected = base(x)
    lora = LoRALinear(base, r=4, alpha=8.0)
    assert torch.count_nonzero(lora.lora_B) == 0 and torch.count_nonzero(lora.lora_A) > 0
    assert torch.equal(lora(x), expected)
    assert lora.lora_A.shape == (4, 32) and lora.lora_B.shape == (48, 4)


def test_lora_merge_unmerge_restore_and_agree():
    base = make_linear()
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    lora = LoRALinear(base, r=4, alpha=8.0).eval()
    with torch.no_grad():
        lora.lora_B.normal_(std=0.5)
    x = torch.randn(6, 32)
    unmerged = lora(x)
    assert not torch.allclose(unmerged, base(x), rtol=0, atol=1e-3), "a non-zero B must change the output"
    lora.merge()
    assert lora.merged and not torch.allclose(base.weight, w0, rtol=0, atol=1e-3)  # the delta is ~0.1-1
    # Weights <= 1 and a delta of 4-term sums: a few float32 ulps (1.2e-7 at 1) whatever the summation order.
    torch.testing.assert_close(base.weight, w0 + (lora.lora_B @ lora.lora_A) * lora.scaling, rtol=0, atol=1e-6)
    lora.merge()  # merging twice must not add the delta twice
    torch.testing.assert_close(base.weight, w0 + (lora.lora_B @ lora.lora_A) * lora.scaling, rtol=0, atol=1e-6)
    merged = lora(x)
    # Outputs ~3, sums of 32 products in another order (x W'^T vs x W^T + x A^T B^T s): ~1e-6 (measured 8e-7).
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    lora.unmerge()
    assert not lora.merged
    torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=0)  # (w + d) - d: an ulp or two of |w + d| <= 1
    assert torch.equal(base.bias, b0)
    # The restored weights are off by an ulp or two: outputs ~3 (sums of 32) by a few 1e-7 (measured 2.4e-7).
    torch.testing.assert_close(lora(x), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_scaling(rslora):
    r, alpha = 8, 16.0
    lora = LoRALinear(make_linear(), r=r, alpha=alpha, rslora=rslora)
    expected = alpha / math.sqrt(r) if rslora else alpha / r
    assert lora.scaling == pytest.approx(expected, rel=1e-12, abs=0)  # Python floats: the same formula
    assert lora.scaling == pytest.approx(16 / 2.8284271 if rslora else 2.0, rel=1e-7, abs=0)  # sqrt(8) to 8 digits
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(3, 32)
    # The scaling is what the forward pass applies: output - base = x A^T B^T * scaling. Deltas ~5-10, and
    # (base + delta) - base rounds at the size of base + delta: an ulp of 10 is 1e-6.
    torch.testing.assert_close(lora(x) - lora.base(x), (x @ lora.lora_A.T @ lora.lora_B.T) * expected,
                               atol=1e-5, rtol=1e-5)
    assert f"scaling={expected:g}" in repr(lora)


@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_linear_noop_merge_unmerge(feedforward):
    base = make_linear()
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    x = torch.randn(4, 5, 32)
    expected = base(x)
    ia3 = IA3Linear(base, feedforward=feedforward)
    assert ia3.ia3_l.shape == ((32,) if feedforward else (48,))
    assert torch.equal(ia3(x), expected)
    with torch.no_grad():
        ia3.ia3_l.copy_(torch.rand(ia3.ia3_l.shape) + 0.5)  # in [0.5, 1.5): no zero, so unmerge is exact
    scaled = ia3(x)
    manual = base(x * ia3.ia3_l) if feedforward else base(x) * ia3.ia3_l
    torch.testing.assert_close(scaled, manual, rtol=1e-5, atol=1e-5)  # outputs ~1 of 32-term sums, any order
    assert not torch.allclose(scaled, expected, rtol=0, atol=1e-3)
    ia3.merge()
    assert ia3.merged
    # Outputs ~1, sums of 32 products with the scaling moved inside: a few ulps (measured 1.3e-6 at ~3).
    torch.testing.assert_close(ia3(x), scaled, rtol=1e-5, atol=1e-5)
    assert torch.equal(base.bias, b0) == feedforward  # only an output scaling touches the bias
    ia3.unmerge()
    torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=0)  # (w * l) / l: an ulp of |w| <= 0.2
    torch.testing.assert_close(base.bias, b0, atol=1e-6, rtol=0)
    torch.testing.assert_close(ia3(x), scaled, rtol=1e-5, atol=1e-5)  # back to the unmerged path, as above


def perturbed_dora(seed=0, r=4, alpha=8.0, rslora=False, dropout=0.0, bias=True):
    """A DoRALinear with random A, B and a magnitude away from its initial row norms (so every term shows)."""
    dora = DoRALinear(make_linear(seed, bias=bias), r=r, alpha=alpha, rslora=rslora, dropout=dropout)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        dora.lora_B.normal_(std=0.3, generator=g)
        dora.lora_magnitude_vector.mul_(torch.rand(48, generator=g) + 0.5)  # in [0.5, 1.5): never zero
    return dora


def dora_by_hand(dora, x):
    """DoRA's definition, computed plainly: m / ||W + s B A||_row * (W + s B A) x + bias."""
    w = dora.base.weight + dora.scaling * dora.lora_B @ dora.lora_A
    w = dora.lora_magnitude_vector[:, None] * w / w.norm(dim=1, keepdim=True)
    return F.linear(x, w, dora.base.bias)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rslora", [False, True])
def test_dora_linear_is_a_noop_at_start_then_its_definition(rslora, bias):
    base = make_linear(bias=bias)
    x = torch.randn(5, 7, 32)
    expected = base(x)
    dora = DoRALinear(base, r=4, alpha=8.0, rslora=rslora)
    # m starts at the row norms of W, and B at zero: exactly the base layer.
    torch.testing.assert_close(dora.lora_magnitude_vector, base.weight.norm(dim=1), rtol=1e-6, atol=0)
    assert torch.equal(dora(x), expected)
    dora = perturbed_dora(rslora=rslora, bias=bias).eval()
    assert dora.scaling == pytest.approx(8 / 2 if rslora else 2.0, rel=1e-12, abs=0)
    out = dora(x)
    # Outputs ~1 from sums of 32 products in two orders: a few ulps (measured 5e-7).
    torch.testing.assert_close(out, dora_by_hand(dora, x), rtol=1e-5, atol=1e-5)
    lora_only = F.linear(x, dora.base.weight + dora.delta_weight(), dora.base.bias)
    assert not torch.allclose(out, lora_only, rtol=0, atol=1e-2), "the magnitude must show"
    assert "dora=True" in repr(dora) and f"scaling={dora.scaling:g}" in repr(dora)


def test_dora_dropout_reaches_the_magnitude_term_as_in_peft():
    """Training with dropout: y = base(x) + (m/n - 1) W drop(x) + m/n s B A drop(x), peft's choice (its W x term
    sees the dropped-out input); at evaluation no dropout."""
    dora = perturbed_dora(dropout=0.5).train()
    x = torch.randn(6, 32)
    torch.manual_seed(11)
    out = dora(x)
    torch.manual_seed(11)  # the same mask again
    dropped = dora.dropout(x)
    with torch.no_grad():
        s = dora.lora_magnitude_vector / (dora.base.weight + dora.delta_weight()).norm(dim=1)
        by_hand = dora.base(x) + (s - 1) * F.linear(dropped, dora.base.weight) + s * F.linear(dropped, dora.delta_weight())
    torch.testing.assert_close(out.detach(), by_hand, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.detach(), dora_by_hand(dora, x).detach(), rtol=0, atol=1e-2)  # dropout acted
    dora.eval()
    torch.testing.assert_close(dora(x), dora_by_hand(dora, x), rtol=1e-5, atol=1e-5)


def test_dora_gradients_equal_pefts():
    """The weight norm is a constant for the gradient (detached), as in peft: the outputs and the gradients of A, B
    and m equal peft's on the same layer (with a bias) and the same values."""
    from peft import LoraConfig, get_peft_model
    dora = perturbed_dora(seed=3).train()
    net = nn.Sequential()
    net.add_module("lin", make_linear(3))
    theirs = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], use_dora=True)).train()
    layer = theirs.base_model.model.lin
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(dora.lora_A)
        layer.lora_B["default"].weight.copy_(dora.lora_B)
        layer.lora_magnitude_vector["default"].weight.copy_(dora.lora_magnitude_vector)
    x = torch.randn(9, 32)
    target = torch.randn(9, 48)
    mine_out, peft_out = dora(x), theirs(x)
    assert dora.base.bias.abs().max() > 0.05  # a bias that DoRA must leave unscaled
    torch.testing.assert_close(mine_out, peft_out, rtol=1e-5, atol=1e-5)
    ((mine_out - target) ** 2).sum().backward()
    ((peft_out - target) ** 2).sum().backward()
    # Gradients ~10-100 from sums over 9 rows and 48 outputs: float32 in two orders, ~1e-5 relative.
    for mine, peft_param in ((dora.lora_A, layer.lora_A["default"].weight), (dora.lora_B, layer.lora_B["default"].weight),
                             (dora.lora_magnitude_vector, layer.lora_magnitude_vector["default"].weight)):
        assert mine.grad.abs().max() > 1e-2
        torch.testing.assert_close(mine.grad, peft_param.grad, rtol=1e-4, atol=1e-4)


def test_dora_merge_unmerge_restore_and_agree():
    dora = perturbed_dora().eval()
    base = dora.base
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    x = torch.randn(6, 32)
    unmerged = dora(x)
    dora.merge()
    dora.merge()  # twice is once
    assert dora.merged and not torch.allclose(base.weight, w0, rtol=0, atol=1e-3)
    assert torch.equal(base.bias, b0)  # DoRA scales the weight's product, never the bias
    # Outputs ~1, the same sums in another order (measured 5e-7).
    torch.testing.assert_close(dora(x), unmerged, rtol=1e-5, atol=1e-5)
    dora.unmerge()
    assert not dora.merged
    # w' / s - d: an ulp or two of |w + d| <= 1.5 (scales in [0.5, 1.5]).
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(dora(x), unmerged, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- injection

SMALL = GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=16, dropout=0.0)


def test_inject_into_our_gpt_and_remove():
    torch.manual_seed(0)
    model = GPTClassifier(SMALL).eval()
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    ids = torch.randint(0, 101, (2, 9))
    before = model(ids)
    names = inject_adapters(model, "lora", GPT2_TARGETS, r=2, alpha=4.0)
    assert names == [f"transformer.h.{i}.{t}" for i in range(2) for t in GPT2_TARGETS]
    for n in names:
        assert isinstance(model.get_submodule(n), LoRALinear) and model.get_submodule(n).base is originals[n]
    assert isinstance(model.score, nn.Linear) and isinstance(model.lm_head, nn.Linear)  # not targets
    assert torch.equal(model(ids), before)
    trainable = mark_trainable(model, train_layernorm=False, head_names=())  # the adapters only
    assert sorted(trainable) == sorted(f"{n}.lora_{ab}" for n in names for ab in "AB")
    perturb_trainable(model, 1)
    changed = model(ids)
    assert not torch.allclose(changed, before, rtol=0, atol=1e-4)
    # Merged inference gives the same numbers at the base layer's speed. Logits ~0.1 of a 16-wide model: rounding
    # in another order ~1e-8 (measured 2e-8); a delta left out or added twice moves them by > 1e-4.
    merge_adapters(model)
    torch.testing.assert_close(model(ids), changed, rtol=1e-5, atol=1e-6)
    remove_adapters(model)  # unmerges, then puts the original layers back
    assert not adapter_modules(model)
    for n, m in originals.items():
        assert model.get_submodule(n) is m
    torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-6)  # base weights back to an ulp or two


def test_inject_ia3_feedforward_kind():
    model = GPT(SMALL)
    names = inject_adapters(model, "ia3", ["attn.c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])
    assert len(names) == 4
    for i in range(2):
        attn, ff = model.transformer.h[i].attn.c_attn, model.transformer.h[i].mlp.c_proj
        assert isinstance(attn, IA3Linear) and not attn.feedforward and attn.ia3_l.shape == (48,)
        assert isinstance(ff, IA3Linear) and ff.feedforward and ff.ia3_l.shape == (64,)


def test_inject_into_transformers_bert_by_name():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=37)).eval()
    originals = {n: m for n, m in bert.named_modules() if isinstance(m, nn.Linear)}
    ids = torch.randint(0, 99, (2, 7))
    before = bert(input_ids=ids).last_hidden_state
    names = inject_adapters(bert, "lora", ["query", "value"], r=2, alpha=2.0)
    assert names == [f"encoder.layer.{i}.attention.self.{t}" for i in range(2) for t in ("query", "value")]
    assert isinstance(bert.encoder.layer[0].attention.self.query, LoRALinear)
    assert isinstance(bert.encoder.layer[0].attention.self.key, nn.Linear)
    assert len(adapter_modules(bert)) == 4
    assert torch.equal(bert(input_ids=ids).last_hidden_state, before)
    trainable = mark_trainable(bert, train_layernorm=False, head_names=())
    assert sorted(trainable) == sorted(f"{n}.lora_{ab}" for n in names for ab in "AB")
    perturb_trainable(bert, 2)
    assert not torch.allclose(bert(input_ids=ids).last_hidden_state, before, rtol=0, atol=1e-4)
    remove_adapters(bert)
    assert not adapter_modules(bert)
    for n, m in originals.items():
        assert bert.get_submodule(n) is m
    assert torch.equal(bert(input_ids=ids).last_hidden_state, before)


def test_injected_adapters_follow_the_model_mode():
    """Injecting into a model in eval mode must not switch LoRA dropout on (predictions would be random)."""
    torch.manual_seed(0)
    model = GPTClassifier(SMALL).eval()
    inject_adapters(model, "lora", GPT2_TARGETS, r=2, alpha=2.0, dropout=0.5)
    assert not any(m.training for m in model.modules())
    mark_trainable(model)
    perturb_trainable(model, 3)
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids))
        model.train()
        assert not torch.allclose(model(ids), model(ids), rtol=0, atol=1e-4)  # LoRA dropout 0.5 when training


def test_inject_with_no_matching_name_is_a_clear_error():
    model = GPT(SMALL)
    with pytest.raises(ValueError) as info:
        inject_adapters(model, "lora", ["query", "value"])
    msg = str(info.value)
    assert "['query', 'value']" in msg and "c_attn" in msg and "c_fc" in msg
    assert not adapter_modules(model)


# --------------------------------------------------------------------------- trainable parameter counts

@pytest.mark.parametrize("shape, expected", [
    (dict(n_layer=12, n_head=12, n_embd=768), 629_760),     # gpt2
    (dict(n_layer=24, n_head=16, n_embd=1024), 1_675_264),  # gpt2-medium
], ids=["gpt2", "gpt2-medium"])
def test_trainable_parameter_count_with_defaults(shape, expected):
    # On the meta device: shapes only, no memory and no time.
    with torch.device("meta"):
        model = GPTClassifier(GPTConfig(**shape), num_labels=2)
        inject_adapters(model, "lora", GPT2_TARGETS, r=4, alpha=4.0)
    names = mark_trainable(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected
    L, C, r = shape["n_layer"], shape["n_embd"], 4
    lora = L * r * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    assert trainable == lora + (4 * L + 2) * C + 2 * C  # LoRA + layer norms + score head
    assert all(".lora_" in n or ".ln_" in n or n.startswith("score.") for n in names)
    assert len(names) == L * 4 * 2 + L * 4 + 2 + 1
    assert model.transformer.h[0].attn.c_attn.lora_A.device.type == "meta"


# --------------------------------------------------------------------------- the classifier

def test_classifier_padding_does_not_leak():
    torch.manual_seed(0)
    model = GPTClassifier(SMALL).eval()
    lengths = [7, 3, 5, 1]
    ids, mask = padded_batch(lengths, vocab=101, pad=0)
    ids[mask == 0] = torch.randint(0, 101, (int((mask == 0).sum()),))  # pad ids of any value must not matter
    with torch.no_grad():
        batch = model(ids, mask)
        alone = torch.cat([model(ids[i:i + 1, :n]) for i, n in enumerate(lengths)])
    torch.testing.assert_close(batch, alone, **LOGITS)
    assert not torch.allclose(alone[0], alone[1], rtol=0, atol=1e-4)  # the rows really differ


def test_classifier_logits_equal_transformers(tiny_dir):
    from transformers import GPT2ForSequenceClassification
    hf = GPT2ForSequenceClassification.from_pretrained(tiny_dir, num_labels=2, pad_token_id=PAD).eval()
    sd = hf.state_dict()
    ours = GPTClassifier.from_state_dict(load_gpt(tiny_dir).config, sd).eval()  # maps the head too
    assert torch.equal(ours.score.weight, sd["score.weight"])
    ids, mask = padded_batch([9, 4, 6, 2], seed=1)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        mine = ours(ids, mask)
    assert mine.shape == theirs.shape == (4, 2)
    torch.testing.assert_close(mine, theirs, **LOGITS)
    assert theirs.abs().max() > 1e-3


# --------------------------------------------------------------------------- our adapter files and peft's

def our_classifier(tiny_dir):
    return load_gpt(tiny_dir, cls=GPTClassifier, num_labels=2).eval()


def peft_base(tiny_dir):
    from transformers import GPT2ForSequenceClassification
    return GPT2ForSequenceClassification.from_pretrained(tiny_dir, num_labels=2, pad_token_id=PAD)


def logits_both(ours, theirs, seed=3):
    ids, mask = padded_batch([8, 3, 5], seed=seed)
    with torch.no_grad():
        return ours(ids, mask), theirs(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_our_lora_adapter(tiny_dir, tmp_path, rslora):
    from peft import PeftModel
    torch.manual_seed(0)
    ours = our_classifier(tiny_dir)
    inject_adapters(ours, "lora", GPT2_TARGETS, r=4, alpha=8.0, rslora=rslora)
    mark_trainable(ours)
    perturb_trainable(ours, 5)
    settings = adapter_settings("lora", 4, 8.0, 0.0, rslora, GPT2_TARGETS, modules_to_save=["score", *LAYERNORMS])
    save_adapter(ours, tmp_path, settings, {"model": str(tiny_dir)})
    theirs = PeftModel.from_pretrained(peft_base(tiny_dir), tmp_path).eval()
    mine, peft_logits = logits_both(ours, theirs)
    torch.testing.assert_close(mine, peft_logits, **LOGITS)
    # Not a vacuous match: without the adapter the base model's logits are different.
    with theirs.disable_adapter(), torch.no_grad():
        ids, mask = padded_batch([8, 3, 5], seed=3)
        plain = theirs(input_ids=ids, attention_mask=mask).logits
    assert (plain - mine).abs().max() > 1e-3


def make_peft_adapter(tiny_dir, out_dir, config, seed):
    from peft import get_peft_model
    torch.manual_seed(seed)
    model = get_peft_model(peft_base(tiny_dir), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:  # lora_B starts at zero and ia3 at one: make the adapter do something
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.eval()
    model.save_pretrained(out_dir)
    return model


@pytest.mark.parametrize("rslora", [False, True])
def test_we_load_a_peft_lora_adapter(tiny_dir, tmp_path, rslora):
    from peft import LoraConfig
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                        fan_in_fan_out=True, use_rslora=rslora)
    theirs = make_peft_adapter(tiny_dir, tmp_path, config, seed=6)
    settings, tensors, extras = read_adapter(tmp_path)
    assert settings["kind"] == "lora" and extras == {}
    assert "score.weight" in tensors and "transformer.h.1.mlp.c_proj.lora_B" in tensors
    ours = our_classifier(tiny_dir)
    attach_adapter(ours, settings, tensors)
    assert len(adapter_modules(ours)) == 8  # c_proj matches the attention's and the MLP's
    assert ours.transformer.h[0].attn.c_attn.scaling == pytest.approx(4.0 if rslora else 2.0, rel=1e-12, abs=0)
    mine, peft_logits = logits_both(ours, theirs)
    torch.testing.assert_close(mine, peft_logits, **LOGITS)
    # Merged for inference, still the same.
    merge_adapters(ours)
    mine_merged, _ = logits_both(ours, theirs)
    torch.testing.assert_close(mine_merged, peft_logits, **LOGITS)


def test_ia3_adapters_both_ways(tiny_dir, tmp_path):
    from peft import IA3Config, PeftModel
    # Ours -> peft.
    torch.manual_seed(0)
    ours = our_classifier(tiny_dir)
    targets, ff = ["attn.c_attn", "mlp.c_proj"], ["mlp.c_proj"]
    inject_adapters(ours, "ia3", targets, ff)
    mark_trainable(ours)
    perturb_trainable(ours, 7)
    save_adapter(ours, tmp_path / "ours", adapter_settings("ia3", target_modules=targets, feedforward_modules=ff,
                                                           modules_to_save=["score", *LAYERNORMS]))
    theirs = PeftModel.from_pretrained(peft_base(tiny_dir), tmp_path / "ours").eval()
    mine, peft_logits = logits_both(ours, theirs)
    torch.testing.assert_close(mine, peft_logits, **LOGITS)
    # Peft -> ours.
    config = IA3Config(task_type="SEQ_CLS", target_modules=["c_attn", "mlp.c_proj"],
                       feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True)
    theirs = make_peft_adapter(tiny_dir, tmp_path / "peft", config, seed=8)
    settings, tensors, _ = read_adapter(tmp_path / "peft")
    assert settings["kind"] == "ia3" and tensors["transformer.h.0.mlp.c_proj.ia3_l"].shape == (256,)
    ours = our_classifier(tiny_dir)
    attach_adapter(ours, settings, tensors)
    assert ours.transformer.h[0].mlp.c_proj.feedforward and not ours.transformer.h[0].attn.c_attn.feedforward
    mine, peft_logits = logits_both(ours, theirs)
    torch.testing.assert_close(mine, peft_logits, **LOGITS)


def dora_config(rslora=False, modules_to_save=LAYERNORMS):
    from peft import LoraConfig
    return LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=list(GPT2_TARGETS), fan_in_fan_out=True,
                      use_rslora=rslora, use_dora=True,
                      modules_to_save=list(modules_to_save) if modules_to_save else None)  # a copy: peft extends it


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_our_dora_adapter(tiny_dir, tmp_path, rslora):
    from peft import PeftModel
    from safetensors.torch import load_file
    torch.manual_seed(0)
    ours = our_classifier(tiny_dir)
    inject_adapters(ours, "dora", GPT2_TARGETS, r=4, alpha=8.0, rslora=rslora)
    mark_trainable(ours)
    perturb_trainable(ours, 5)  # A, B and the magnitude m: away from its initial ||W|| by ~0.1 (m ~ 0.2-0.4)
    settings = adapter_settings("dora", 4, 8.0, 0.0, rslora, GPT2_TARGETS, modules_to_save=["score", *LAYERNORMS])
    assert settings["peft_type"] == "LORA" and settings["use_dora"] is True
    save_adapter(ours, tmp_path, settings, {"model": str(tiny_dir)})
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert keys["base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"].shape == (192,)  # peft's key
    theirs = PeftModel.from_pretrained(peft_base(tiny_dir), tmp_path).eval()
    layer = theirs.base_model.model.transformer.h[1].mlp.c_fc
    assert torch.equal(layer.lora_magnitude_vector["default"].weight, ours.transformer.h[1].mlp.c_fc.lora_magnitude_vector)
    mine, peft_logits = logits_both(ours, theirs)
    torch.testing.assert_close(mine, peft_logits, **LOGITS)
    # Not vacuous: the same A and B as plain LoRA (the magnitude dropped) give other logits.
    lora = our_classifier(tiny_dir)
    settings, tensors, _ = read_adapter(tmp_path)
    assert settings["kind"] == "dora"
    attach_adapter(lora, {**settings, "kind": "lora"},
                   {k: t for k, t in tensors.items() if not k.endswith("lora_magnitude_vector")})
    assert (logits_both(lora, theirs)[0] - mine).abs().max() > 1e-3


@pytest.mark.parametrize("rslora", [False, True])
def test_we_load_a_peft_dora_adapter(tiny_dir, tmp_path, rslora):
    theirs = make_peft_adapter(tiny_dir, tmp_path, dora_config(rslora), seed=9)  # A, B and m perturbed
    settings, tensors, extras = read_adapter(tmp_path)
    assert settings["kind"] == "dora" and extras == {}
    assert tensors["transformer.h.1.mlp.c_proj.lora_magnitude_vector"].shape == (64,)
    ours = our_classifier(tiny_dir)
    base_logits, peft_logits = logits_both(ours, theirs)
    attach_adapter(ours, settings, tensors)
    assert len(adapter_modules(ours)) == 8 and all(isinstance(m, DoRALinear) for m in adapter_modules(ours))
    layer = ours.transformer.h[0].attn.c_attn
    assert not torch.allclose(layer.lora_magnitude_vector, layer.weight_norm(), rtol=0, atol=1e-3)  # not its init
    mine, _ = logits_both(ours, theirs)
    torch.testing.assert_close(mine, peft_logits, **LOGITS)
    assert (mine - base_logits).abs().max() > 1e-3
    merge_adapters(ours)  # as predict and gen run it
    torch.testing.assert_close(logits_both(ours, theirs)[0], peft_logits, **LOGITS)
    remove_adapters(ours)  # unmerged: the base weights again (the head and layer norms stay the adapter's)
    fresh = our_classifier(tiny_dir).state_dict()
    for n, w in ours.state_dict().items():
        if n.endswith(tuple(f"{t}.weight" for t in GPT2_TARGETS)):
            torch.testing.assert_close(w, fresh[n], rtol=0, atol=1e-6, msg=n)  # w' / s - d: an ulp or two


@pytest.mark.parametrize("layernorms", [True, False])
def test_dora_trainable_parameters_equal_pefts(tiny_dir, layernorms):
    from peft import get_peft_model
    ours = our_classifier(tiny_dir)
    inject_adapters(ours, "dora", GPT2_TARGETS, r=4, alpha=8.0)
    mine = mark_trainable(ours, train_layernorm=layernorms)
    theirs = get_peft_model(peft_base(tiny_dir), dora_config(modules_to_save=LAYERNORMS if layernorms else None))
    names = {n.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
             .replace(".default.weight", "").replace(".default", "") for n, p in theirs.named_parameters() if p.requires_grad}
    assert set(mine) == names
    count = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert count == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    # LoRA's count plus one magnitude per output of each adapted layer: 2 layers, outputs 192 + 64 + 256 + 64.
    lora = our_classifier(tiny_dir)
    inject_adapters(lora, "lora", GPT2_TARGETS, r=4, alpha=8.0)
    mark_trainable(lora, train_layernorm=layernorms)
    assert count == sum(p.numel() for p in lora.parameters() if p.requires_grad) + 2 * (192 + 64 + 256 + 64)


def test_attach_rejects_an_adapter_for_another_architecture(tiny_dir, tmp_path):
    ours = our_classifier(tiny_dir)
    settings = {"kind": "lora", **adapter_settings("lora", target_modules=["query", "value"])}
    with pytest.raises(UserError, match="another architecture"):
        attach_adapter(ours, settings, {})
    # An adapter of the right kind for a wider model: shapes are checked, not silently broadcast.
    settings = {"kind": "lora", **adapter_settings("lora", target_modules=["attn.c_attn"])}
    with pytest.raises(UserError, match="shape"):
        attach_adapter(our_classifier(tiny_dir), settings, {"transformer.h.0.attn.c_attn.lora_A": torch.zeros(4, 768)})


def test_classifier_left_padding_equals_transformers(tiny_dir):
    """Left padding takes the unpacked path: the head must still read the rightmost real token."""
    from transformers import GPT2ForSequenceClassification
    hf = GPT2ForSequenceClassification.from_pretrained(tiny_dir, num_labels=2, pad_token_id=PAD).eval()
    ours = GPTClassifier.from_state_dict(load_gpt(tiny_dir).config, hf.state_dict()).eval()
    ids = torch.tensor([[PAD, PAD, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = (ids != PAD).long()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask), hf(input_ids=ids, attention_mask=mask).logits, **LOGITS)
