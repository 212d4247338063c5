"""`run.py serve` as a client meets it: the server started on a free port in a subprocess (one for the
module), over real HTTP. Mixed adapters in one batch equal `predict` with each adapter alone; every bad input
is a 4xx with a one-line JSON message; adapters load and unload at runtime, only from --adapters-dir."""
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, needs_tokenizer, run, user_error
from conftest import make_adapter as conftest_adapter

pytestmark = needs_tokenizer

COLA = ["unacceptable", "acceptable"]
THREE = ["negative", "neutral", "positive"]
SENTENCES = ["The cat sat on the mat.", "Mat the on sat cat the.", "Colorless green ideas sleep furiously.",
             "She read the book that he wrote.", "Him gave it she."]
GPT2_LORA = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def make_adapter(base_dir, out_dir, kind, targets, feedforward=(), layernorms=True, labels=COLA, seed=0):
    """conftest's adapter, with alpha 4 and a task name (as GET /adapters shows it)."""
    return conftest_adapter(base_dir, out_dir, kind, targets, feedforward, layernorms, labels, alpha=4.0, seed=seed,
                            task="test")


def make_virtual_adapter(base_dir, out_dir, kind, n, seed):
    """A prompt or prefix tuning adapter of n virtual tokens (head and layer norms trained), as `run.py LoRA
    --peft prompt|prefix` saves it."""
    from test_prompts import our_gpt, with_virtual_tokens
    from utils import save_adapter
    model = our_gpt(base_dir)
    settings = with_virtual_tokens(model, kind, n, None, ["score"], ["ln_1", "ln_2", "ln_f"], seed)
    save_adapter(model, out_dir, settings, {"model": str(base_dir), "tokenizer": str(base_dir), "labels": COLA,
                                            "max_length": 128, "task": "test"})
    return out_dir


def make_peft_adapter(base_dir, out_dir):
    """A LoRA adapter that peft itself makes and saves (layer norms and head in modules_to_save), and that
    peft model, for its own outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2ForSequenceClassification
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    torch.manual_seed(6)
    model = GPT2ForSequenceClassification.from_pretrained(base_dir, num_labels=2, pad_token_id=50256)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["attn.c_attn", "mlp.c_fc"], fan_in_fan_out=True,
                        modules_to_save=["score", "ln_1", "ln_f"], task_type="SEQ_CLS")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for _, p in sorted(peft_model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.3)
    peft_model.save_pretrained(out_dir)
    return out_dir, peft_model.eval()


def make_student(base_dir, out_dir):
    from model import DistilRNN, RNNConfig
    from utils import load_tokenizer, save_student, tokenizer_fingerprint
    torch.manual_seed(5)
    student = DistilRNN(RNNConfig(emb_dim=16, hidden=16)).eval()
    save_student(student, out_dir, {"tokenizer": str(base_dir), "labels": COLA, "max_length": 128, "task": "test",
                                    "tokenizer_fingerprint": tokenizer_fingerprint(load_tokenizer(base_dir))})
    return out_dir


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url, method="GET", body=None, raw=None, content_type="application/json"):
    """(status, parsed JSON body) of one HTTP request; body as JSON, or raw bytes as they are."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None and content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        assert "Traceback" not in text and "\n" not in text.strip(), text
        return e.code, json.loads(text)


def make_transformer_student(base_dir, out_dir):
    """A transformer student of the tiny GPT-2: its layer 1 alone, a vocabulary cut to a few hundred tokens."""
    from model import GPTClassifier
    from student import TransformerStudent
    from utils import load_gpt, load_tokenizer, save_student, tokenizer_fingerprint
    torch.manual_seed(6)
    net = load_gpt(base_dir, cls=GPTClassifier, num_labels=2)
    tok = load_tokenizer(base_dir)
    kept = sorted({t for s in SENTENCES for t in tok(s)["input_ids"]} | set(range(300)))
    student = TransformerStudent.from_model(net, [1], "every", "base", kept=kept).eval()
    save_student(student, out_dir, {"tokenizer": str(base_dir), "labels": COLA, "max_length": 128, "task": "test",
                                    "tokenizer_fingerprint": tokenizer_fingerprint(tok)})
    return out_dir


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):
    """--adapters-dir with a LoRA (layer norms trained), an IA3 (layer norms trained), a LoRA on c_attn alone
    (no layer norms), a LoRA with three labels, a student, and two that do not fit the tiny base."""
    from safetensors.torch import save_file
    from utils import adapter_settings, write_json
    root = tmp_path_factory.mktemp("adapters")
    made = {"a": make_adapter(tiny_dir, root / "a", "lora", GPT2_LORA, seed=0),
            "b": make_adapter(tiny_dir, root / "b", "ia3", ["attn.c_attn", "mlp.c_proj"], ["mlp.c_proj"], seed=1),
            "c": make_adapter(tiny_dir, root / "c", "lora", ["attn.c_attn"], layernorms=False, seed=2),
            "three": make_adapter(tiny_dir, root / "three", "lora", GPT2_LORA, labels=THREE, seed=3),
            "s": make_student(tiny_dir, root / "s"), "t": make_transformer_student(tiny_dir, root / "t")}
    bert = root / "bert"  # a peft adapter of another architecture
    write_json(bert / "adapter_config.json", adapter_settings("lora", target_modules=["query", "value"]))
    save_file({"base_model.model.encoder.layer.0.attention.self.query.lora_A.weight": torch.zeros(4, 32)},
              bert / "adapter_model.safetensors")
    from conftest import TINY, save_hf_gpt2
    wider = save_hf_gpt2(root / "wider-base", **{**TINY, "n_embd": 32})
    made["wider"] = make_adapter(wider, root / "wider", "lora", ["attn.c_attn"], seed=4)  # another model size
    made["bert"] = bert
    made["peft"], made["peft_model"] = make_peft_adapter(tiny_dir, root / "peft")
    outside = make_adapter(tiny_dir, tmp_path_factory.mktemp("outside") / "a", "lora", GPT2_LORA, seed=0)
    (root / "escape").symlink_to(outside, target_is_directory=True)  # a link that leads out
    return root, made


@pytest.fixture(scope="module")
def server(tiny_dir, adapters):
    root, made = adapters
    port = free_port()
    flags = [f for name in ("a", "b", "c", "three", "s", "t") for f in ("--adapter", f"{name}={made[name]}")]
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PATH": ""}
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "serve", "7", *flags, "--adapters-dir", str(root),
                             "--port", str(port), "--threads", "1", "--log-level", "warning", "--batch-window", "20"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if call(url + "/health")[0] == 200:
                break
        except (urllib.error.URLError, ConnectionError):
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.2)
    yield url
    proc.terminate()
    out = proc.communicate(timeout=30)[0]
    assert "Traceback" not in out, out[-3000:]


def predicted(tiny_dir, adapter_dir, sentences):
    """Class probabilities of `predict` with this adapter alone (or this student), computed here."""
    from machine import pick_device
    from predict import classify, load_base, load_student_classifier, swap_adapter
    from utils import is_student_dir, read_adapter
    device = pick_device("cpu")
    if is_student_dir(adapter_dir):
        clf, tok, extras, max_length = load_student_classifier(adapter_dir, None, device)
    else:
        adapter = read_adapter(adapter_dir)
        base = load_base({"x": adapter}, SimpleNamespace(model=None, tokenizer=None, gguf_file=None), device)
        clf, tok, extras, max_length = swap_adapter(base, "x", adapter, device)
    return classify(clf, tok, sentences, max_length, "x", device, 64, None)


# --------------------------------------------------------------------------- mixed adapters

def test_mixed_adapters_in_one_request_equal_predict(server, adapters, tiny_dir):
    _, made = adapters
    names = ["a", "b", "c", "three", "s", "t"]
    inputs = [{"adapter": names[(i + j) % len(names)], "text": s} for i, s in enumerate(SENTENCES) for j in range(3)]
    status, body = call(server + "/classify", "POST", {"inputs": inputs})
    assert status == 200, body
    outputs = body["outputs"]
    assert [o["adapter"] for o in outputs] == [x["adapter"] for x in inputs]  # input order
    for name in names:
        mine = [(x["text"], o) for x, o in zip(inputs, outputs) if x["adapter"] == name]
        expected = predicted(tiny_dir, made[name], [t for t, _ in mine])
        labels = THREE if name == "three" else COLA
        for (_, o), p in zip(mine, expected):
            assert list(o["probabilities"]) == labels
            assert max(abs(o["probabilities"][k] - float(q)) for k, q in zip(labels, p)) <= 1e-5, (name, o, p)
            assert o["label"] == labels[int(p.argmax())] and o["probability"] == max(o["probabilities"].values())
    assert len({round(o["probability"], 6) for o in outputs}) > 5  # the adapters really differ


def routed_batch(tok, rows, names):
    """[(adapter name, sentence)] as serve batches them: the rows' order sorted by adapter (in `names`' order),
    their encoding, and each adapter's span of rows."""
    order = sorted(range(len(rows)), key=lambda i: names.index(rows[i][0]))
    enc = tok([rows[i][1] for i in order], padding=True, return_tensors="pt")
    spans, start = [], 0
    for name in names:
        n = sum(rows[i][0] == name for i in order)
        spans.append((name, start, start + n))
        start += n
    return order, enc, spans


def test_a_dora_adapter_mixed_with_lora_and_ia3_equals_each_alone(tiny_dir, adapters):
    """multi_adapter: a batch of rows for a DoRA adapter (d), a LoRA (a) and an IA3 (b) gives each row its adapter's
    logits alone (our DoRALinear, tested against peft). DoRA scales W x per output, never the bias: a scaled bias,
    or the scale left out, moves these logits by > 1e-2."""
    from model import GPTClassifier
    from multi_adapter import Routing, add_adapter, routed
    from utils import attach_adapter, load_gpt, load_tokenizer, read_adapter
    from safetensors.torch import load_file, save_file
    from conftest import copy_checkpoint
    root, made = adapters
    # transformers' GPT-2 starts its biases at zero, where a scaled bias would not show: a copy with random ones.
    base = copy_checkpoint(tiny_dir, root.parent / "biased-base", with_tokenizer=True)
    weights = load_file(base / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    save_file({k: t + 0.3 * torch.randn(t.shape, generator=g) if k.endswith(("attn.bias", "proj.bias", "fc.bias"))
               else t for k, t in weights.items()}, base / "model.safetensors")
    tiny_dir = base
    d = make_adapter(tiny_dir, root.parent / "dora-d", "dora", GPT2_LORA, seed=7)
    dirs = {"d": d, "a": made["a"], "b": made["b"]}  # a and b: trained on the other base, of the same shapes
    tok = load_tokenizer(tiny_dir)
    model = load_gpt(tiny_dir, cls=GPTClassifier, num_labels=2).eval()
    assert model.transformer.h[0].attn.c_attn.bias.abs().max() > 0.1
    for name, path in dirs.items():
        add_adapter(model, name, *read_adapter(path)[:2])
    rows = [("d", SENTENCES[0]), ("d", SENTENCES[1]), ("a", SENTENCES[2]), ("b", SENTENCES[3]), ("b", SENTENCES[4]),
            ("d", SENTENCES[4])]
    order, enc, spans = routed_batch(tok, rows, list(dirs))
    with torch.no_grad(), routed(model, Routing(spans, enc["attention_mask"].sum(1))):
        mixed = model(enc["input_ids"], enc["attention_mask"])
    for k, i in enumerate(order):
        name, text = rows[i]
        alone = load_gpt(tiny_dir, cls=GPTClassifier, num_labels=2).eval()
        attach_adapter(alone, *read_adapter(dirs[name])[:2])
        with torch.no_grad():
            want = alone(tok(text, return_tensors="pt")["input_ids"])[0]
        # Logits ~1 of two 64-wide layers: the same sums in other orders, ~1e-7 apart.
        torch.testing.assert_close(mixed[k], want, rtol=1e-5, atol=1e-5, msg=name)
    # Not vacuous: DoRA's rows are not its LoRA part alone (m / ||W + s B A|| is far from 1 here).
    settings, tensors, _ = read_adapter(d)
    lora = load_gpt(tiny_dir, cls=GPTClassifier, num_labels=2).eval()
    attach_adapter(lora, {**settings, "kind": "lora"}, {k: t for k, t in tensors.items() if "magnitude" not in k})
    with torch.no_grad():
        assert (lora(tok(SENTENCES[0], return_tensors="pt")["input_ids"])[0] - mixed[0]).abs().max() > 1e-2


def test_a_dora_adapter_over_http_in_a_mixed_request_equals_predict(server, adapters, tiny_dir):
    root, made = adapters
    make_adapter(tiny_dir, root / "dora", "dora", GPT2_LORA, seed=8)
    status, info = call(server + "/adapters/dora", "PUT")
    assert status == 201 and info["method"] == "DoRA" and info["rank"] == 2
    try:
        inputs = [{"adapter": n, "text": s} for s in SENTENCES for n in ("dora", "a", "b")]
        status, body = call(server + "/classify", "POST", {"inputs": inputs})
        assert status == 200, body
        for name, path in (("dora", root / "dora"), ("a", made["a"]), ("b", made["b"])):
            got = [o for x, o in zip(inputs, body["outputs"]) if x["adapter"] == name]
            for o, p in zip(got, predicted(tiny_dir, path, SENTENCES)):  # predict: alone, merged
                assert max(abs(o["probabilities"][k] - float(q)) for k, q in zip(COLA, p)) <= 1e-5, (name, o, p)
    finally:
        assert call(server + "/adapters/dora", "DELETE")[0] == 200


def test_prompt_and_prefix_adapters_mixed_with_lora_and_ia3_equal_each_alone(tiny_dir, adapters):
    """multi_adapter.classify: rows of a prompt adapter (5 virtual tokens), a prefix adapter (3), a LoRA and an
    IA3 adapter, and the base model's (no adapter), in one batch, each row its adapter's logits alone
    (prompts.VirtualTokens.classify, tested against peft)."""
    from model import GPTClassifier
    from multi_adapter import Routing, add_adapter, classify, routed
    from test_prompts import without_virtual_tokens
    from utils import attach_adapter, load_gpt, load_tokenizer, read_adapter
    root, made = adapters
    dirs = {"p": make_virtual_adapter(tiny_dir, root.parent / "prompt-p", "prompt", 5, seed=1),
            "f": make_virtual_adapter(tiny_dir, root.parent / "prefix-f", "prefix", 3, seed=2),
            "a": made["a"], "b": made["b"]}
    tok = load_tokenizer(tiny_dir)
    model = load_gpt(tiny_dir, cls=GPTClassifier, num_labels=2).eval()
    for name, path in dirs.items():
        add_adapter(model, name, *read_adapter(path)[:2])
    names = [*dirs, "base"]  # "base": rows of no adapter
    rows = [(names[(i + j) % len(names)], s) for i, s in enumerate(SENTENCES) for j in range(2)]
    order, enc, spans = routed_batch(tok, rows, names)
    with torch.no_grad(), routed(model, Routing(spans, enc["attention_mask"].sum(1))):
        mixed = classify(model, enc["input_ids"], enc["attention_mask"])
    for k, i in enumerate(order):
        name, text = rows[i]
        alone = model  # unrouted: the base model, its own head
        if name != "base":
            alone = attach_adapter(load_gpt(tiny_dir, cls=GPTClassifier, num_labels=2).eval(),
                                   *read_adapter(dirs[name])[:2])
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            want = alone(ids)[0]
        torch.testing.assert_close(mixed[k], want, rtol=1e-5, atol=1e-5, msg=f"{name}: {text}")
        if name in ("p", "f"):  # not vacuous: the virtual tokens move the logits
            assert (without_virtual_tokens(alone, ids, None)[0] - want).abs().max() > 1e-3


def test_prompt_and_prefix_adapters_over_http_in_a_mixed_request_equal_predict(server, adapters, tiny_dir):
    root, made = adapters
    make_virtual_adapter(tiny_dir, root / "prompt", "prompt", 4, seed=3)
    make_virtual_adapter(tiny_dir, root / "prefix", "prefix", 6, seed=4)
    for name, method in (("prompt", "prompt tuning"), ("prefix", "prefix tuning")):
        status, info = call(server + f"/adapters/{name}", "PUT")
        assert status == 201 and info["method"] == method and info["rank"] is None, info
    try:
        inputs = [{"adapter": n, "text": s} for s in SENTENCES for n in ("prompt", "a", "prefix", "b", "s")]
        status, body = call(server + "/classify", "POST", {"inputs": inputs})
        assert status == 200, body
        for name, path in (("prompt", root / "prompt"), ("prefix", root / "prefix"), ("a", made["a"]),
                           ("b", made["b"]), ("s", made["s"])):
            got = [o for x, o in zip(inputs, body["outputs"]) if x["adapter"] == name]
            for o, p in zip(got, predicted(tiny_dir, path, SENTENCES)):
                assert max(abs(o["probabilities"][k] - float(q)) for k, q in zip(COLA, p)) <= 1e-5, (name, o, p)
    finally:
        for name in ("prompt", "prefix"):
            assert call(server + f"/adapters/{name}", "DELETE")[0] == 200


def test_virtual_tokens_on_a_transformers_backbone_are_refused_in_one_paragraph(tmp_path):
    """Mixed prompt/prefix rows run on our GPT-2 only: on a transformers backbone, a ValueError saying what, why
    and what to do (serve: exit 2 at start, 422 at PUT), the model unchanged."""
    from backbones import load_hf_classifier
    from multi_adapter import add_adapter
    from test_backbones import save_tiny
    model = load_hf_classifier(save_tiny(tmp_path, "llama"), 2)[0]
    settings = {"kind": "prompt", "num_virtual_tokens": 2, "token_dim": 32, "num_layers": 2, "num_attention_heads": 4}
    with pytest.raises(ValueError, match="our GPT-2 only.*run.py predict") as e:
        add_adapter(model, "p", settings, {"prompt_encoder.embedding.weight": torch.zeros(2, 32)})
    assert "\n" not in str(e.value) and "virtual_tokens" not in model._modules


def test_concurrent_requests_share_batches(server):
    """Requests that arrive together run as one forward: fewer batches than requests, answers unchanged."""
    inputs = [{"adapter": n, "text": s} for n, s in zip("abcab", SENTENCES)]
    alone = [call(server + "/classify", "POST", {"inputs": [x]})[1]["outputs"][0] for x in inputs]
    before = call(server + "/health")[1]
    results = [None] * 20
    barrier = threading.Barrier(len(results))

    def client(i):
        barrier.wait()
        results[i] = call(server + "/classify", "POST", {"inputs": [inputs[i % len(inputs)]]})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = call(server + "/health")[1]
    assert after["rows"] - before["rows"] == len(results)
    assert after["batches"] - before["batches"] < len(results), (before, after)
    for i, (status, body) in enumerate(results):
        assert status == 200
        got, want = body["outputs"][0], alone[i % len(inputs)]
        assert got["label"] == want["label"] and abs(got["probability"] - want["probability"]) <= 1e-5


# --------------------------------------------------------------------------- bad input: 4xx, one line, no traceback

def test_bad_requests_get_a_one_line_4xx(server):
    url = server + "/classify"
    status, body = call(url, "POST", {"inputs": [{"adapter": "a", "text": "fine"}, {"adapter": "nope", "text": "x"}]})
    assert status == 404 and "'nope'" in body["error"] and "a, b, c, s, t, three" in body["error"]
    status, body = call(url, "POST", raw=b'{"inputs": [{"adapter": "a", "te')
    assert status == 400 and "not valid JSON" in body["error"]
    status, body = call(url, "POST", {"inputs": []})
    assert status == 422 and body["error"].startswith("inputs:")
    status, body = call(url, "POST", {"inputs": [{"adapter": "a", "text": "x"}] * 65})
    assert status == 413 and "at most 64" in body["error"]
    status, body = call(url, "POST", {"inputs": [{"adapter": "a", "text": 5}]})
    assert status == 422 and body["error"].startswith("inputs.0.text:") and "string" in body["error"]
    status, body = call(url, "POST", {"inputs": [{"adapter": "a", "text": ""}]})
    assert status == 422 and body["error"].startswith("inputs.0.text:")
    status, body = call(url, "POST", {"inputs": [{"text": "no adapter"}]})
    assert status == 422 and body["error"].startswith("inputs.0.adapter:")
    status, body = call(url, "POST", raw=b'{"inputs": []}', content_type="text/plain")
    assert status == 422 and "application/json" in body["error"]
    status, body = call(url, "POST", [1, 2])
    assert status == 422 and "JSON object" in body["error"]
    status, body = call(server + "/no/such/page")
    assert status == 404 and body == {"error": "Not Found"}
    assert call(server + "/health")[0] == 200  # and it still serves


def test_a_client_that_disconnects_costs_nothing_else(server):
    host, port = server.removeprefix("http://").split(":")
    body = json.dumps({"inputs": [{"adapter": "a", "text": s} for s in SENTENCES * 4]}).encode()
    head = (f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    for payload in (head + body[:10], head + body):  # gone mid-body; gone while its batch runs
        with socket.create_connection((host, int(port))) as s:
            s.sendall(payload)
        time.sleep(0.2)
    status, out = call(server + "/classify", "POST", {"inputs": [{"adapter": "b", "text": SENTENCES[0]}]})
    assert status == 200 and len(out["outputs"]) == 1


# --------------------------------------------------------------------------- adapters at runtime

def test_load_and_unload_at_runtime(server, adapters, tiny_dir):
    root, made = adapters
    text = {"adapter": "a", "text": SENTENCES[1]}
    want = call(server + "/classify", "POST", {"inputs": [text]})[1]["outputs"][0]
    status, info = call(server + "/adapters/again", "PUT", {"path": "a"})
    assert status == 201 and info["name"] == "again" and info["method"] == "LoRA" and info["rank"] == 2
    assert info["labels"] == COLA and info["parameters"] == 4864 and info["task"] == "test"
    listed = {x["name"]: x for x in call(server + "/adapters")[1]["adapters"]}
    assert set(listed) == {"a", "b", "c", "three", "s", "t", "again"}
    assert listed["b"]["method"] == "IA3" and listed["s"]["kind"] == "student" and listed["three"]["labels"] == THREE
    assert listed["t"]["kind"] == "student" and listed["t"]["method"] == "transformer (1 layer of gpt2)"
    got = call(server + "/classify", "POST", {"inputs": [text, {**text, "adapter": "again"}]})[1]["outputs"]
    assert abs(got[1]["probability"] - want["probability"]) <= 1e-6 and got[0]["label"] == got[1]["label"]
    # Replaced by another adapter under the same name, then unloaded.
    assert call(server + "/adapters/again", "PUT", {"path": "b"})[1]["method"] == "IA3"
    assert call(server + "/adapters/again", "DELETE") == (200, {"unloaded": "again"})
    status, body = call(server + "/classify", "POST", {"inputs": [{**text, "adapter": "again"}]})
    assert status == 404 and "'again'" in body["error"]
    assert call(server + "/adapters/again", "DELETE")[0] == 404
    assert call(server + "/adapters/s2", "PUT", {"path": "s"})[0] == 201  # a student too
    assert call(server + "/adapters/s2", "DELETE")[0] == 200


def test_an_adapter_that_peft_saved_equals_peft(server, adapters, tiny_dir):
    from utils import load_tokenizer
    root, made = adapters
    status, info = call(server + "/adapters/peft", "PUT")
    assert status == 201 and info["labels"] == ["LABEL_0", "LABEL_1"] and info["base"] == str(tiny_dir)
    inputs = [{"adapter": n, "text": s} for s in SENTENCES for n in ("peft", "a")]
    outputs = call(server + "/classify", "POST", {"inputs": inputs})[1]["outputs"]
    tok = load_tokenizer(tiny_dir)
    for x, o in zip(inputs, outputs):
        if x["adapter"] == "peft":
            with torch.no_grad():
                p = made["peft_model"](**tok(x["text"], return_tensors="pt")).logits.softmax(-1)[0]
            assert max(abs(o["probabilities"][f"LABEL_{k}"] - float(p[k])) for k in range(2)) <= 1e-5, (o, p)
    assert call(server + "/adapters/peft", "DELETE")[0] == 200


def test_runtime_loading_stays_inside_the_adapters_dir_and_refuses_misfits(server, adapters):
    root, made = adapters
    assert call(server + "/adapters/x", "PUT", {"path": "../" + root.name + "/a"})[0] == 201  # inside after all
    assert call(server + "/adapters/x", "DELETE")[0] == 200
    for path in ("../outside", "a/../../outside", "/etc", str(root / "a"), "..", ".", "escape"):
        status, body = call(server + "/adapters/x", "PUT", {"path": path})
        assert status == 403, (path, body)
        assert str(root) not in body["error"].replace(path, "")  # the server's own paths are not shown
    assert call(server + "/adapters/x", "PUT", {"path": "no-such"})[0] == 404
    assert call(server + "/adapters/bad%21name", "PUT", {"path": "a"})[0] == 422
    status, body = call(server + "/adapters/bert", "PUT")  # NAME is the directory by default
    assert status == 422 and "another architecture" in body["error"]
    status, body = call(server + "/adapters/wider", "PUT")
    assert status == 422 and "does not fit" in body["error"] and "shape" in body["error"]
    status, body = call(server + "/adapters/a", "PUT", {"path": "wider"})  # a failed replacement keeps the old
    assert status == 422
    names = [x["name"] for x in call(server + "/adapters")[1]["adapters"]]
    assert "bert" not in names and "wider" not in names and "a" in names
    assert call(server + "/classify", "POST", {"inputs": [{"adapter": "a", "text": "Still here."}]})[0] == 200


# --------------------------------------------------------------------------- refused at start: exit 2

def test_an_adapter_that_does_not_fit_is_refused_at_start(adapters, tiny_dir):
    root, made = adapters
    msg = user_error(run("serve", 7, "--model", tiny_dir, "--adapter", f"a={made['a']}",
                         "--adapter", f"w={made['wider']}", "--port", free_port()))
    assert "--adapter w=" in msg and "does not fit" in msg and "shape" in msg
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        msg = user_error(run("serve", 7, "--adapter", f"a={made['a']}", "--port", taken.getsockname()[1]))
    assert "cannot listen" in msg and "--port" in msg
    msg = user_error(run("serve", 7, "--port", free_port()))
    assert "nothing to serve" in msg
