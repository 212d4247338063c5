"""The adapters (LoRA, IA3), their injection into ours and transformers' models, the trainable-parameter
counts, the classifier's padding and parity with transformers, and our adapter files against peft's."""
import math

import pytest
import torch
import torch.nn as nn

from model import (GPT, GPT2_TARGETS, GPTClassifier, GPTConfig, IA3Linear, LoRALinear, adapter_modules,
                   inject_adapters, mark_trainable, merge_adapters, remove_adapters)
from utils import UserError, adapter_settings, attach_adapter, load_gpt, read_adapter, save_adapter

PAD = 50256  # GPT-2's EOS, the pad token of GPT2ForSequenceClassification here
LAYERNORMS = ["ln_1", "ln_2", "ln_f"]
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
