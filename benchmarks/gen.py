"""gen: greedy decoding at batch 1, ours against transformers' generate, beside the ceiling that streaming the
weights from memory sets; and K samples decoded as one batch against one alone."""
import statistics
import time
from functools import partial

import torch
from transformers import GPT2LMHeadModel

import model
from benchmarks.common import timed
from flags import DEFAULT_PROMPT
from utils import load_gpt, load_tokenizer

def bench_gen(args, ckpt):
    n = args.new_tokens
    ids, ours, theirs = load_models(args, ckpt)
    run_ours, run_theirs = partial(greedy_ours, ours, ids, n), partial(greedy_theirs, theirs, ids, n)
    layers = weight_products(ours)
    steps = min(n, 16)  # per path: a rate, which fewer steps than n measure as well
    a, b = run_ours(), run_theirs()  # also the warm-up, and model.Linear's choice of paths
    same = a.shape == b.shape == (1, n) and torch.equal(a, b)
    weights_only_seconds(layers, steps)
    t_ours, t_theirs, t_weights = [], [], []
    for _ in range(args.repeats):
        t_ours.append(timed(run_ours))
        t_theirs.append(timed(run_theirs))
        t_weights.append(weights_only_seconds(layers, steps))
    ours_tps, theirs_tps = n / statistics.median(t_ours), n / statistics.median(t_theirs)
    print(f"gen: greedy decoding of {n} new tokens after the {ids.shape[1]}-token default prompt, batch 1, "
          f"float32; median of {args.repeats} alternating runs per side after a warm-up")
    print(f"gen: ours {ours_tps:.1f} tok/s | transformers {theirs_tps:.1f} tok/s | ratio {ours_tps / theirs_tps:.2f}x "
          f"(target >= 1.3x) | tokens identical: {'yes' if same else 'NO'}")
    print(f"gen: spread of the runs: ours {n / max(t_ours):.1f}-{n / min(t_ours):.1f} tok/s, transformers "
          f"{n / max(t_theirs):.1f}-{n / min(t_theirs):.1f} tok/s")
    print_ceiling(layers, t_weights, ours_tps, theirs_tps)
    weights = sum(p.numel() * p.element_size() for p in ours.parameters())
    copies = model.transposed_bytes(ours)
    print(f"gen: memory: model.Linear's transposed weight copies (the x @ W path, where chosen) "
          f"{copies / 2 ** 20:.0f} MB besides the model's {weights / 2 ** 20:.0f} MB of weights (+{100 * copies / weights:.0f}%)",
          flush=True)
    bench_sampling(args, ours, ids)


def load_models(args, ckpt):
    """The default prompt's ids, and ours and transformers' GPT-2 of the checkpoint, in eval mode."""
    ids = load_tokenizer(args.tokenizer)(DEFAULT_PROMPT, return_tensors="pt")["input_ids"]
    ours = load_gpt(str(ckpt)).eval()
    theirs = GPT2LMHeadModel.from_pretrained(ckpt).eval()
    # No stop at end-of-text on either side: both make exactly n new tokens.
    theirs.generation_config.eos_token_id = None
    theirs.generation_config.pad_token_id = 50256
    return ids, ours, theirs


def greedy_ours(ours, ids, n):
    return torch.stack(list(ours.generate(ids, n, temperature=0)), 1)


def greedy_theirs(theirs, ids, n):
    with torch.no_grad():
        out = theirs.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n)
    return out[:, ids.shape[1]:]


# At batch 1 a decoding step must at least stream every weight matrix from memory once. Time just that, each
# weight's product with one row and nothing else, in every way model.Linear may compute it (its candidate paths,
# among them x @ W with the weight stored [in, out], transformers' Conv1D layout), and take each shape's fastest:
# a ceiling that neither side can pass, on any CPU.

def weight_products(ours):
    """[(weight shape, {path: a call of that layer's product with one row that way})], a step's layers in order.
    The paths that read the weight stored [in, out] get a transposed copy of each weight, made here (this
    process's memory, not the decoder's)."""
    linears = [(name, m) for name, m in ours.named_modules() if isinstance(m, torch.nn.Linear)]
    vectors = {m.in_features: torch.randn(1, m.in_features) for _, m in linears}

    def ways(m):
        x, w = vectors[m.in_features], m.weight.detach()
        wt = w.t().contiguous()
        return {p: partial(model.FEWROWS_PATHS[p], x, w, m.bias, *([wt] if p in model.TRANSPOSED else []))
                for p in model.fewrows_candidates(1)}

    return [(tuple(m.weight.shape), ways(m)) for _, m in linears]


def paths_of(layers):
    return list(dict.fromkeys(p for _, calls in layers for p in calls))


def weights_only_seconds(layers, steps):
    """{(shape, path): seconds per decoding step of that shape's products that way}, the paths in turns,
    each for `steps` steps over all the layers (so each weight is streamed as in decoding)."""
    seconds = {}
    with torch.no_grad():
        for path in paths_of(layers):
            for _ in range(steps):
                for shape, calls in layers:
                    if path in calls:
                        t0 = time.perf_counter()
                        calls[path]()
                        seconds[shape, path] = seconds.get((shape, path), 0.0) + time.perf_counter() - t0
    return {k: v / steps for k, v in seconds.items()}


def chosen(rows):
    """{(out, in): the path model.Linear chose in this process for products of `rows` rows}"""
    return {(out, inp): path for (out, inp, _, r, threads, dtype), path in model.FEWROWS_CHOSEN.items()
            if r == rows and threads == torch.get_num_threads() and dtype == torch.float32}


def print_ceiling(layers, t_weights, ours_tps, theirs_tps):
    """Each weight shape's products in every way (median of the runs), and the ceiling of the fastest ways."""
    per_step = {k: statistics.median(t[k] for t in t_weights) for k in t_weights[0]}
    fastest = {}
    for shape in dict.fromkeys(shape for shape, _ in layers):
        ms = {p: 1e3 * per_step[shape, p] for p in paths_of(layers) if (shape, p) in per_step}
        fastest[shape] = min(ms, key=ms.get)
        count = sum(s == shape for s, _ in layers)
        print(f"gen: one-row products with the {shape[0]}x{shape[1]} weights ({count} a step), ms a step: "
              + " | ".join(f"{p} {t:.2f}" for p, t in ms.items())
              + f"; model.Linear chose {chosen(1).get(shape, '?')} (measured once in this process)")
    ceiling = 1 / sum(per_step[shape, p] for shape, p in fastest.items())
    mb = 4 * sum(out * inp for (out, inp), _ in layers) / 1e6
    print(f"gen: ceiling: a step's {len(layers)} weight-by-row products alone, each shape by its fastest path, which "
          f"stream its {mb:.0f} MB of weights from memory ({mb / 1e3 * ceiling:.1f} GB/s), run at {ceiling:.1f} tok/s "
          f"= {ceiling / theirs_tps:.2f}x transformers: the most a batch-1 float32 decoder gets here. Ours runs at "
          f"{100 * ours_tps / ceiling:.0f}% of it (target >= 85%), transformers at {100 * theirs_tps / ceiling:.0f}%", flush=True)


def bench_sampling(args, ours, ids):
    """`gen --num-samples K`: K samples decoded as one batch (one prefill, the cache copied to K rows), against
    K=1, sampling as the CLI does (temperature 0.8, top-k 50, one generator per row); in turns."""
    n, k = args.new_tokens, args.samples

    def sample(rows):
        gens = [torch.Generator().manual_seed(i) for i in range(rows)]
        return list(ours.generate(ids, n, temperature=0.8, top_k=50, generator=gens if rows > 1 else gens[0],
                                  num_samples=rows))

    sample(1), sample(k)
    t_one, t_batch = [], []
    for _ in range(args.repeats):
        t_one.append(timed(lambda: sample(1)))
        t_batch.append(timed(lambda: sample(k)))
    one, batch = n / statistics.median(t_one), k * n / statistics.median(t_batch)
    print(f"gen: sampling {k} continuations as one batch: {batch:.1f} tok/s in all, vs {one:.1f} tok/s for one: "
          f"{batch / one:.2f}x (target >= 3x; {n} new tokens each, median of {args.repeats} runs in turns); "
          f"model.Linear's paths for {k} rows: "
          + ", ".join(f"{out}x{inp} {path}" for (out, inp), path in chosen(k).items()), flush=True)
