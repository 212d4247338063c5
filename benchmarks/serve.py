"""serve: `run.py serve`'s mixed-adapter batches against one adapter, today's swap-and-merge path (predict's)
and peft's mixed batches (adapter_names=); resident memory with 1, 8, 64 adapters; the HTTP service under load.

The memory figures come from a worker process, `bench.py _serve_memory` (serve_memory_worker), which prints them
as one JSON line; peft and transformers' GPT-2 are imported only where peft's side is built, so that the worker
counts serving's memory alone.
"""
import asyncio
import gc
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from benchmarks.common import BENCH, LORA_TARGETS, ROOT, rss_mb, timed
from data import load_cola
from model import GPTConfig
from predict import classify, load_base, swap_adapter
from serve import Row, Service
from utils import PEFT_PREFIX, adapter_settings, gpt_config_from_hf, read_adapter, write_json

CPU = torch.device("cpu")


def bench_serve(args, ckpt):
    """Mixed-adapter batches of the service against one adapter, against today's swap-and-merge path and
    against peft's mixed-batch inference; resident memory with 1, 8, 64 adapters; and the HTTP service under
    load from concurrent clients."""
    t = args.serve_adapters
    dirs = serve_adapters(args, ckpt, max(t, 64))[:t]
    names = [f"a{i}" for i in range(t)]
    bench_batches(args, ckpt, names, dirs)
    bench_memory(args)
    bench_under_load(args, ckpt, names, dirs)


# --------------------------------------------------------------------------- the adapters and the sentences

def serve_adapters(args, ckpt, n, layernorms=True):
    """n random LoRA adapters of the checkpoint (r=4 on GPT-2's four layers, layer norms and head trained,
    as `run.py LoRA` makes them by default; or without layer norms, as with --no-train-layernorm), written
    once under WORKDIR/serve-adapters[-no-layernorm]/ as peft's files."""
    dirs = []
    for i in range(n):
        d = Path(args.workdir) / ("serve-adapters" if layernorms else "serve-adapters-no-layernorm") / f"a{i}"
        dirs.append(d)
        if not (d / "adapter_model.safetensors").is_file():
            write_adapter(args, ckpt, d, torch.Generator().manual_seed(1000 + i), layernorms)
    return dirs


def write_adapter(args, ckpt, d, g, layernorms):
    """One random adapter (from generator g) into directory d, as `run.py LoRA` writes one."""
    c = gpt_config_from_hf(ckpt) if (Path(ckpt) / "config.json").is_file() else GPTConfig()
    shapes = {"attn.c_attn": (c.n_embd, 3 * c.n_embd), "attn.c_proj": (c.n_embd, c.n_embd),
              "mlp.c_fc": (c.n_embd, 4 * c.n_embd), "mlp.c_proj": (4 * c.n_embd, c.n_embd)}
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


def serve_sentences(args, n):
    sentences = load_cola(args.data_dir)["train"][0]
    pick = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(0))[:n].tolist()
    return [sentences[i] for i in pick]


# --------------------------------------------------------------------------- one batch, every way to serve it

def bench_batches(args, ckpt, names, dirs):
    """One batch of CoLA sentences, request i for adapter i mod t, served every way in turns: sentences/s."""
    sentences = serve_sentences(args, args.serve_batch)
    sides, tokens = ways_to_serve(args, ckpt, names, dirs, sentences)
    first = {k: f() for k, f in sides.items()}  # warm-up, and the answers to compare
    agree = {k: max(abs(a - b) for a, b in zip(first["plain" if k == "peft" else "mixed"], first[k]))
             for k in ("peft", "swap", "swap_grouped")}
    seconds = {k: [] for k in sides}
    for r in range(args.serve_repeats):  # in turns, forwards and backwards: a slow spell hits every side alike
        for k in list(sides)[::-1 if r % 2 else 1]:
            seconds[k].append(timed(sides[k]))
    sps = {k: len(first[k]) / statistics.median(v) for k, v in seconds.items()}
    print_batches(args, len(names), tokens, len(first["swap"]), sps, agree)


def ways_to_serve(args, ckpt, names, dirs, sentences):
    """{way: a call serving the batch that way, which returns each request's P(acceptable)}, and the batch's
    tokens. Ours mixed, ours for one adapter, predict's swap-and-merge, and (on the same adapters without layer
    norms, which peft's mixed batches refuse) ours and peft mixed."""
    t, batch = len(names), len(sentences)
    # peft's adapter_names= refuses adapters with layer norms in modules_to_save (its mixed batches take
    # Linear, Embedding and Conv modules only): it is compared on the same adapters without them, as ours.
    plain, plain_dirs = [f"p{i}" for i in range(t)], serve_adapters(args, ckpt, t, layernorms=False)
    service = our_service(args, ckpt, [*zip(names, dirs), *zip(plain, plain_dirs)])
    stream = [names[i % t] for i in range(batch)]  # a mixed stream: request i for adapter i mod t
    # Today's path (predict): one more base model, each adapter swapped in and merged when its turn comes.
    swap = SwapAndMerge(args, ckpt, {name: read_adapter(d) for name, d in zip(names, dirs)}, stream, sentences)
    theirs = peft_model(ckpt, plain, plain_dirs)

    mixed = service.encode([SimpleNamespace(adapter=n, text=s) for n, s in zip(stream, sentences)])
    single = [Row(names[0], r.ids) for r in mixed]
    plain_stream = [plain[i % t] for i in range(batch)]
    plain_mixed = [Row(n, r.ids) for n, r in zip(plain_stream, mixed)]
    ids = [r.ids for r in mixed]
    peft_ids, peft_mask = padded(ids)

    def ours(rows):
        return [o["probabilities"]["acceptable"] for o in service.run(rows)]

    sides = {"mixed": lambda: ours(mixed), "single": lambda: ours(single), "plain": lambda: ours(plain_mixed),
             "peft": lambda: peft_mixed(theirs, peft_ids, peft_mask, plain_stream),
             "swap": lambda: swap(grouped=False), "swap_grouped": lambda: swap(grouped=True)}
    return sides, sum(map(len, ids))


def our_service(args, ckpt, adapters):
    """serve.Service over the checkpoint with the adapters [(name, directory)] loaded."""
    base = load_base({}, SimpleNamespace(model=str(ckpt), tokenizer=args.tokenizer, gguf_file=None), CPU)
    service = Service(base["model"], base["tok"], base["info"], str(ckpt), CPU)
    for name, d in adapters:
        service.load(name, d)
    return service


def peft_model(ckpt, names, dirs):
    """transformers' GPT-2 with the adapter files loaded under their names, for mixed batches (adapter_names=)."""
    from peft import PeftModel
    from transformers import GPT2ForSequenceClassification
    hf = GPT2ForSequenceClassification.from_pretrained(ckpt, num_labels=2, pad_token_id=50256).eval()
    theirs = PeftModel.from_pretrained(hf, dirs[0], adapter_name=names[0]).eval()
    for name, d in zip(names[1:], dirs[1:]):
        theirs.load_adapter(d, adapter_name=name)
    return theirs


def padded(ids):
    """The rows of token ids as one batch for transformers: ids padded with end-of-text, and the mask."""
    T = max(map(len, ids))
    return (torch.tensor([x + [50256] * (T - len(x)) for x in ids]),
            torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in ids]))


def peft_mixed(theirs, ids, mask, stream):
    """peft's P(acceptable) of each row of the batch, row i through adapter stream[i]."""
    with torch.inference_mode():
        logits = theirs(input_ids=ids, attention_mask=mask, adapter_names=stream).logits
    return logits.softmax(-1)[:, 1].tolist()


class SwapAndMerge:
    """The stream as predict serves it: consecutive requests of one adapter as one batch, a swap (the base's
    layer norms and head restored, the adapter injected and merged) whenever the adapter changes."""

    def __init__(self, args, ckpt, adapters, stream, sentences):
        flags = SimpleNamespace(model=str(ckpt), tokenizer=args.tokenizer, gguf_file=None)
        self.base, self.adapters = load_base(adapters, flags, CPU), adapters
        self.stream, self.sentences, self.requests = stream, sentences, args.serve_swap_requests

    def __call__(self, grouped):
        """P(acceptable) of the stream's first --serve-swap-requests requests (it is slow), or, grouped, of the
        whole stream first sorted by adapter, as predict does for a file (t swaps)."""
        stream = self.stream
        n = len(stream) if grouped else min(len(stream), self.requests)
        order = sorted(range(n), key=lambda i: stream[i]) if grouped else list(range(n))
        out, i = [None] * n, 0
        while i < n:
            j = i
            while j < n and stream[order[j]] == stream[order[i]]:
                j += 1
            name = stream[order[i]]
            clf, tok, extras, max_length = swap_adapter(self.base, name, self.adapters[name], CPU)
            probs = classify(clf, tok, [self.sentences[k] for k in order[i:j]], max_length, "bench", CPU, 64, None)
            for k, p in zip(order[i:j], probs[:, 1].tolist()):
                out[k] = p
            i = j
        return out


def print_batches(args, t, tokens, swap_requests, sps, agree):
    batch = args.serve_batch
    print(f"serve: a batch of {batch} CoLA sentences ({tokens} tokens), {t} LoRA adapters (r=4 on "
          f"{', '.join(LORA_TARGETS)}, own layer norms and head), request i for adapter i mod {t}; median of "
          f"{args.serve_repeats} runs in turns; sentences/s", flush=True)
    rows = [("ours: mixed batch, one forward", sps["mixed"], ""),
            ("ours: same batch, one adapter", sps["single"],
             f"mixed / single = {sps['mixed'] / sps['single']:.2f}x (target >= 0.8)"),
            (f"today: swap-and-merge per request (first {swap_requests})", sps["swap"],
             f"mixed / swap = {sps['mixed'] / sps['swap']:.1f}x (target >= 3); max |p - ours| {agree['swap']:.1e}"),
            ("today: swap-and-merge, stream sorted by adapter", sps["swap_grouped"],
             f"mixed / this = {sps['mixed'] / sps['swap_grouped']:.2f}x (predict's file mode: {t} swaps); "
             f"max |p - ours| {agree['swap_grouped']:.1e}"),
            ("ours: mixed batch, adapters without layer norms", sps["plain"], ""),
            ("peft: mixed batch (adapter_names=), the same", sps["peft"],
             f"ours / peft = {sps['plain'] / sps['peft']:.2f}x (target >= 1.0); max |p - ours| {agree['peft']:.1e}")]
    for label, v, note in rows:
        print(f"serve:   {label:<50} {v:7.1f}   {note}", flush=True)


# --------------------------------------------------------------------------- resident memory

def bench_memory(args):
    """Resident memory with 1, 8, 64 adapters: a fresh process, so that only serving's memory is counted."""
    proc = subprocess.run([sys.executable, str(BENCH), "_serve_memory", "--workdir", str(args.workdir),
                           "--tokenizer", args.tokenizer, "--threads", str(args.threads)],
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


def serve_memory_worker(args, ckpt):
    """Resident memory of a serving process with 0, 1, 8 and 64 adapters loaded, as one JSON line."""
    dirs = serve_adapters(args, ckpt, 64)
    base = load_base({}, SimpleNamespace(model=str(ckpt), tokenizer=args.tokenizer, gguf_file=None), CPU)
    service = Service(base["model"], base["tok"], base["info"], str(ckpt), CPU)
    gc.collect()
    out = {"base_mb": rss_mb(), "params": sum(p.numel() for p in base["model"].parameters()), "adapter_bytes": 0}
    for i, d in enumerate(dirs):
        out["adapter_bytes"] = service.load(f"a{i}", d).size
        if i + 1 in (1, 8, 64):
            gc.collect()
            out[f"rss_{i + 1}_mb"] = rss_mb()
    print(json.dumps(out))


# --------------------------------------------------------------------------- the HTTP service under load

def bench_under_load(args, ckpt, names, dirs):
    """The HTTP service in its own process, concurrent clients, one input per request."""
    port = free_port()
    server = start_server(args, ckpt, port, names, dirs)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx
        wait_until_healthy(url, server)
        requests = random_requests(args, names)
        asyncio.run(load_clients(url, requests[:args.serve_clients], args.serve_clients))  # warm-up
        before = httpx.get(url + "/health").json()
        latencies, failures, wall = asyncio.run(load_clients(url, requests, args.serve_clients))
        after = httpx.get(url + "/health").json()
    finally:
        server.terminate()
        server.wait(timeout=60)
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    batches = after["batches"] - before["batches"]
    print(f"serve: under load: {args.serve_clients} concurrent clients, {len(requests)} requests of one sentence "
          f"(random adapter of {len(names)}) over HTTP: {len(failures)} failed, {len(latencies) / wall:.1f} "
          f"requests/s, latency p50 {q[49] * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms; {batches} forward passes "
          f"({(after['rows'] - before['rows']) / max(batches, 1):.1f} rows each)"
          + (f"; first failure: {failures[0]}" if failures else ""), flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, ckpt, port, names, dirs):
    """`run.py serve` with the adapters, in its own process."""
    cmd = [sys.executable, str(ROOT / "run.py"), "serve", "0", "--model", str(ckpt), "--tokenizer", args.tokenizer,
           "--port", str(port), "--threads", str(args.threads), "--log-level", "warning",
           *[f for name, d in zip(names, dirs) for f in ("--adapter", f"{name}={d}")]]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_until_healthy(url, server):
    import httpx
    for _ in range(600):
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.5)
        assert server.poll() is None, server.stderr.read()[-3000:]


def random_requests(args, names):
    """--serve-clients x --serve-requests bodies of one sentence each, for a random adapter (seeded)."""
    g = torch.Generator().manual_seed(1)
    pool = serve_sentences(args, 512)
    t = len(names)
    return [{"inputs": [{"adapter": names[int(torch.randint(t, (1,), generator=g))],
                         "text": pool[int(torch.randint(len(pool), (1,), generator=g))]}]}
            for _ in range(args.serve_clients * args.serve_requests)]


async def load_clients(url, requests, clients):
    """`clients` asyncio clients at once, each sending its share of `requests` one after another: the
    latencies of the answered requests and the failures."""
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
