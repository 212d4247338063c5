"""student.py: transformer students made of K of a teacher's layers. Before any training a student is exactly
that model cut to those layers (hidden states and logits), against transformers (and peft, for the teacher's
merged adapter) on tiny random checkpoints written by transformers: the hand-written GPT-2 and a Llama. Also
the hidden-state loss by hand, and save/load."""
import pytest
import torch
import torch.nn as nn

from backbones import load_classifier
from conftest import make_adapter, save_hf_gpt2
from model import GPTClassifier
from student import (HiddenTargets, KeptEmbedding, TransformerStudent, hidden_loss, layer_list, pick_layers,
                     unload_adapters)
from utils import attach_adapter, load_gpt, load_student, read_adapter, save_student

N_LAYERS = 4


@pytest.fixture(scope="module")
def gpt2_4(tmp_path_factory):
    """A 4-layer GPT-2 checkpoint (transformers' own files) and a LoRA+norms teacher adapter of it."""
    tmp = tmp_path_factory.mktemp("student-gpt2")
    base = save_hf_gpt2(tmp / "base", with_tokenizer=False, n_layer=N_LAYERS, n_head=4, n_embd=32, n_positions=64)
    adapter = make_adapter(base, tmp / "teacher", "lora", ("attn.c_attn", "mlp.c_fc"))
    return base, adapter


@pytest.fixture(scope="module")
def llama_4(tmp_path_factory):
    """A 4-layer Llama checkpoint (transformers' save_pretrained) and a LoRA+norms teacher adapter of it, in
    peft's format (our save_adapter)."""
    from transformers import LlamaConfig, LlamaModel
    from model import inject_adapters, mark_trainable
    from utils import adapter_settings, save_adapter
    tmp = tmp_path_factory.mktemp("student-llama")
    torch.manual_seed(0)
    LlamaModel(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=N_LAYERS,
                           num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                           pad_token_id=2, tie_word_embeddings=False, initializer_range=0.2,
                           max_position_embeddings=64)).save_pretrained(tmp / "base")
    from test_backbones import save_decoder_tokenizer
    save_decoder_tokenizer(tmp / "base")
    model, _, info = load_classifier(tmp / "base", 2)
    inject_adapters(model, "lora", ("q_proj", "v_proj", "up_proj"), r=2, alpha=4.0)
    mark_trainable(model, train_layernorm=True, head_names=info["head"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    settings = adapter_settings("lora", 2, 4.0, 0.0, False, ["q_proj", "v_proj", "up_proj"], [], fan_in_fan_out=False,
                                modules_to_save=[*info["head"], *info["norms"]])
    save_adapter(model, tmp / "teacher", settings, {"model": str(tmp / "base"), "labels": ["a", "b"]})
    return tmp / "base", tmp / "teacher"


def batch(vocab, lengths=(7, 3, 5, 1), pad=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, vocab, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def ours(base, adapter=None):
    """Our classifier of the checkpoint, with the teacher's adapter folded in when given."""
    torch.manual_seed(0)
    if (base / "vocab.json").exists() or "gpt2" in base.parent.name:  # the hand-written GPT-2, no tokenizer needed
        net, head = load_gpt(base, cls=GPTClassifier, num_labels=2), ["score"]
    else:
        net, _, info = load_classifier(base, 2)
        head = info["head"]
    if adapter is not None:
        settings, tensors, _ = read_adapter(adapter)
        attach_adapter(net, settings, tensors, head_names=head)
        unload_adapters(net)
    return net.eval()


def reference(base, layers, adapter=None):
    """transformers' classifier of the checkpoint (with the adapter merged by peft, when given), cut to `layers`
    by hand: the model a student of those layers must equal."""
    from transformers import AutoModelForSequenceClassification
    torch.manual_seed(0)
    from transformers.utils import logging
    logging.set_verbosity_error()  # the new head's load report
    ref = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, pad_token_id=2)
    if adapter is not None:
        from peft import PeftModel
        ref = PeftModel.from_pretrained(ref, adapter).merge_and_unload()
    body = ref.transformer if hasattr(ref, "transformer") else ref.model
    name = "h" if hasattr(body, "h") else "layers"
    kept = [getattr(body, name)[i] for i in layers]
    setattr(body, name, nn.ModuleList(kept))
    if hasattr(ref.config, "n_layer"):
        ref.config.n_layer = len(layers)
    ref.config.num_hidden_layers = len(layers)
    for i, block in enumerate(kept):
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = i
    return ref.eval()


def ref_hidden(ref, ids, mask):
    """transformers' hidden states after each layer (the last one before the final norm, as ours records)."""
    body = ref.transformer if hasattr(ref, "transformer") else ref.model
    out = []
    hooks = [b.register_forward_hook(lambda m, i, o: out.append(o[0] if isinstance(o, tuple) else o))
             for b in (body.h if hasattr(body, "h") else body.layers)]
    with torch.no_grad():
        logits = ref(input_ids=ids, attention_mask=mask).logits
    for h in hooks:
        h.remove()
    return logits, out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("init, source", [("bottom", "base"), ("every", "base"), ("bottom", "teacher"),
                                          ("every", "teacher"), ("1,3", "teacher")])
def test_a_student_is_its_model_cut_to_its_layers(gpt2_4, llama_4, family, init, source):
    base, adapter = gpt2_4 if family == "gpt2" else llama_4
    layers = pick_layers(N_LAYERS, 2, init)
    assert layers == {"bottom": [0, 1], "every": [0, 2], "1,3": [1, 3]}[init]
    net = ours(base, adapter if source == "teacher" else None)
    student = TransformerStudent.from_model(net, layers, init, source).eval()
    ref = reference(base, layers, adapter if source == "teacher" else None)
    if source == "base":  # the new head is the student's own: give the reference the same one
        ref.score.weight.data.copy_(student.net.score.weight)
    ids, mask = batch(64 if family == "llama" else 50257)
    student.record_hidden = True
    with torch.no_grad():
        logits = student(ids, mask)
    ref_logits, ref_states = ref_hidden(ref, ids, mask)
    real = mask.bool()
    assert len(student.hidden) == len(ref_states) == 2
    for ours_h, theirs in zip(student.hidden, ref_states):
        if ours_h.dim() == 2:  # our GPT-2 packs a padded batch: the real tokens only
            theirs = theirs[real]
        else:
            ours_h, theirs = ours_h[real], theirs[real]
        torch.testing.assert_close(ours_h, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert all(p.requires_grad for p in student.parameters())  # everything trains (the teacher's base came frozen)
    # the copy shares nothing with the model it came from
    assert all(p.data_ptr() != q.data_ptr() for p in student.parameters() for q in net.parameters())
    assert len(layer_list(net)) == N_LAYERS


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_vocabulary_cut_to_the_data_gives_the_same_logits_and_saves_and_loads(gpt2_4, llama_4, family, tmp_path):
    base, adapter = gpt2_4 if family == "gpt2" else llama_4
    ids, mask = batch(64 if family == "llama" else 50257)
    kept = sorted(set(ids[mask.bool()].tolist()) | {2})
    net = ours(base, adapter)
    full = TransformerStudent.from_model(net, [0, 3], "every", "teacher").eval()
    cut = TransformerStudent.from_model(net, [0, 3], "every", "teacher", kept=kept).eval()
    assert isinstance(cut.net.transformer.wte if family == "gpt2" else cut.net.hf.get_input_embeddings(), KeptEmbedding)
    assert sum(p.numel() for p in cut.parameters()) < sum(p.numel() for p in full.parameters())
    with torch.no_grad():
        expected = full(ids, mask)
        torch.testing.assert_close(cut(ids, mask), expected, atol=0, rtol=0)
    save_student(cut, tmp_path / "s", {"labels": ["a", "b"]})
    loaded, extras = load_student(tmp_path / "s")
    assert extras["student"]["kind"] == "transformer" and extras["student"]["layers"] == [0, 3]
    assert extras["student"]["rows"] == len(kept) + 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), expected, atol=0, rtol=0)


def test_hidden_loss_by_hand():
    """1 - cosine per real token, averaged over the tokens, then over the layers; padding counts for nothing."""
    s1 = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])     # (B=1, T=3, C=2), the last token is padding
    t1 = torch.tensor([[[2.0, 0.0], [1.0, 1.0], [-1.0, 5.0]]])
    s2 = torch.tensor([[[0.0, 1.0], [3.0, 4.0], [1.0, 1.0]]])
    t2 = torch.tensor([[[0.0, -1.0], [3.0, 4.0], [0.0, 0.5]]])
    mask = torch.tensor([[1, 1, 0]])
    # layer 1: cos 1 and 1/sqrt(2); layer 2: cos -1 and 1
    expected = ((0 + (1 - 2 ** -0.5)) / 2 + (2 + 0) / 2) / 2
    assert hidden_loss([s1, s2], [t1, t2], mask).tolist() == pytest.approx([expected], abs=1e-6)
    # packed (N, C): the real tokens only, in order
    assert hidden_loss([s1[0, :2]], [t1[0, :2]], mask).tolist() == pytest.approx([(1 - 2 ** -0.5) / 2], abs=1e-6)
    # two sentences: each its own mean over its tokens (a one-token sentence weighs as much as a long one)
    two = hidden_loss([torch.cat([s1, s1])], [torch.cat([t1, -t1])], torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert two.tolist() == pytest.approx([(1 - 2 ** -0.5) / 2, 2.0], abs=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hidden_targets_are_the_teachers_layers(gpt2_4, llama_4, family):
    """The teacher cut to its layers up to the highest the student took gives, at those layers, what the whole
    teacher computes there; a bottom student from the teacher starts with a hidden-state loss of 0."""
    base, adapter = gpt2_4 if family == "gpt2" else llama_4
    ids, mask = batch(64 if family == "llama" else 50257)
    teacher = ours(base, adapter)
    whole = HiddenTargets(teacher, list(range(N_LAYERS)))(ids, mask)
    spread = HiddenTargets(teacher, [0, 2])(ids, mask)
    for got, i in zip(spread, [0, 2]):
        torch.testing.assert_close(got, whole[i], atol=0, rtol=0)
    student = TransformerStudent.from_model(teacher, [0, 1], "bottom", "teacher").eval()
    student.record_hidden = True
    with torch.no_grad():
        student(ids, mask)
    assert hidden_loss(student.hidden, HiddenTargets(teacher, [0, 1])(ids, mask), mask).max().item() < 1e-6
    assert isinstance(teacher, GPTClassifier) == (family == "gpt2")


def test_a_model_whose_layers_are_not_one_list_is_a_clear_error():
    """A family with no one list of its layers (two lists of num_hidden_layers, as an encoder-decoder has)
    gets a UserError that says what to do, not a traceback."""
    from types import SimpleNamespace
    from student import layer_list
    from utils import UserError
    net = torch.nn.Module()
    net.config = SimpleNamespace(num_hidden_layers=2, model_type="odd")
    net.encoder = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)])
    net.decoder = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)])
    with pytest.raises(UserError, match=r"cannot tell the layers of this odd model apart \(2 lists.*--student rnn"):
        layer_list(net)
    del net.decoder
    assert layer_list(net) is net.encoder


def test_a_student_of_named_layers_has_a_run_directory_of_its_own(tmp_path):
    """--student-init 0,1,2,3,16,17: the layers in the run's name, found by the comparison beside the others."""
    from types import SimpleNamespace as NS
    from distil import student_tag
    from report import run_name, student_kinds
    tags = [student_tag(NS(student="transformer", student_layers=6, student_init=init, student_from="base"))
            for init in ("bottom", "0,1,2,3,16,17")]
    assert tags == ["tf6-bottom-base", "tf6-layers0-1-2-3-16-17-base"]
    for tag in tags:
        (tmp_path / run_name("distil", 5, tag)).mkdir()
    assert student_kinds(tmp_path, 5) == sorted(tags)
