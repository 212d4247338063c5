"""Transformer students: K of the teacher's own layers, as DistilBERT, BERT-PKD and DistilGPT2 build theirs.

A student has the teacher's architecture (the hand-written GPT-2 for a GPT-2 teacher, the transformers class
for the others: Llama/SmolLM2, BERT) with K of its layers: the bottom K, or every n-th (DistilBERT), copied from
the teacher's pretrained base (a new head) or from the teacher with its adapter merged (its head too). The
embeddings may be cut to the data's tokens; everything trains, no adapter. The student records its hidden
states (each layer's output) when asked, for the hidden-state loss, which matches student layer i to the
teacher layer it was copied from.

    net, tok, info = load_classifier(teacher_base, num_labels)    # + the adapter merged, for "teacher"
    student = TransformerStudent.from_model(net, info, layers=[0, 1, 2, 3], kept=kept_token_ids)
"""
import copy
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from flags import named_layers
from model import GPTClassifier, GPTConfig, remove_adapters
from utils import UserError


@dataclass
class TransformerConfig:
    """What rebuilds a transformer student: the (truncated) config of its architecture, and where its layers
    came from. kind tells load_student that it is not a DistilRNN."""
    kind: str = "transformer"
    family: str = "gpt2"          # gpt2 (model.GPTClassifier) or a transformers model_type (llama, bert, ...)
    arch: dict = field(default_factory=dict)  # GPTConfig's fields, or the transformers config as a dict
    num_labels: int = 2
    layers: list = field(default_factory=list)  # the teacher's layer index of each student layer
    teacher_layers: int = 0       # how many the teacher has
    init: str = "bottom"          # bottom or every
    source: str = "teacher"       # teacher (adapter merged, its head) or base (pretrained, a new head)
    vocab_size: int = 0
    rows: int = 0                 # embedding rows: 0 = one per token id; else the data's tokens + an unknown row


def pick_layers(n_teacher, k, init):
    """The teacher's layers a student of k layers is made of: the bottom k, k spread evenly from the first
    (every n-th: DistilBERT takes every other one of BERT's 12, starting at layer 0, which reads the
    embeddings), or the layers named in init ("0,1,2,3,16,17")."""
    if init == "bottom":
        return list(range(k))
    layers = named_layers(init)
    if layers:
        if layers[-1] >= n_teacher:
            raise UserError(f"--student-init {init}: the teacher has layers 0 to {n_teacher - 1}; name layers among "
                            f"those.")
        return layers
    step = n_teacher / k
    return [int(i * step) for i in range(k)]


# --------------------------------------------------------------------------- the pieces

class KeptEmbedding(nn.Module):
    """A token embedding cut to the tokens of the data: the tokenizer's ids go in (vocab_map, saved with the
    student, gives each its row), row 0 stands for every id the data never had and starts at zero."""

    def __init__(self, vocab_size, rows, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, dim))
        self.register_buffer("vocab_map", torch.zeros(vocab_size, dtype=torch.int32))

    @classmethod
    def cut(cls, full_weight, kept):
        kept = torch.as_tensor(sorted(kept), dtype=torch.long)
        emb = cls(full_weight.shape[0], len(kept) + 1, full_weight.shape[1])
        with torch.no_grad():
            emb.weight[1:].copy_(full_weight[kept])
            emb.vocab_map[kept] = torch.arange(1, len(kept) + 1, dtype=torch.int32)
        return emb

    def forward(self, ids):
        return F.embedding(self.vocab_map[ids].long(), self.weight)


def unload_adapters(model):
    """The teacher as one model of its own architecture: every adapter folded into its base layer, which
    takes its place (model.remove_adapters with merge)."""
    remove_adapters(model, merge=True)
    return model


def layer_list(net):
    """The nn.ModuleList of the model's layers (for a transformers model: the one list of
    config.num_hidden_layers modules)."""
    if isinstance(net, GPTClassifier):
        return net.transformer.h
    n = net.config.num_hidden_layers
    lists = [m for m in net.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(lists) != 1:
        raise UserError(f"--student transformer: cannot tell the layers of this {net.config.model_type} model apart "
                        f"({len(lists)} lists of its {n} layers, one expected): a transformer student is cut from a "
                        f"model whose layers form one list (GPT-2, Llama, BERT, ...). Use --student rnn, or a teacher "
                        f"of such a family.")
    return lists[0]


def keep_layers(net, layers):
    """Cut the model to `layers` (indices into its layer list), in place, configs included."""
    blocks = layer_list(net)
    kept = [blocks[i] for i in layers]
    for i in reversed(range(len(blocks))):
        del blocks[i]
    blocks.extend(kept)
    if isinstance(net, GPTClassifier):
        net.config.n_layer = len(layers)
        return net
    cfg = net.config
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in layers]
    cfg.num_hidden_layers = len(layers)
    for i, block in enumerate(blocks):  # a layer's own index (its slot in a key/value cache)
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = i
    return net


def layer_output(output):
    """A layer's hidden states from what its forward returned (some transformers layers return a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def input_embedding(net):
    return net.transformer.wte if isinstance(net, GPTClassifier) else net.hf.get_input_embeddings()


def set_input_embedding(net, emb):
    if isinstance(net, GPTClassifier):
        net.transformer.wte = emb
    else:
        net.hf.set_input_embeddings(emb)


# --------------------------------------------------------------------------- the student

class TransformerStudent(nn.Module):
    """A classifier made of K of a teacher's layers: model(input_ids, attention_mask) -> logits, as every
    classifier here. With record_hidden = True, each forward leaves the K layers' outputs (the residual stream
    after each layer, before any final norm) in self.hidden, for the hidden-state loss."""

    def __init__(self, net, config):
        super().__init__()
        self.net, self.config = net, config
        if isinstance(net, GPTClassifier):
            net.lm_head = None  # tied to the full embedding, and a classifier never uses it
        self.record_hidden, self.hidden = False, []
        for block in layer_list(net):
            block.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        if self.record_hidden:
            self.hidden.append(layer_output(output))

    def forward(self, idx, attention_mask=None):
        self.hidden = []
        return self.net(idx, attention_mask)

    @classmethod
    def from_model(cls, net, layers, init="bottom", source="teacher", kept=None):
        """A student of `layers` of `net` (a GPTClassifier or backbones.HFClassifier, adapters already folded
        in), sharing nothing with it: the model is copied first. kept: the token ids to keep embeddings for
        (--student-vocab data), or None for all."""
        n_teacher = len(layer_list(net))
        net = keep_layers(copy.deepcopy(net), layers)
        full = input_embedding(net).weight
        if kept is not None:
            set_input_embedding(net, KeptEmbedding.cut(full.detach(), kept))
        if isinstance(net, GPTClassifier):
            family, arch = "gpt2", asdict(net.config)
        else:
            family, arch = net.config.model_type, net.config.to_dict()
        config = TransformerConfig(family=family, arch=arch, num_labels=net.score.weight.shape[0]
                                   if hasattr(net, "score") else net.config.num_labels, layers=list(layers),
                                   teacher_layers=n_teacher, init=init, source=source, vocab_size=full.shape[0],
                                   rows=0 if kept is None else len(kept) + 1)
        # everything trains (a teacher's base layers come frozen from its adapter: attach_adapter froze them)
        return cls(net.float().train().requires_grad_(True), config)

    @classmethod
    def from_config(cls, config):
        """An untrained student of that shape (load_student then loads its weights)."""
        arch = dict(config.arch)
        if config.family == "gpt2":
            net = GPTClassifier(GPTConfig(**arch), num_labels=config.num_labels)
        else:
            from transformers import AutoConfig, AutoModelForSequenceClassification
            from backbones import HFClassifier, quiet_transformers
            hf_config = AutoConfig.for_model(arch.pop("model_type"), **arch)
            with quiet_transformers():
                net = HFClassifier(AutoModelForSequenceClassification.from_config(hf_config, dtype=torch.float32))
        if config.rows:
            dim = input_embedding(net).weight.shape[1]
            set_input_embedding(net, KeptEmbedding(config.vocab_size, config.rows, dim))
        return cls(net, config)

    def describe(self):
        c = self.config
        where = {"bottom": "bottom", "every": "spread"}.get(c.init, "chosen")
        return (f"{c.family} transformer, {len(c.layers)} of the teacher's {c.teacher_layers} layers ({where}: "
                f"{', '.join(map(str, c.layers))}) from the {'teacher (adapter merged)' if c.source == 'teacher' else 'pretrained base'}"
                + (f", vocabulary of the data: {c.rows - 1:,} of {c.vocab_size:,} tokens" if c.rows else ""))


# --------------------------------------------------------------------------- the hidden-state loss

def hidden_loss(student_hidden, teacher_hidden, attention_mask):
    """Per sentence (B,): 1 - cosine similarity between each student layer's output and the teacher layer it came
    from, averaged over the sentence's real tokens and the layers (DistilBERT's cosine loss, on every student
    layer as in BERT-PKD). Per sentence, so that the batch's loss is the mean over its sentences, as the other
    losses are, and a batch shared by torchrun's processes adds up exactly (with_hidden_loss).
    Cosine, not MSE: a decoder's residual stream carries a few dimensions and tokens of enormous norm (the
    'massive activations' of Llama-family models, thousands of times the rest), which an MSE would spend all
    its weight on; the cosine weighs every token alike and leaves each layer free in scale.
    A hidden state is (B, T, C), padding masked by attention_mask, or (N, C) for the real tokens only, in order (a
    packed batch of the hand-written GPT-2)."""
    real = attention_mask.bool()
    per_layer = []
    for s, t in zip(student_hidden, teacher_hidden):
        cos = F.cosine_similarity(s.float(), t.float(), dim=-1)
        if cos.dim() == 1:  # packed: back to (B, T), the real tokens in their places
            cos = cos.new_zeros(real.shape).masked_scatter(real, cos)
        per_layer.append(((1 - cos) * real).sum(1) / real.sum(1))
    return torch.stack(per_layer).mean(0)


class HiddenTargets:
    """The teacher's hidden states at the layers a student was made of, computed on the fly by the teacher cut
    to its layers up to the highest of them (its bottom layers only: a bottom-K student's targets cost K more
    layers' forward, no cache to key, store or check). The teacher's own full vocabulary reads the batch."""

    def __init__(self, teacher_net, layers):
        top = max(layers) + 1
        self.net = keep_layers(copy.deepcopy(teacher_net), list(range(top))).float().eval().requires_grad_(False)
        self.layers, self.out = list(layers), []
        blocks = layer_list(self.net)
        for i in self.layers:
            blocks[i].register_forward_hook(lambda m, inp, out: self.out.append(layer_output(out)))

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask):
        self.out = []
        self.net(input_ids, attention_mask)
        return self.out
