"""Where a classifier decides: a linear probe (logistic regression) on each layer's output, dev MCC.

    python scripts/probe_layers.py --teacher ../shared/data/teachers/smollm2-cola-lora --data-dir ../shared/data/cola/raw
    python scripts/probe_layers.py ... --base-only                    # the pretrained base, no adapter
    python scripts/probe_layers.py ... --cut 0,1,2,3,4,17 --cut 0,5,10,15,20,25   # the model cut to those layers

For each layer (or each cut model's last layer), the last real token's and the mean over the real tokens,
standardised, L2-regularised, fitted on CoLA's training sentences by L-BFGS; the better of two strengths on
dev is printed, so the figures are slightly optimistic. A measurement for docs/distillation.md, not a mode.
"""
import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from backbones import load_classifier  # noqa: E402
from data import load_cola  # noqa: E402
from model import merge_adapters  # noqa: E402
from student import keep_layers  # noqa: E402
from train_utils import classification_metrics  # noqa: E402
from utils import attach_adapter, read_adapter  # noqa: E402


@torch.no_grad()
def features(hf, tok, texts, batch_size=64):
    """(last token, mean) per sentence and layer: two tensors (N, layers + 1, C), index 0 the embeddings."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    last, mean = [None] * len(texts), [None] * len(texts)
    for j in range(0, len(order), batch_size):
        idx = order[j:j + batch_size]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True)
        states = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
        h = torch.stack(states.hidden_states, 1).float()  # B, L + 1, T, C
        m = enc["attention_mask"].float()
        ends = m.sum(1).long() - 1  # right padding: each row's last real token
        for k, i in enumerate(idx):
            last[i] = h[k, :, ends[k]]
            mean[i] = (h[k] * m[k, None, :, None]).sum(1) / m[k].sum()
    return torch.stack(last), torch.stack(mean)


def probe(x, y, x_dev, y_dev):
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, x_dev = (x - mu) / sd, (x_dev - mu) / sd
    best = -1.0
    for lam in (1e-3, 1e-2):
        w, b = torch.zeros(x.shape[1], requires_grad=True), torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + lam * (w * w).sum()
            loss.backward()
            return loss
        opt.step(closure)
        best = max(best, classification_metrics(((x_dev @ w + b) > 0).long(), y_dev)["mcc"])
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="an adapter directory of run.py LoRA (its base model is read)")
    p.add_argument("--data-dir", required=True, help="the raw CoLA files")
    p.add_argument("--base-only", action="store_true", help="probe the pretrained base, without the adapter")
    p.add_argument("--cut", action="append", default=[], help="probe the model cut to these layers (repeatable)")
    p.add_argument("--limit", type=int, help="the first N training sentences only (a quick check)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    settings, tensors, extras = read_adapter(Path(args.teacher))
    net, tok, info = load_classifier(extras["model"], 2, extras.get("tokenizer"))
    if not args.base_only:
        attach_adapter(net, settings, tensors, head_names=info["head"])
        merge_adapters(net)
    net = net.to(torch.bfloat16).eval()
    cola = load_cola(args.data_dir)
    train, labels = cola["train"][0][:args.limit], cola["train"][1][:args.limit]
    y, y_dev = torch.tensor(labels).float(), torch.tensor(cola["dev"][1])
    what = "base" if args.base_only else "teacher"
    for layers in [None] + [[int(i) for i in c.split(",")] for c in args.cut]:
        if layers is None and args.cut:
            continue  # with --cut, only the cut models
        hf = (keep_layers(copy.deepcopy(net), layers) if layers else net).hf.model
        tr, dev = features(hf, tok, train), features(hf, tok, cola["dev"][0])
        where = range(tr[0].shape[1]) if layers is None else [tr[0].shape[1] - 1]
        for name, k in (("last", 0), ("mean", 1)):
            scores = " ".join(f"{i}:{probe(tr[k][:, i], y, dev[k][:, i], y_dev):.3f}" for i in where)
            print(f"{what} {name}" + (f" cut {','.join(map(str, layers))}" if layers else "") + f" {scores}", flush=True)


if __name__ == "__main__":
    main()
