"""Benchmarks of our hand-written GPT-2 + LoRA against the reference (transformers / peft), printed
side by side with ratios and the targets, in one run. CPU, float32, no hub needed.

    python bench.py gen     greedy decoding, batch 1: tokens/s of ours vs transformers' generate; each
                            weight shape's one-row product in every candidate way, the way model.Linear
                            chose here, and the ceiling they set; and sampling K=4 continuations as one
                            batch vs one alone (total tokens/s)
    python bench.py lora    LoRA training on CoLA: sentences/s of ours vs transformers+peft, ours' FLOP/s
                            against this machine's matmul peak, peak memory of each, and ours' evaluation
                            speed with the adapters merged vs unmerged
    python bench.py precision LoRA training and evaluation under every --precision the CLI accepts on the
                            CPU (fp32, bf16, fp16), ours and transformers+peft on the same batches: sent/s
                            and the ratios to fp32 and to peft (a precision the CLI refuses here: one step)
    python bench.py distil  distillation on CoLA, ours only: a distil epoch with the teacher-logit cache vs
                            an rnn epoch, vs a distil epoch that runs the teacher every batch, and the
                            student's inference speed vs the teacher's (GPT-2 with a merged LoRA adapter)
    python bench.py backbone LoRA training on a transformers backbone (a random-weight BERT of all-MiniLM-L6-v2's
                            shape: 6 layers, 384 wide): sentences/s of our injection vs peft's on the same
                            model and the same CoLA batches, in turns, in one process
    python bench.py threads two `run.py LoRA` processes side by side on one machine (a small random-weight
                            GPT-2): each with torch's default threads (every core: they fight) vs each with
                            --threads cores/2, against one run alone; wall seconds of each
    python bench.py serve   `run.py serve`'s mixed-adapter batches: one batch of CoLA sentences for 8 adapters
                            (sent/s) vs the same batch for one adapter, vs today's swap-and-merge path
                            (predict's) on the same stream, vs peft's mixed batches (adapter_names=); resident
                            memory with 1, 8, 64 adapters; the HTTP service under 100 concurrent clients
    python bench.py all     gen, lora, precision, distil and backbone

Both sides run on one random-weight checkpoint of the real gpt2 shape (12 layers, 768 wide, 50257
tokens, 1024 positions), written by transformers' own save_pretrained under --workdir (reused if there).
Everything timed runs after a warm-up, and whatever is compared within one process runs in turns
(ours, theirs, ours, ...), so that a slow spell of the machine (a shared VM) hits both alike. Each LoRA
side trains in its own subprocess (`bench.py _lora_worker ours|peft`, which prints JSON), so that its
peak resident memory is its own; ours' process also times a 2048^3 matmul between its steps (the
machine's peak, for the FLOP/s fraction) and the same steps with dropout off (a diagnostic).
distil's teacher is our GPTClassifier on that checkpoint with a LoRA adapter merged, its student
run.py's DistilRNN with its defaults; the epochs are train_utils.fit's own (its "train_seconds", which
leave out the evaluation), on a fixed random subset of CoLA's training sentences, in turns as above.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may wait on the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent
LORA_TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def quiet_transformers():
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def checkpoint(workdir, name="gpt2-random", make=None):
    """WORKDIR/NAME: a random-weight model written by transformers' save_pretrained, seeded, once (reused
    if already there). make() builds it; by default a GPT-2 of the real gpt2 shape."""
    path = Path(workdir) / name
    if not (path / "model.safetensors").is_file():
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(0)
        (make or (lambda: GPT2LMHeadModel(GPT2Config())))().save_pretrained(path)
    return path


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def seconds_in_turns(ways, rounds):
    """{name: [seconds of each round]} of ways {name: a call without arguments}, each round calling every way
    once, in turns, so that a slow spell of a shared machine hits them alike (warm-ups are the caller's)."""
    times = {k: [] for k in ways}
    for _ in range(rounds):
        for k, way in ways.items():
            times[k].append(timed(way))
    return times


# --------------------------------------------------------------------------- generation

def bench_gen(args, ckpt):
    from functools import partial

    from transformers import GPT2LMHeadModel

    import model
    from flags import DEFAULT_PROMPT
    from utils import load_gpt, load_tokenizer

    n = args.new_tokens
    ids = load_tokenizer(args.tokenizer)(DEFAULT_PROMPT, return_tensors="pt")["input_ids"]
    ours = load_gpt(str(ckpt)).eval()
    theirs = GPT2LMHeadModel.from_pretrained(ckpt).eval()
    # No stop at end-of-text on either side: both make exactly n new tokens.
    theirs.generation_config.eos_token_id = None
    theirs.generation_config.pad_token_id = 50256

    def run_ours():
        return torch.stack(list(ours.generate(ids, n, temperature=0)), 1)

    def run_theirs():
        with torch.no_grad():
            out = theirs.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n)
        return out[:, ids.shape[1]:]

    # At batch 1 a decoding step must at least stream every weight matrix from memory once. Time just that,
    # each weight's product with one row and nothing else, in every way either side may compute it
    # (model.Linear's candidate paths; transformers' Conv1D, which stores the weight as (in, out)), and take
    # each shape's fastest: a ceiling that neither side can pass, on any CPU.
    linears = [(name, m) for name, m in ours.named_modules() if isinstance(m, torch.nn.Linear)]
    conv1d = {name: m for name, m in theirs.named_modules() if type(m).__name__ == "Conv1D"}
    vectors = {m.in_features: torch.randn(1, m.in_features) for _, m in linears}
    theirs_path = "transformers' x @ W"

    def ways(name, m):
        """{path: a call of this layer's product with one row that way}"""
        x = vectors[m.in_features]
        calls = {p: partial(model.FEWROWS_PATHS[p], x, m.weight, m.bias) for p in model.fewrows_candidates(1)}
        if name in conv1d:
            calls[theirs_path] = partial(torch.addmm, conv1d[name].bias, x, conv1d[name].weight)
        return calls

    layers = [(tuple(m.weight.shape), ways(name, m)) for name, m in linears]
    paths = list(dict.fromkeys(p for _, calls in layers for p in calls))
    steps = min(n, 16)  # per path: a rate, which fewer steps than n measure as well

    def run_weights_only():
        """{(shape, path): seconds per decoding step of that shape's products that way}, the paths in turns,
        each for `steps` steps over all the layers (so each weight is streamed as in decoding)."""
        seconds = {}
        with torch.no_grad():
            for path in paths:
                for _ in range(steps):
                    for shape, calls in layers:
                        if path in calls:
                            t0 = time.perf_counter()
                            calls[path]()
                            seconds[shape, path] = seconds.get((shape, path), 0.0) + time.perf_counter() - t0
        return {k: v / steps for k, v in seconds.items()}

    a, b = run_ours(), run_theirs()  # also the warm-up, and model.Linear's choice of paths
    same = a.shape == b.shape == (1, n) and torch.equal(a, b)
    run_weights_only()
    t_ours, t_theirs, t_weights = [], [], []
    for _ in range(args.repeats):
        t_ours.append(timed(run_ours))
        t_theirs.append(timed(run_theirs))
        t_weights.append(run_weights_only())
    ours_tps, theirs_tps = n / statistics.median(t_ours), n / statistics.median(t_theirs)
    print(f"gen: greedy decoding of {n} new tokens after the {ids.shape[1]}-token default prompt, batch 1, "
          f"float32; median of {args.repeats} alternating runs per side after a warm-up")
    print(f"gen: ours {ours_tps:.1f} tok/s | transformers {theirs_tps:.1f} tok/s | ratio {ours_tps / theirs_tps:.2f}x "
          f"(target >= 1x) | tokens identical: {'yes' if same else 'NO'}")
    print(f"gen: spread of the runs: ours {n / max(t_ours):.1f}-{n / min(t_ours):.1f} tok/s, transformers "
          f"{n / max(t_theirs):.1f}-{n / min(t_theirs):.1f} tok/s")
    per_step = {k: statistics.median(t[k] for t in t_weights) for k in t_weights[0]}
    def chosen(rows):
        """{(out, in): the path model.Linear chose in this process for products of `rows` rows}"""
        return {(out, inp): path for (out, inp, _, r, threads, dtype), path in model.FEWROWS_CHOSEN.items()
                if r == rows and threads == torch.get_num_threads() and dtype == torch.float32}

    fastest = {}
    for shape in dict.fromkeys(shape for shape, _ in layers):
        ms = {p: 1e3 * per_step[shape, p] for p in paths if (shape, p) in per_step}
        fastest[shape] = min(ms, key=ms.get)
        count = sum(s == shape for s, _ in layers)
        print(f"gen: one-row products with the {shape[0]}x{shape[1]} weights ({count} a step), ms a step: "
              + " | ".join(f"{p} {t:.2f}" for p, t in ms.items())
              + f"; model.Linear chose {chosen(1).get(shape, '?')} (measured once in this process)")
    ceiling = 1 / sum(per_step[shape, p] for shape, p in fastest.items())
    mb = 4 * sum(m.weight.numel() for _, m in linears) / 1e6
    print(f"gen: ceiling: a step's {len(linears)} weight-by-row products alone, each shape by its fastest path, which "
          f"stream its {mb:.0f} MB of weights from memory ({mb / 1e3 * ceiling:.1f} GB/s), run at {ceiling:.1f} tok/s "
          f"= {ceiling / theirs_tps:.2f}x transformers: the most a batch-1 float32 decoder gets here. Ours runs at "
          f"{100 * ours_tps / ceiling:.0f}% of it, transformers at {100 * theirs_tps / ceiling:.0f}%", flush=True)

    # `gen --num-samples K`: K samples decoded as one batch (one prefill, the cache copied to K rows), against
    # K=1, sampling as the CLI does (temperature 0.8, top-k 50, one generator per row); in turns.
    k = args.samples

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


# --------------------------------------------------------------------------- LoRA training

def cola_batches(args):
    """The first warmup+steps shuffled batches of CoLA's training set, dynamically padded, as `run.py LoRA`
    makes them (same tokenizer, max length 128, utils.Examples)."""
    from data import Examples, load_cola
    from utils import load_tokenizer
    sentences, labels = load_cola(args.data_dir)["train"]
    train = Examples.encode(load_tokenizer(args.tokenizer), sentences, labels, 128, "train")
    batches = []
    for batch in train.batches(args.batch_size, shuffle=True, seed=0):
        batches.append(batch)
        if len(batches) == args.warmup + args.steps:
            break
    return batches


def build_ours(ckpt, kind="lora"):
    from model import GPTClassifier, inject_adapters, mark_trainable
    from utils import load_gpt
    model = load_gpt(str(ckpt), cls=GPTClassifier, num_labels=2)
    inject_adapters(model, kind, LORA_TARGETS, r=4, alpha=4.0, dropout=0.1)
    mark_trainable(model)  # adapters, layer norms and the head
    return model


def build_peft(ckpt, kind="lora"):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2ForSequenceClassification
    model = GPT2ForSequenceClassification.from_pretrained(ckpt, num_labels=2, pad_token_id=50256)
    config = LoraConfig(r=4, lora_alpha=4, lora_dropout=0.1, target_modules=LORA_TARGETS, fan_in_fan_out=True,
                        modules_to_save=["score", "ln_1", "ln_2", "ln_f"], task_type="SEQ_CLS",
                        use_dora=kind == "dora")
    return get_peft_model(model, config)


@contextmanager
def dropout_off(model):
    """Every dropout rate of `model` (nn.Dropout modules, attention's `dropout` float) at 0 for a while."""
    saved = [(m, name, getattr(m, name)) for m in model.modules() for name in ("p", "dropout")
             if isinstance(getattr(m, name, None), float)]
    for m, name, _ in saved:
        setattr(m, name, 0.0)
    try:
        yield
    finally:
        for m, name, rate in saved:
            setattr(m, name, rate)


def matmul_seconds(a, b):
    a @ b  # untimed: the first call may allocate
    return timed(lambda: a @ b)


def lora_worker(side, args, ckpt):
    """One side's training figures (and, for ours, the machine's matmul peak measured between the steps,
    and evaluation merged vs unmerged) as one JSON line on stdout. Sides ours-dora and peft-dora: DoRA's
    training alone."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    batches = cola_batches(args)
    side, _, kind = side.partition("-")
    model = build_ours(ckpt, kind or "lora") if side == "ours" else build_peft(ckpt, kind or "lora")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)

    def logits(batch):
        if side == "ours":
            return model(batch["input_ids"], batch["attention_mask"])
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def step(batch):  # as train_utils.fit does per batch, less the learning-rate schedule
        loss = F.cross_entropy(logits(batch), batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    model.train()
    for batch in batches[:args.warmup]:
        step(batch)
    work = batches[args.warmup:]
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    step_s, matmul_s, no_dropout_s = [], [], []
    for batch in work:
        step_s.append(timed(lambda: step(batch)))
        if side == "ours" and not kind:
            # The machine's peak, measured in the same spells of the machine as the steps; and, as a
            # diagnostic of what dropout's random numbers cost, the same step with every dropout off.
            matmul_s.append(matmul_seconds(a, b))
            with dropout_off(model):
                no_dropout_s.append(timed(lambda: step(batch)))
    result = {"side": side, "train_s": sum(step_s), "sentences": sum(len(b["labels"]) for b in work),
              "real_tokens": sum(int(b["attention_mask"].sum()) for b in work),
              "padded_tokens": sum(b["input_ids"].numel() for b in work),
              "attention_scores": sum(b["input_ids"].shape[0] * b["input_ids"].shape[1] ** 2 for b in work),
              "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KB on Linux
    if side == "ours" and not kind:
        from model import merge_adapters
        result["matmul_flops"] = 2 * n ** 3 / statistics.median(matmul_s)
        result["train_no_dropout_s"] = sum(no_dropout_s)
        model.eval()
        evaluation = work[:args.eval_batches]
        result["eval_sentences"] = args.eval_repeats * sum(len(b["labels"]) for b in evaluation)

        def evaluate():
            with torch.no_grad():
                for batch in evaluation:
                    logits(batch)

        evaluate()  # warm-up
        unmerged = merged = 0.0
        for _ in range(args.eval_repeats):  # alternate, as above
            unmerged += timed(evaluate)
            merge_adapters(model)
            merged += timed(evaluate)
            merge_adapters(model, merge=False)
        result["eval_unmerged_s"], result["eval_merged_s"] = unmerged, merged
    print(json.dumps(result))


def bench_lora(args, ckpt):
    from model import GPTConfig
    results = {}
    for side in ("ours", "peft", "ours-dora", "peft-dora"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "_lora_worker", side, "--workdir", str(args.workdir),
               "--tokenizer", args.tokenizer, "--data-dir", args.data_dir, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
               "--eval-batches", str(args.eval_batches), "--eval-repeats", str(args.eval_repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            sys.exit(f"bench.py _lora_worker {side} failed:\n{out.stderr[-3000:]}")
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    ours, peft = results["ours"], results["peft"]
    n = ours["sentences"]
    print(f"lora: {args.steps} AdamW steps (after {args.warmup} untimed) on the same batches of {args.batch_size} "
          f"CoLA training sentences, dynamically padded: {ours['real_tokens']} tokens, {ours['padded_tokens']} with "
          f"the padding; LoRA r=4 alpha=4 dropout 0.1 on {' '.join(LORA_TARGETS)}, layer norms and head trained")
    o_sps, p_sps = n / ours["train_s"], n / peft["train_s"]
    print(f"lora train: ours {o_sps:.1f} sent/s | transformers+peft {p_sps:.1f} sent/s | ratio "
          f"{o_sps / p_sps:.2f}x (target >= 1.5x)")
    o_sps, p_sps = n / results["ours-dora"]["train_s"], n / results["peft-dora"]["train_s"]
    print(f"lora train DoRA (the same steps, use_dora): ours {o_sps:.1f} sent/s | transformers+peft {p_sps:.1f} "
          f"sent/s | ratio {o_sps / p_sps:.2f}x (target >= 1.5x)")

    # Model FLOPs, the usual estimate: a weight matrix with N entries costs 2N FLOPs per token forward and
    # 2N for the gradient of its input backward; the other 2N of the usual 6N, the weight gradient, is not
    # computed, the base being frozen (the rank-4 LoRA matrices add about 1% and are left out). Attention adds
    # Q K^T and A V, 4 * T * n_embd per token and layer forward, twice that backward. Only real tokens
    # count: padding is no useful work (and ours does not compute it); ours runs attention on the padded
    # (B, T) layout, so that term uses the padded T.
    c = GPTConfig()
    n_matmul = c.n_layer * 12 * c.n_embd ** 2  # attn.c_attn 3C^2 + attn.c_proj C^2 + mlp.c_fc 4C^2 + mlp.c_proj 4C^2
    flops = 4 * n_matmul * ours["real_tokens"] + 12 * c.n_layer * c.n_embd * ours["attention_scores"]
    achieved, peak = flops / ours["train_s"], ours["matmul_flops"]
    print(f"lora FLOP/s: ours {achieved / 1e9:.1f} GFLOP/s = {100 * achieved / peak:.0f}% of this machine's float32 "
          f"matmul peak, {peak / 1e9:.1f} GFLOP/s (median 2048^3 torch.matmul between the steps, "
          f"{args.threads} threads) (target >= 50%)")
    no_drop, share = flops / ours["train_no_dropout_s"], 1 - ours["train_no_dropout_s"] / ours["train_s"]
    print(f"lora FLOP/s: ours with every dropout off (a diagnostic, not a fair setting) {no_drop / 1e9:.1f} GFLOP/s "
          f"= {100 * no_drop / peak:.0f}% of the peak: dropout takes {100 * share:.0f}% of ours' step time, for its "
          f"random numbers (one per activation, drawn on one core)")
    print(f"lora FLOP/s: model FLOPs = 4 * {n_matmul / 1e6:.1f}M matmul weights * real tokens + "
          f"12 * n_layer * n_embd * B * T^2 (attention) = {flops / 1e12:.2f} TFLOP over the timed steps; "
          f"4N not 6N per token: the frozen base weights get no gradient")
    print(f"lora peak memory: ours {ours['max_rss_mb']:.0f} MB | transformers+peft {peft['max_rss_mb']:.0f} MB | "
          f"ratio {ours['max_rss_mb'] / peft['max_rss_mb']:.2f}x (target <= 0.8x) (ru_maxrss of each side's own "
          f"process: loading the model, then training)")
    m = ours["eval_sentences"]
    um_sps, m_sps = m / ours["eval_unmerged_s"], m / ours["eval_merged_s"]
    print(f"lora eval (ours, eval mode, no_grad, {args.eval_batches} of the same batches {args.eval_repeats} times, "
          f"merged and unmerged in turn): merged {m_sps:.1f} sent/s | unmerged {um_sps:.1f} sent/s | ratio "
          f"{m_sps / um_sps:.2f}x", flush=True)


# --------------------------------------------------------------------------- precision

def bench_precision(args, ckpt):
    """LoRA training steps and evaluation under every --precision the CLI accepts on the CPU, ours and
    transformers+peft on the same batches, in turns (ours fp32, ours bf16, ..., peft fp32, ...), one process.
    A precision the CLI refuses on this CPU (utils.autocast_dtype measures it first) is timed for one step
    all the same, so the table shows the trap that the refusal keeps users out of."""
    import torch.nn.functional as F
    from machine import autocast_dtype, cpu_matmul_seconds
    from utils import UserError
    cpu = torch.device("cpu")
    batches = cola_batches(args)
    warm, work = batches[:2], batches[2:2 + args.precision_steps]
    from model import cast_frozen_linears
    precisions = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    runs = [(side, name) for side in ("ours", "peft") for name in precisions if side == "ours" or name != "fp16"]
    # One model per row. Ours as fit trains it: under autocast its frozen base layers are kept in that precision
    # (model.cast_frozen_linears); transformers+peft as it runs under autocast.
    models = {}
    for side, name in runs:
        torch.manual_seed(0)
        models[side, name] = build_ours(ckpt) if side == "ours" else build_peft(ckpt)
        if side == "ours" and precisions[name] is not None:
            cast_frozen_linears(models[side, name], precisions[name])
    refused = {}
    for name in ("bf16", "fp16"):
        try:
            autocast_dtype(name, cpu)
        except UserError:
            refused[name] = cpu_matmul_seconds(precisions[name]) / cpu_matmul_seconds(torch.float32)
    opts = {r: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for r, m in models.items()}

    def logits(side, name, batch):
        model = models[side, name]
        if side == "ours":
            return model(batch["input_ids"], batch["attention_mask"])
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def step(side, name, batch):
        dtype = precisions[name]
        models[side, name].train()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            out = logits(side, name, batch)
        loss = F.cross_entropy(out.float(), batch["labels"])
        opts[side, name].zero_grad(set_to_none=True)
        loss.backward()
        opts[side, name].step()

    def evaluate(side, name, batch):
        dtype = precisions[name]
        models[side, name].eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            logits(side, name, batch)

    train_s = {r: 0.0 for r in runs}
    eval_s = {r: 0.0 for r in runs}
    for side, name in runs:  # warm-up
        for batch in warm[:1 if name in refused else 2]:
            step(side, name, batch)
    for i, batch in enumerate(work):
        for side, name in runs:
            if name in refused and i > 0:
                continue  # one step of a refused precision shows its cost
            train_s[side, name] += timed(lambda: step(side, name, batch))
            eval_s[side, name] += timed(lambda: evaluate(side, name, batch))
    n = lambda r: sum(len(b["labels"]) for b in (work[:1] if r[1] in refused else work))
    sps = {r: n(r) / train_s[r] for r in runs}
    eps = {r: n(r) / eval_s[r] for r in runs}
    print(f"precision: CPU autocast, LoRA r=4 on {' '.join(LORA_TARGETS)}, {len(work)} training steps of "
          f"{args.batch_size} CoLA sentences (the same batches for every row), then a no_grad forward of each batch")
    for side, name in runs:
        note = (f"  (refused by the CLI on this CPU: its {name} matmuls take {refused[name]:.0f}x float32's; one step "
                f"timed)" if name in refused else "")
        print(f"precision {side} {name}: train {sps[side, name]:.1f} sent/s ({sps[side, name] / sps[side, 'fp32']:.2f}x "
              f"{side} fp32) | eval {eps[side, name]:.1f} sent/s ({eps[side, name] / eps[side, 'fp32']:.2f}x){note}")
    if "bf16" not in refused:
        print(f"precision: ours bf16 / ours fp32 = {sps['ours', 'bf16'] / sps['ours', 'fp32']:.2f}x (target >= 2x); "
              f"ours bf16 / transformers+peft bf16 = {sps['ours', 'bf16'] / sps['peft', 'bf16']:.2f}x (target >= 2.5x)",
              flush=True)


# --------------------------------------------------------------------------- distillation

def bench_distil_teacher(args):
    """The teacher's inference speed on a SmolLM2-shaped Llama (random weights, a classification head): the
    old way (sentences in file order, batches of 64, fp32) against run.py's (sorted by length, batches of
    --teacher-batch-size 128, the precision distil.teacher_precision picks here)."""
    from types import SimpleNamespace
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from backbones import HFClassifier
    from data import Examples, load_cola
    from distil import logits_by_length, teacher_precision
    from train_utils import predict_logits
    from utils import load_tokenizer
    device = torch.device("cpu")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         tie_word_embeddings=True, num_labels=2, pad_token_id=0)
    teacher = HFClassifier(LlamaForSequenceClassification(config)).eval().requires_grad_(False)
    sentences, labels = load_cola(args.data_dir)["train"]
    pick = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(0))[:args.distil_teacher_sentences]
    ex = Examples.encode(load_tokenizer(args.tokenizer), [sentences[i] for i in pick], [labels[i] for i in pick], 128)
    ex = Examples([[t % 49152 or 1 for t in x] for x in ex.ids], ex.labels.tolist(), 0)  # GPT-2 ids into Llama's
    amp = teacher_precision(SimpleNamespace(teacher_precision="auto"), device, None)
    warm = ex.subset(list(range(32)))
    ways = {"before: file order, batches of 64, fp32": lambda e: predict_logits(teacher, e, device, 64, progress=False),
            f"after: sorted by length, batches of 128, {'bf16' if amp else 'fp32'}":
                lambda e: logits_by_length(teacher, e, device, 128, amp, progress=False)}
    for way in ways.values():
        way(warm)
    times = seconds_in_turns({k: lambda way=way: way(ex) for k, way in ways.items()}, max(1, args.distil_repeats // 2))
    n, size, runs = len(ex), sum(p.numel() for p in teacher.parameters()), len(next(iter(times.values())))
    print(f"distil teacher: SmolLM2-shaped Llama (30 layers, 576 wide, random weights, {size / 1e6:.1f}M parameters), "
          f"{n} CoLA training sentences, {torch.get_num_threads()} threads, median of {runs} runs")
    speeds = {k: n / statistics.median(t) for k, t in times.items()}
    before = next(iter(speeds.values()))
    for k, v in speeds.items():
        print(f"| teacher inference, {k} | {v:.1f} sentences/s | {v / before:.2f}x |")


def bench_kd_pair(args):
    """A trained student against its real teacher (--distil-teacher, an adapter directory) on the dev set of
    --data-dir, in turns in one process: the inference speeds behind docs/distillation.md's ">= 50x"."""
    from types import SimpleNamespace
    from data import Examples, load_cola
    from distil import Teacher, logits_by_length, teacher_precision
    from predict import load_student_classifier
    device = torch.device("cpu")
    student, tok, _, max_length = load_student_classifier(args.distil_student, None, device)
    sentences, labels = load_cola(args.data_dir)["dev"]
    dev = Examples.encode(tok, sentences, labels, max_length)
    flags = SimpleNamespace(teacher=args.distil_teacher, models_dir="models", SR=0, model=None, gguf_file=None,
                            tokenizer=None, teacher_batch_size=128, teacher_precision="auto")
    amp = teacher_precision(flags, device, None)
    teacher = Teacher(flags, device, amp).load()
    ways = {"teacher": lambda: logits_by_length(teacher, dev, device, 128, None, progress=False),
            # the student in the same batches as the teacher: sorted by length (a transformer student pays for padding)
            "student": lambda: logits_by_length(student, dev, device, 128, None, progress=False, local=True)}
    if amp is not None:  # the student in the teacher's precision too: like for like
        import copy
        cast = copy.deepcopy(student).to(amp)
        ways["student in the teacher's precision"] = lambda: logits_by_length(cast, dev, device, 128, None,
                                                                              progress=False, local=True)
    for way in ways.values():
        way()  # warm-up
    speed = {k: len(dev) / statistics.median(t) for k, t in seconds_in_turns(ways, 3).items()}
    size = {"student": sum(p.numel() for p in student.parameters()), "teacher": Teacher.parameters_of(teacher)}
    print(f"distil pair: {args.distil_student} ({size['student'] / 1e6:.2f}M) vs its teacher {args.distil_teacher} "
          f"({size['teacher'] / 1e6:.1f}M, {'bf16' if amp else 'fp32'}), {len(dev)} dev sentences, batches of 128 "
          f"sorted by length, {torch.get_num_threads()} threads, median of 3 in turns")
    print(f"| inference, student vs teacher | {speed['student']:.0f} sentences/s | teacher {speed['teacher']:.1f} "
          f"sentences/s | **{speed['student'] / speed['teacher']:.1f}x** faster, "
          f"{size['teacher'] / size['student']:.1f}x smaller | RNN >= 50x; transformer >= 5x, <= 1/4 the parameters |")
    if amp is not None:
        v = speed["student in the teacher's precision"]
        print(f"| inference, student vs teacher, both in bf16 | {v:.0f} sentences/s | teacher {speed['teacher']:.1f} "
              f"sentences/s | **{v / speed['teacher']:.1f}x** faster | |")


def bench_distil(args, ckpt):
    """distil vs rnn epochs (teacher-logit cache, teacher every batch) and student vs teacher inference."""
    bench_distil_teacher(args)
    import functools
    import io
    from contextlib import redirect_stderr, redirect_stdout
    from data import Examples, load_cola
    from model import (GPT2_TARGETS, DistilRNN, GPTClassifier, RNNConfig, inject_adapters, mark_trainable,
                       merge_adapters)
    from train_utils import TrainConfig, ce_loss, fit, kd_loss, predict_logits
    from utils import load_gpt, load_tokenizer

    device = torch.device("cpu")
    tok = load_tokenizer(args.tokenizer)
    cola = load_cola(args.data_dir)
    sentences, labels = cola["train"]
    # A fixed random subset (not the file's first rows, which come from a few sources only).
    pick = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(0))[:args.distil_sentences].tolist()
    train = Examples.encode(tok, [sentences[i] for i in pick], [labels[i] for i in pick], 128, "distil train")
    n, n_naive = len(train), min(args.distil_naive_sentences, len(train))
    dev = Examples.encode(tok, *(x[:64] for x in cola["dev"]), 128, "distil dev")  # fit's evaluation: untimed

    def subset(k, **extras):
        return Examples(train.ids[:k], train.labels[:k].tolist(), train.pad_id,
                        **{name: v[:k] for name, v in extras.items()})

    teacher = load_gpt(str(ckpt), cls=GPTClassifier, num_labels=2)
    inject_adapters(teacher, "lora", GPT2_TARGETS, r=4, alpha=4.0)
    mark_trainable(teacher)
    merge_adapters(teacher)  # as run.py's Teacher: inference at the base model's speed
    teacher.eval()
    rnn_config = RNNConfig(vocab_size=50257)
    student_params = sum(p.numel() for p in DistilRNN(rnn_config).parameters())
    teacher_params = sum(p.numel() for p in teacher.parameters())
    bs, infer_bs = 32, 64  # run.py's student batch; run.py's teacher-logit batch, for both models' inference

    # The cache: the teacher once over the training sentences (also its warm-up), logits in example order.
    t0 = time.perf_counter()
    logits = predict_logits(teacher, train, device, infer_bs, progress=False)
    cache_s = time.perf_counter() - t0
    cached = Examples(train.ids, train.labels.tolist(), train.pad_id, teacher_logits=logits)
    kd = functools.partial(kd_loss, temperature=2.0, alpha=0.5)

    def kd_teacher_every_batch(student_logits, batch):  # the naive way: the teacher runs in every step
        with torch.no_grad():
            batch["teacher_logits"] = teacher(batch["input_ids"], batch["attention_mask"])
        return kd(student_logits, batch)

    def epoch_seconds(examples, loss_fn):
        """One epoch of train_utils.fit (run.py's student settings) from the same initial student; fit's
        own training time of the epoch, which leaves out its evaluation and file writing."""
        torch.manual_seed(0)
        student = DistilRNN(rnn_config)
        cfg = TrainConfig(epochs=1, lr=2e-3, batch_size=bs, weight_decay=0.0, seed=0)
        with tempfile.TemporaryDirectory(prefix="bench-distil-") as out, \
                redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):  # fit's epoch line, progress bar
            history = fit(student, examples, dev, cfg, device, out, loss_fn=loss_fn)
        return history[-1]["train_seconds"]

    student = DistilRNN(rnn_config).eval()

    def infer(model, examples):
        return timed(lambda: predict_logits(model, examples, device, infer_bs, progress=False))

    infer_set = subset(args.distil_infer_sentences)
    m = len(infer_set)
    warm = 2 * bs  # warm-ups: two batches of each
    epoch_seconds(subset(warm), ce_loss)
    epoch_seconds(subset(warm, teacher_logits=logits), kd)
    epoch_seconds(subset(warm), kd_teacher_every_batch)
    infer(student, subset(warm))
    infer(teacher, subset(warm))
    t_rnn, t_kd, t_naive, t_student, t_teacher = [], [], [], [], []
    for _ in range(args.distil_repeats):  # in turns, so that a slow spell hits all alike
        t_rnn.append(epoch_seconds(train, ce_loss))
        t_kd.append(epoch_seconds(cached, kd))
        t_naive.append(epoch_seconds(subset(n_naive), kd_teacher_every_batch) * n / n_naive)  # per sentence
        t_student.append(infer(student, infer_set))
        t_teacher.append(infer(teacher, infer_set))
    rnn_s, kd_s, naive_s = (statistics.median(t) for t in (t_rnn, t_kd, t_naive))
    student_sps, teacher_sps = m / statistics.median(t_student), m / statistics.median(t_teacher)
    ratio = kd_s / rnn_s
    naive_note = (f"measured on {n_naive} of the {n} sentences, scaled per sentence" if n_naive < n
                  else "measured on all of them")

    def spread(t, fmt="{:.2f} s"):
        return f"{fmt.format(min(t))}-{fmt.format(max(t))}"

    print(f"distil: one epoch of train_utils.fit on a fixed random subset of {n} CoLA training sentences "
          f"({sum(map(len, train.ids))} tokens), batches of {bs}, lr 2e-3, fit's own train_seconds (its dev "
          f"evaluation left out); median of {args.distil_repeats} runs per kind, in turns, after a warm-up. "
          f"Student: DistilRNN with its defaults (biGRU, emb 64, hidden 128, max pool; {student_params / 1e6:.2f}M "
          f"parameters); teacher: our GPTClassifier, gpt2 shape, random weights, LoRA r=4 merged "
          f"({teacher_params / 1e6:.1f}M); kd_loss T=2 alpha=0.5")
    print(f"distil: teacher-logit cache built in {cache_s:.1f} s (one teacher pass over the {n} sentences, "
          f"batches of {infer_bs}; once per data set: run.py keeps it on disk, so later runs skip even that)")
    print(f"distil: teacher every batch: {naive_note}")
    print()
    print("| what | measured | compared with | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| distil epoch (teacher-logit cache) vs rnn epoch, {n} sentences | {kd_s:.2f} s | rnn {rnn_s:.2f} s | "
          f"**{ratio:.2f}x** | <= 1.2x{'' if ratio <= 1.2 else ': **missed**'} |")
    print(f"| distil epoch: teacher-logit cache vs the teacher run every batch | {kd_s:.2f} s | teacher every "
          f"batch {naive_s:.1f} s{f' (timed on {n_naive} sentences, scaled)' if n_naive < n else ''} | "
          f"**{kd_s / naive_s:.3f}x** (the cache: {naive_s / kd_s:.0f}x faster) | |")
    print(f"| inference, student vs teacher ({m} sentences, batches of {infer_bs}, eval, no_grad) | "
          f"{student_sps:.0f} sent/s | teacher {teacher_sps:.1f} sent/s | **{student_sps / teacher_sps:.0f}x** | |")
    print()
    student_spread, teacher_spread = spread([m / t for t in t_student], "{:.0f}"), spread([m / t for t in t_teacher],
                                                                                          "{:.1f}")
    print(f"distil: spread of the runs: rnn {spread(t_rnn)}, distil (cache) {spread(t_kd)}, distil (teacher "
          f"every batch) {spread(t_naive, '{:.1f} s')}; inference student {student_spread} sent/s, teacher "
          f"{teacher_spread} sent/s")
    print(f"distil README: on {n} CoLA sentences a distil epoch with the teacher-logit cache takes {kd_s:.2f} s, "
          f"{ratio:.2f}x an rnn epoch ({rnn_s:.2f} s; target <= 1.2x) and is {naive_s / kd_s:.0f}x faster than one "
          f"running the teacher every batch ({naive_s:.1f} s); the cache costs one teacher pass ({cache_s:.1f} s); the "
          f"student infers {student_sps / teacher_sps:.0f}x faster than the teacher ({student_sps:.0f} vs "
          f"{teacher_sps:.1f} sent/s)", flush=True)


# --------------------------------------------------------------------------- a transformers backbone

def bench_backbone(args):
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, BertConfig, BertModel
    from backbones import HFClassifier
    from model import inject_adapters, mark_trainable
    path = checkpoint(args.workdir, "minilm-shape-random", lambda: BertModel(BertConfig(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)))
    # The batches: CoLA as GPT-2's tokenizer encodes it, ids taken mod BERT's 30522 (random weights: any ids do).
    batches = [{**b, "input_ids": b["input_ids"] % 30522} for b in cola_batches(args)]
    targets = ["query", "value"]  # the bert default of both
    torch.manual_seed(0)
    ours = HFClassifier(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2))
    inject_adapters(ours, "lora", targets, r=8, alpha=8.0, dropout=0.1)
    mark_trainable(ours, train_layernorm=False, head_names=["classifier"])
    torch.manual_seed(0)
    theirs = get_peft_model(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2),
                            LoraConfig(r=8, lora_alpha=8, lora_dropout=0.1, target_modules=targets,
                                       task_type="SEQ_CLS"))
    sides = {"ours": (ours, lambda b: ours(b["input_ids"], b["attention_mask"])),
             "peft": (theirs, lambda b: theirs(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits)}
    counts = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, (m, _) in sides.items()}
    assert counts["ours"] == counts["peft"], counts
    seconds = {k: 0.0 for k in sides}
    for name, (model, logits) in sides.items():
        params = [p for p in model.parameters() if p.requires_grad]
        model.train()
        model.opt = torch.optim.AdamW(params, lr=1e-3)

    def step(name, batch):
        model, logits = sides[name]
        loss = F.cross_entropy(logits(batch), batch["labels"])
        model.opt.zero_grad(set_to_none=True)
        loss.backward()
        model.opt.step()

    for batch in batches[:args.warmup]:
        for name in sides:
            step(name, batch)
    for batch in batches[args.warmup:]:  # in turns, batch by batch: a slow spell hits both
        for name in sides:
            seconds[name] += timed(lambda: step(name, batch))
    n = sum(len(b["labels"]) for b in batches[args.warmup:])
    ours_sps, peft_sps = n / seconds["ours"], n / seconds["peft"]
    print(f"backbone: LoRA r=8 on query, value of a MiniLM-shaped BERT (22.7M), {counts['ours']:,} trainable "
          f"parameters on both sides, {n} CoLA sentences in batches of {args.batch_size}: ours {ours_sps:.1f} "
          f"sent/s, peft {peft_sps:.1f} sent/s: {ours_sps / peft_sps:.2f}x (target >= 1.0)", flush=True)


# --------------------------------------------------------------------------- threads

def bench_threads(args):
    from transformers import GPT2Config, GPT2LMHeadModel
    path = checkpoint(args.workdir, "gpt2-small-random",
                      lambda: GPT2LMHeadModel(GPT2Config(n_layer=4, n_head=4, n_embd=256)))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = Path(args.workdir) / "threads-runs"

    def together(threads, n):
        """n runs started at once; the wall seconds of each."""
        procs = []
        for i in range(n):
            cmd = [sys.executable, str(ROOT / "run.py"), "LoRA", str(i + 1), "--model", str(path), "--tokenizer",
                   args.tokenizer, "--data-dir", args.data_dir, "--limit-train", str(args.threads_sentences),
                   "--epochs", "1", "--out-dir", str(out / f"run{i}"), "--plots-dir", str(out / "plots")]
            cmd += ["--threads", str(threads)] if threads else []
            procs.append((time.perf_counter(), subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                                                stderr=subprocess.PIPE, text=True)))
        seconds = []
        for t0, proc in procs:
            _, err = proc.communicate()
            assert proc.returncode == 0, err[-2000:]
            seconds.append(time.perf_counter() - t0)
        return seconds

    print(f"threads: run.py LoRA, a 4-layer 256-wide GPT-2, {args.threads_sentences} CoLA sentences, 1 epoch "
          f"(+ dev evaluation), {cores} cores", flush=True)
    alone = together(None, 1)[0]
    print(f"threads: one run alone, default threads ({cores}): {alone:.1f} s", flush=True)
    fight = together(None, 2)
    print(f"threads: two runs at once, default threads ({cores} each): "
          f"{' and '.join(f'{t:.1f}' for t in fight)} s ({max(fight) / alone:.1f}x one run alone)", flush=True)
    share = max(1, cores // 2)
    shared = together(share, 2)
    print(f"threads: two runs at once, --threads {share} each: {' and '.join(f'{t:.1f}' for t in shared)} s "
          f"({max(shared) / alone:.1f}x one run alone; {max(fight) / max(shared):.1f}x faster than the default)",
          flush=True)


# --------------------------------------------------------------------------- serving: adapters mixed in a batch

def serve_adapters(args, ckpt, n, layernorms=True):
    """n random LoRA adapters of the checkpoint (r=4 on GPT-2's four layers, layer norms and head trained,
    as `run.py LoRA` makes them by default; or without layer norms, as with --no-train-layernorm), written
    once under WORKDIR/serve-adapters[-no-layernorm]/ as peft's files."""
    from safetensors.torch import save_file
    from model import GPTConfig
    from utils import PEFT_PREFIX, adapter_settings, gpt_config_from_hf, write_json
    c = gpt_config_from_hf(ckpt) if (Path(ckpt) / "config.json").is_file() else GPTConfig()
    shapes = {"attn.c_attn": (c.n_embd, 3 * c.n_embd), "attn.c_proj": (c.n_embd, c.n_embd),
              "mlp.c_fc": (c.n_embd, 4 * c.n_embd), "mlp.c_proj": (4 * c.n_embd, c.n_embd)}
    dirs = []
    for i in range(n):
        d = Path(args.workdir) / ("serve-adapters" if layernorms else "serve-adapters-no-layernorm") / f"a{i}"
        dirs.append(d)
        if (d / "adapter_model.safetensors").is_file():
            continue
        g = torch.Generator().manual_seed(1000 + i)
        t = {}
        for layer in range(c.n_layer):
            for target, (fan_in, fan_out) in shapes.items():
                t[f"transformer.h.{layer}.{target}.lora_A.weight"] = torch.randn(4, fan_in, generator=g) * 0.02
                t[f"transformer.h.{layer}.{target}.lora_B.weight"] = torch.randn(fan_out, 4, generator=g) * 0.02
            for norm in ("ln_1", "ln_2") if layernorms else ():
                t[f"transformer.h.{layer}.{norm}.weight"] = 1 + 0.1 * torch.randn(c.n_embd, generator=g)
                t[f"transformer.h.{layer}.{norm}.bias"] = 0.1 * torch.randn(c.n_embd, generator=g)
        if layernorms:
            t["transformer.ln_f.weight"] = 1 + 0.1 * torch.randn(c.n_embd, generator=g)
            t["transformer.ln_f.bias"] = 0.1 * torch.randn(c.n_embd, generator=g)
        t["score.weight"] = torch.randn(2, c.n_embd, generator=g) * 0.1
        d.mkdir(parents=True, exist_ok=True)
        save_file({PEFT_PREFIX + k: v.contiguous() for k, v in t.items()}, d / "adapter_model.safetensors")
        saved = ["score", "ln_1", "ln_2", "ln_f"] if layernorms else ["score"]
        write_json(d / "adapter_config.json", {**adapter_settings("lora", 4, 4.0, 0.0, False, LORA_TARGETS,
                                                                   modules_to_save=saved),
                                                "base_model_name_or_path": str(ckpt)})
        write_json(d / "run_config.json", {"model": str(ckpt), "tokenizer": args.tokenizer, "task": "cola",
                                           "labels": ["unacceptable", "acceptable"], "max_length": 128})
    return dirs


def serve_sentences(args, n):
    from data import load_cola
    sentences = load_cola(args.data_dir)["train"][0]
    pick = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(0))[:n].tolist()
    return [sentences[i] for i in pick]


def rss_mb():
    """This process's resident memory now (not its peak), in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def serve_memory_worker(args, ckpt):
    """Resident memory of a serving process with 0, 1, 8 and 64 adapters loaded, as one JSON line."""
    import gc
    from types import SimpleNamespace
    from predict import load_base
    from serve import Service
    dirs = serve_adapters(args, ckpt, 64)
    base = load_base({}, SimpleNamespace(model=str(ckpt), tokenizer=args.tokenizer, gguf_file=None),
                     torch.device("cpu"))
    service = Service(base["model"], base["tok"], base["info"], str(ckpt), torch.device("cpu"))
    gc.collect()
    out = {"base_mb": rss_mb(), "params": sum(p.numel() for p in base["model"].parameters()), "adapter_bytes": 0}
    for i, d in enumerate(dirs):
        out["adapter_bytes"] = service.load(f"a{i}", d).size
        if i + 1 in (1, 8, 64):
            gc.collect()
            out[f"rss_{i + 1}_mb"] = rss_mb()
    print(json.dumps(out))


async def load_clients(url, requests, clients):
    """`clients` asyncio clients at once, each sending its share of `requests` one after another: the
    latencies of the answered requests and the failures."""
    import asyncio
    import httpx
    latencies, failures = [], []
    queue = list(enumerate(requests))

    async def client(http):
        while queue:
            _, body = queue.pop()
            t0 = time.perf_counter()
            try:
                r = await http.post(url + "/classify", json=body)
                if r.status_code != 200 or len(r.json()["outputs"]) != len(body["inputs"]):
                    failures.append(f"{r.status_code}: {r.text[:200]}")
                    continue
            except Exception as e:
                failures.append(f"{type(e).__name__}: {e}")
                continue
            latencies.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return latencies, failures, wall


def bench_serve(args, ckpt):
    """Mixed-adapter batches of the service against one adapter, against today's swap-and-merge path and
    against peft's mixed-batch inference; resident memory with 1, 8, 64 adapters; and the HTTP service under
    load from concurrent clients."""
    import asyncio
    import socket
    from types import SimpleNamespace
    from peft import PeftModel
    from transformers import GPT2ForSequenceClassification
    from predict import classify, load_base, swap_adapter
    from serve import Row, Service
    from utils import read_adapter

    t, batch = args.serve_adapters, args.serve_batch
    dirs = serve_adapters(args, ckpt, max(t, 64))
    names = [f"a{i}" for i in range(t)]
    sentences = serve_sentences(args, batch)
    cpu = torch.device("cpu")
    flags = SimpleNamespace(model=str(ckpt), tokenizer=args.tokenizer, gguf_file=None)
    base = load_base({}, flags, cpu)
    service = Service(base["model"], base["tok"], base["info"], str(ckpt), cpu)
    for name, d in zip(names, dirs):
        service.load(name, d)
    # peft's adapter_names= refuses adapters with layer norms in modules_to_save (its mixed batches take
    # Linear, Embedding and Conv modules only): it is compared on the same adapters without them, as ours.
    plain_dirs = serve_adapters(args, ckpt, t, layernorms=False)
    plain = [f"p{i}" for i in range(t)]
    for name, d in zip(plain, plain_dirs):
        service.load(name, d)
    # Today's path (predict): one more base model, each adapter swapped in and merged when its turn comes.
    adapters = {name: read_adapter(d) for name, d in zip(names, dirs)}
    swap_base = load_base(adapters, flags, cpu)
    # peft: transformers' GPT-2 with the same t adapter files loaded, mixed batches through adapter_names=.
    hf = GPT2ForSequenceClassification.from_pretrained(ckpt, num_labels=2, pad_token_id=50256).eval()
    theirs = PeftModel.from_pretrained(hf, plain_dirs[0], adapter_name=plain[0]).eval()
    for name, d in zip(plain[1:], plain_dirs[1:]):
        theirs.load_adapter(d, adapter_name=name)

    stream = [names[i % t] for i in range(batch)]  # a mixed stream: request i for adapter i mod t
    mixed = service.encode([SimpleNamespace(adapter=n, text=s) for n, s in zip(stream, sentences)])
    single = [Row(names[0], r.ids) for r in mixed]
    plain_stream = [plain[i % t] for i in range(batch)]
    plain_mixed = [Row(n, r.ids) for n, r in zip(plain_stream, mixed)]
    ids = [r.ids for r in mixed]
    T = max(map(len, ids))
    peft_ids = torch.tensor([x + [50256] * (T - len(x)) for x in ids])
    peft_mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in ids])

    def ours(rows):
        return [o["probabilities"]["acceptable"] for o in service.run(rows)]

    def peft_mixed():
        with torch.inference_mode():
            logits = theirs(input_ids=peft_ids, attention_mask=peft_mask, adapter_names=plain_stream).logits
        return logits.softmax(-1)[:, 1].tolist()

    def swap_stream(grouped):
        """The stream as predict serves it: consecutive requests of one adapter as one batch, a swap (the
        base's layer norms and head restored, the adapter injected and merged) whenever the adapter changes.
        grouped: first sort the stream by adapter, as predict does for a file (t swaps)."""
        n = batch if grouped else min(batch, args.serve_swap_requests)  # its first requests: it is slow
        order = sorted(range(n), key=lambda i: stream[i]) if grouped else list(range(n))
        out, i = [None] * n, 0
        while i < n:
            j = i
            while j < n and stream[order[j]] == stream[order[i]]:
                j += 1
            clf, tok, extras, max_length = swap_adapter(swap_base, stream[order[i]], adapters[stream[order[i]]], cpu)
            probs = classify(clf, tok, [sentences[k] for k in order[i:j]], max_length, "bench", cpu, 64, None)
            for k, p in zip(order[i:j], probs[:, 1].tolist()):
                out[k] = p
            i = j
        return out

    sides = {"mixed": lambda: ours(mixed), "single": lambda: ours(single), "plain": lambda: ours(plain_mixed),
             "peft": peft_mixed, "swap": lambda: swap_stream(False), "swap_grouped": lambda: swap_stream(True)}
    first = {k: f() for k, f in sides.items()}  # warm-up, and the answers to compare
    agree = {k: max(abs(a - b) for a, b in zip(first["plain" if k == "peft" else "mixed"], first[k]))
             for k in ("peft", "swap", "swap_grouped")}
    seconds = {k: [] for k in sides}
    for r in range(args.serve_repeats):  # in turns, forwards and backwards: a slow spell hits every side alike
        for k in list(sides)[::-1 if r % 2 else 1]:
            seconds[k].append(timed(sides[k]))
    sps = {k: len(first[k]) / statistics.median(v) for k, v in seconds.items()}
    tokens = sum(map(len, ids))
    print(f"serve: a batch of {batch} CoLA sentences ({tokens} tokens), {t} LoRA adapters (r=4 on "
          f"{', '.join(LORA_TARGETS)}, own layer norms and head), request i for adapter i mod {t}; median of "
          f"{args.serve_repeats} runs in turns; sentences/s", flush=True)
    rows = [("ours: mixed batch, one forward", sps["mixed"], ""),
            ("ours: same batch, one adapter", sps["single"],
             f"mixed / single = {sps['mixed'] / sps['single']:.2f}x (target >= 0.8)"),
            (f"today: swap-and-merge per request (first {len(first['swap'])})", sps["swap"],
             f"mixed / swap = {sps['mixed'] / sps['swap']:.1f}x (target >= 3); max |p - ours| {agree['swap']:.1e}"),
            ("today: swap-and-merge, stream sorted by adapter", sps["swap_grouped"],
             f"mixed / this = {sps['mixed'] / sps['swap_grouped']:.2f}x (predict's file mode: {t} swaps); "
             f"max |p - ours| {agree['swap_grouped']:.1e}"),
            ("ours: mixed batch, adapters without layer norms", sps["plain"], ""),
            ("peft: mixed batch (adapter_names=), the same", sps["peft"],
             f"ours / peft = {sps['plain'] / sps['peft']:.2f}x (target >= 1.0); max |p - ours| {agree['peft']:.1e}")]
    for label, v, note in rows:
        print(f"serve:   {label:<50} {v:7.1f}   {note}", flush=True)
    del swap_base, theirs, hf, adapters

    # Memory: a fresh process per figure set, so that only serving's memory is counted.
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_serve_memory", "--workdir",
                           str(args.workdir), "--tokenizer", args.tokenizer, "--threads", str(args.threads)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    one = m["adapter_bytes"] / 2 ** 20
    print(f"serve: resident memory, one process (base: {m['params'] / 1e6:.0f}M parameters, {m['base_mb']:.0f} MB "
          f"resident; one adapter {one:.2f} MB of tensors):", flush=True)
    for k in (1, 8, 64):
        got = m[f"rss_{k}_mb"]
        print(f"serve:   {k:2d} adapters: {got:7.0f} MB = base + {got - m['base_mb']:5.0f} MB "
              f"(t adapters' tensors: {k * one:5.0f} MB)", flush=True)

    # Under load: the HTTP service in its own process, concurrent clients, one input per request.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(ROOT / "run.py"), "serve", "0", "--model", str(ckpt), "--tokenizer", args.tokenizer,
           "--port", str(port), "--threads", str(args.threads), "--log-level", "warning",
           *[f for name, d in zip(names, dirs) for f in ("--adapter", f"{name}={d}")]]
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx
        for _ in range(600):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
            assert server.poll() is None, server.stderr.read()[-3000:]
        g = torch.Generator().manual_seed(1)
        pool = serve_sentences(args, 512)
        n_requests = args.serve_clients * args.serve_requests
        requests = [{"inputs": [{"adapter": names[int(torch.randint(t, (1,), generator=g))],
                                 "text": pool[int(torch.randint(len(pool), (1,), generator=g))]}]}
                    for _ in range(n_requests)]
        asyncio.run(load_clients(url, requests[:args.serve_clients], args.serve_clients))  # warm-up
        before = httpx.get(url + "/health").json()
        latencies, failures, wall = asyncio.run(load_clients(url, requests, args.serve_clients))
        after = httpx.get(url + "/health").json()
    finally:
        server.terminate()
        server.wait(timeout=60)
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    batches = after["batches"] - before["batches"]
    print(f"serve: under load: {args.serve_clients} concurrent clients, {n_requests} requests of one sentence "
          f"(random adapter of {t}) over HTTP: {len(failures)} failed, {len(latencies) / wall:.1f} requests/s, "
          f"latency p50 {q[49] * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms; {batches} forward passes "
          f"({(after['rows'] - before['rows']) / max(batches, 1):.1f} rows each)"
          + (f"; first failure: {failures[0]}" if failures else ""), flush=True)


# --------------------------------------------------------------------------- main

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("what", choices=["gen", "lora", "precision", "distil", "backbone", "threads", "serve", "all",
                                         "_lora_worker", "_serve_memory"],
                   help="what to benchmark")
    p.add_argument("side", nargs="?", choices=["ours", "peft", "ours-dora", "peft-dora"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", help="where the random-weight checkpoint is written, and reused next time; "
                   "None: a temporary directory, removed afterwards")
    p.add_argument("--tokenizer", default=str(ROOT.parent / "shared/data/gpt2-tokenizer"),
                   help="directory with GPT-2's vocab.json and merges.txt")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/cola/raw"),
                   help="directory with CoLA's raw in_domain_train.tsv")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--new-tokens", type=int, default=128, help="gen: tokens to generate")
    p.add_argument("--repeats", type=int, default=5, help="gen: timed runs per side")
    p.add_argument("--samples", type=int, default=4, help="gen: K of the batched-sampling line (K samples vs 1)")
    p.add_argument("--steps", type=int, default=20, help="lora: timed training steps")
    p.add_argument("--warmup", type=int, default=3, help="lora: untimed warm-up steps before them")
    p.add_argument("--batch-size", type=int, default=32, help="lora: sentences per step")
    p.add_argument("--precision-steps", type=int, default=6, help="precision: timed training steps per precision")
    p.add_argument("--eval-batches", type=int, default=5, help="lora: batches (of the timed ones) to evaluate")
    p.add_argument("--eval-repeats", type=int, default=5, help="lora: evaluations, merged and unmerged in turn")
    p.add_argument("--distil-sentences", type=int, default=1024, help="distil: CoLA training sentences per epoch "
                   "(a fixed random subset)")
    p.add_argument("--distil-naive-sentences", type=int, default=256, help="distil: of them, those the epoch that "
                   "runs the teacher every batch trains on (its time is scaled per sentence to the full epoch)")
    p.add_argument("--distil-infer-sentences", type=int, default=256, help="distil: of them, those both models "
                   "infer for the inference speeds")
    p.add_argument("--distil-repeats", type=int, default=5, help="distil: timed runs of each kind, in turns")
    p.add_argument("--distil-teacher-sentences", type=int, default=512, help="distil: CoLA training sentences the "
                   "SmolLM2-shaped teacher labels, the old way and run.py's")
    p.add_argument("--distil-teacher", help="distil: with --distil-student, time this trained student against "
                   "this real teacher (an adapter directory) on the dev set instead")
    p.add_argument("--distil-student", help="distil: a student directory of `run.py distil`")
    p.add_argument("--threads-sentences", type=int, default=2048, help="threads: training sentences of each run")
    p.add_argument("--serve-adapters", type=int, default=8, help="serve: adapters mixed in the batch")
    p.add_argument("--serve-batch", type=int, default=64, help="serve: sentences in the batch")
    p.add_argument("--serve-repeats", type=int, default=5, help="serve: timed runs of each side, in turns")
    p.add_argument("--serve-swap-requests", type=int, default=16, help="serve: requests of the stream that today's "
                   "swap-and-merge path serves (one swap each: slow), for its sentences/s")
    p.add_argument("--serve-clients", type=int, default=100, help="serve: concurrent HTTP clients")
    p.add_argument("--serve-requests", type=int, default=4, help="serve: requests per client")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-gpt2-")
        args.workdir = tmp.name
    quiet_transformers()
    if args.what == "threads":
        return bench_threads(args)
    if args.what == "backbone":
        return bench_backbone(args)
    if args.what == "distil" and (args.distil_teacher or args.distil_student):
        if not (args.distil_teacher and args.distil_student):
            p.error("--distil-teacher and --distil-student go together: a student and the teacher it learned from")
        return bench_kd_pair(args)
    ckpt = checkpoint(args.workdir)
    if args.what == "_lora_worker":
        return lora_worker(args.side, args, ckpt)
    if args.what == "_serve_memory":
        return serve_memory_worker(args, ckpt)
    import peft
    import transformers
    print(f"bench: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
          f"CPU, float32, torch threads: {torch.get_num_threads()} (of {os.cpu_count()} cores); random-weight "
          f"gpt2-shaped checkpoint in {ckpt}", flush=True)
    if args.what in ("gen", "all"):
        bench_gen(args, ckpt)
    if args.what in ("lora", "all"):
        bench_lora(args, ckpt)
    if args.what in ("precision", "all"):
        bench_precision(args, ckpt)
    if args.what in ("distil", "all"):
        bench_distil(args, ckpt)
    if args.what == "serve":
        bench_serve(args, ckpt)
    if args.what == "all":
        bench_backbone(args)


if __name__ == "__main__":
    main()
