"""backbone: LoRA training on a transformers backbone (a random-weight BERT of all-MiniLM-L6-v2's shape: 6 layers,
384 wide), our injection against peft's on the same model and the same CoLA batches, in turns in one process."""
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel

from backbones import HFClassifier
from benchmarks.common import checkpoint, cola_batches, timed
from model import inject_adapters, mark_trainable

TARGETS = ["query", "value"]  # the bert default of both


def bench_backbone(args):
    path = checkpoint(args.workdir, "minilm-shape-random", lambda: BertModel(BertConfig(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)))
    # The batches: CoLA as GPT-2's tokenizer encodes it, ids taken mod BERT's 30522 (random weights: any ids do).
    batches = [{**b, "input_ids": b["input_ids"] % 30522} for b in cola_batches(args)]
    sides = lora_sides(path)
    counts = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, (m, _, _) in sides.items()}
    assert counts["ours"] == counts["peft"], counts
    for batch in batches[:args.warmup]:
        for name in sides:
            step(sides[name], batch)
    seconds = {k: 0.0 for k in sides}
    for batch in batches[args.warmup:]:  # in turns, batch by batch: a slow spell hits both
        for name in sides:
            seconds[name] += timed(lambda: step(sides[name], batch))
    n = sum(len(b["labels"]) for b in batches[args.warmup:])
    ours_sps, peft_sps = n / seconds["ours"], n / seconds["peft"]
    print(f"backbone: LoRA r=8 on query, value of a MiniLM-shaped BERT (22.7M), {counts['ours']:,} trainable "
          f"parameters on both sides, {n} CoLA sentences in batches of {args.batch_size}: ours {ours_sps:.1f} "
          f"sent/s, peft {peft_sps:.1f} sent/s: {ours_sps / peft_sps:.2f}x (target >= 1.0)", flush=True)


def lora_sides(path):
    """{"ours" | "peft": (model in train mode, its logits of a batch, its AdamW)}: LoRA r=8 on the same
    targets, ours through model.inject_adapters and peft's get_peft_model."""
    torch.manual_seed(0)
    ours = HFClassifier(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2))
    inject_adapters(ours, "lora", TARGETS, r=8, alpha=8.0, dropout=0.1)
    mark_trainable(ours, train_layernorm=False, head_names=["classifier"])
    torch.manual_seed(0)
    theirs = get_peft_model(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2),
                            LoraConfig(r=8, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS,
                                       task_type="SEQ_CLS"))
    logits = {"ours": lambda b: ours(b["input_ids"], b["attention_mask"]),
              "peft": lambda b: theirs(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits}
    sides = {}
    for name, model in (("ours", ours), ("peft", theirs)):
        model.train()
        sides[name] = (model, logits[name], torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                                              lr=1e-3))
    return sides


def step(side, batch):
    model, logits, opt = side
    loss = F.cross_entropy(logits(batch), batch["labels"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
