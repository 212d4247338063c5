"""Our GPT-2 must be transformers' GPT-2: same logits, same greedy tokens, strict loading, and a
`gen` mode that works offline from a local directory and fails cleanly without weights."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, TINY, copy_checkpoint, needs_tokenizer, run, run_here, save_hf_gpt2, together
from model import padding_mask
from utils import UserError, load_gpt


def hf_model(path):
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel.from_pretrained(path).eval()


def padded_batch(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 50256 % vocab  # pad = EOS, as in GPT-2 practice
    return ids, mask


@pytest.fixture(scope="module")
def gpt2_models(gpt2_dir):
    """Ours and transformers' GPT-2 of the real shape (random weights), loaded once for the tests that need both."""
    return load_gpt(str(gpt2_dir)).eval(), hf_model(gpt2_dir)


def assert_logits_match(path, vocab, lengths, models=None):
    ours, theirs = models or (load_gpt(str(path)).eval(), hf_model(path))
    ids, mask = padded_batch(vocab, lengths)
    with torch.no_grad():
        a = ours(ids, mask)
        b = theirs(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    diff = (a - b).abs()[real].max().item()
    # Logits ~3 after up to 12 layers of float32 sums of <= 3072 terms, summed in other orders than transformers'
    # (Conv1D's addmm, its attention): ~3e-6 apart (measured 2.7e-6 on the gpt2 shape, 3e-7 on the tiny one).
    # A wrong weight, mask or GELU moves them by > 1e-3.
    assert diff <= 1e-4, f"max |ours - transformers| at real positions = {diff}"
    return ours, ids, mask, a


def test_logits_match_transformers_tiny_padded(tiny_dir):
    assert_logits_match(tiny_dir, 50257, [17, 9, 3, 12])


def test_logits_match_transformers_gpt2_shape(gpt2_dir, gpt2_models):
    ours, *_ = assert_logits_match(gpt2_dir, 50257, [24, 11, 5], gpt2_models)
    assert sum(p.numel() for p in ours.parameters()) == 124_439_808  # GPT-2 small, lm_head tied


def test_padding_does_not_leak(tiny_dir):
    ours, ids, mask, batched = assert_logits_match(tiny_dir, 50257, [15, 4, 9])
    with torch.no_grad():
        for i in range(ids.shape[0]):
            n = int(mask[i].sum())
            alone = ours(ids[i:i + 1, :n])[0]
            # logits ~1 of a 2-layer 64-wide model, attention over another length: ~3e-7 apart (measured)
            assert torch.allclose(alone, batched[i, :n], rtol=1e-5, atol=1e-5), f"row {i} changed by padding"


def test_padding_mask_never_empty_rows():
    mask = padding_mask(torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0]]))  # left- and right-padded
    assert mask.any(-1).all(), "an all-False row makes SDPA return NaN"


def test_greedy_generation_matches_transformers(gpt2_models):
    """Our 80 greedy tokens (decoded with our KV cache) are transformers' greedy tokens: each one is the argmax of
    transformers' logits for the text before it. One forward of transformers' over the whole text checks that, as
    its generate() would token by token (5x the time), so by induction its generate() gives these 80 tokens."""
    ours, theirs = gpt2_models
    prompt = torch.tensor([[464, 3290, 286, 1204, 318]])
    new = 80
    got = torch.stack(list(ours.generate(prompt, new, temperature=0)), 1)
    assert got.shape == (1, new)
    with torch.no_grad():
        logits = theirs(input_ids=torch.cat([prompt, got], 1)).logits[0]
    expected = logits[prompt.shape[1] - 1:-1].argmax(-1)  # the logits at position i choose token i + 1
    assert got[0].tolist() == expected.tolist()


def test_kv_cache_equals_full_recompute(tiny_dir):
    model = load_gpt(str(tiny_dir)).eval()
    ids = torch.tensor([[10, 20, 30]])
    got = torch.stack(list(model.generate(ids, 30, temperature=0)), 1)
    seq = ids
    with torch.no_grad():
        for _ in range(30):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert got.tolist() == seq[:, 3:].tolist()


def test_generation_stops_at_block_size(tiny_dir):
    model = load_gpt(str(tiny_dir)).eval()
    ids = torch.zeros(1, TINY["n_positions"] - 4, dtype=torch.long)
    assert len(list(model.generate(ids, 100, temperature=0))) == 4


def test_sampling_reproducible_by_seed(tiny_dir):
    model = load_gpt(str(tiny_dir)).eval()
    ids = torch.tensor([[1, 2, 3]])

    def sample(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return torch.stack(list(model.generate(ids, 40, temperature=1.0, generator=g, **kw)), 1).tolist()

    assert sample(12345) == sample(12345)
    assert sample(12345) != sample(54321)
    assert sample(7, top_k=5, top_p=0.9) == sample(7, top_k=5, top_p=0.9)


def test_batched_samples_equal_samples_drawn_one_by_one(tiny_dir):
    """num_samples=K: one prefill, K rows decoded together, each with its own generator; row i is the
    text that generator gives alone (so a sample does not depend on how many are drawn with it)."""
    model = load_gpt(str(tiny_dir)).eval()
    ids = torch.tensor([[464, 3616, 286, 1204, 318]])
    from generate import sample_seed
    seeds = [sample_seed(3, i) for i in range(3)]
    kw = dict(temperature=1.0, top_k=40, top_p=0.95)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    batched = torch.stack(list(model.generate(ids, 30, generator=gens, num_samples=3, **kw)), 1)
    for row, seed in zip(batched.tolist(), seeds):
        alone = model.generate(ids, 30, generator=torch.Generator().manual_seed(seed), **kw)
        assert row == torch.stack(list(alone), 1)[0].tolist()
    assert len({tuple(r) for r in batched.tolist()}) == 3  # and the rows do differ


def test_top_k_and_top_p_restrict_the_choice():
    from model import sample_next
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert picks == {0, 1}
    # softmax mass: 0.636, 0.234, 0.086, ...: top_p 0.7 keeps the first two
    picks = {int(sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert picks == {0, 1}
    assert int(sample_next(logits, 0)) == 0


def test_missing_tensor_is_an_error(tiny_dir, tmp_path):
    bad = copy_checkpoint(tiny_dir, tmp_path / "bad")
    sd = load_file(bad / "model.safetensors")
    missing = "transformer.h.1.mlp.c_fc.weight"
    sd.pop(missing)
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(UserError, match=r"missing \['transformer\.h\.1\.mlp\.c_fc\.weight'\]"):
        load_gpt(str(bad))


def test_misshaped_tensor_is_an_error(tiny_dir, tmp_path):
    bad = copy_checkpoint(tiny_dir, tmp_path / "bad")
    sd = load_file(bad / "model.safetensors")
    sd["transformer.h.0.attn.c_proj.weight"] = torch.zeros(64, 32)
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(UserError, match="transformer.h.0.attn.c_proj.weight has shape"):
        load_gpt(str(bad))


def test_unexpected_tensor_is_an_error(tiny_dir, tmp_path):
    bad = copy_checkpoint(tiny_dir, tmp_path / "bad")
    sd = load_file(bad / "model.safetensors")
    sd["transformer.h.2.ln_1.weight"] = torch.ones(64)
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(UserError, match=r"unexpected \['transformer\.h\.2\.ln_1\.weight'\]"):
        load_gpt(str(bad))


def test_pytorch_bin_checkpoint_loads(tiny_dir, tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text((tiny_dir / "config.json").read_text())
    torch.save(load_file(tiny_dir / "model.safetensors"), d / "pytorch_model.bin")
    a, b = load_gpt(str(d)), load_gpt(str(tiny_dir))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_distilgpt2_shape_loads(tmp_path):
    d = save_hf_gpt2(tmp_path / "distil", with_tokenizer=False, n_layer=6, n_head=12, n_embd=96)
    assert len(load_gpt(str(d)).transformer.h) == 6
    assert json.loads((d / "config.json").read_text())["n_layer"] == 6


# --------------------------------------------------------------------------- the gen command

PROMPT = "The meaning of life is"


@pytest.fixture(scope="module")
def gen_runs(tiny_dir):
    """`gen` on the tiny model, made together: SR 12345 twice, SR 54321, SR 12345 with 4 samples, and 2 greedy
    samples of SR 1: {name: CompletedProcess}. The first is a fresh interpreter, the others forks of the fork server
    (conftest.run): the second's text equals the first's."""
    args = ["gen", "12345", "--model", str(tiny_dir), "--max-new-tokens", "20", "--prompt", PROMPT]
    runs = {"first": args, "second": args, "other": [*args[:1], "54321", *args[2:]],
            "four": [*args, "--num-samples", "4"], "greedy": ["gen", "1", "--model", str(tiny_dir), "--temperature", "0", "--num-samples", "2",
                       "--max-new-tokens", "8"]}
    return dict(zip(runs, together(*(lambda a=a, name=name: run(*a, fresh=name == "first")
                                     for name, a in runs.items()))))


@needs_tokenizer
def test_gen_cli_prints_text_and_is_reproducible(gen_runs):
    first, second, other = gen_runs["first"], gen_runs["second"], gen_runs["other"]
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(PROMPT)
    assert len(first.stdout) > len(PROMPT) + 20
    assert first.stdout == second.stdout
    assert other.returncode == 0 and other.stdout != first.stdout


@needs_tokenizer
def test_gen_cli_greedy_and_samples(gen_runs):
    out, alone, four = gen_runs["greedy"], gen_runs["first"], gen_runs["four"]
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("----- sample") == 2
    s1, s2 = out.stdout.split("----- sample 2 of 2 -----")
    assert s1.split("-----")[-1].strip() == s2.strip()  # greedy: both samples identical
    # Sampled: the first of four is the text that `gen` draws alone with that SR.
    assert alone.returncode == 0 and four.returncode == 0, four.stderr
    samples = [s.strip() for s in four.stdout.split("-----")[2::2]]
    assert len(samples) == 4 and samples[0] == alone.stdout.strip() and len(set(samples)) == 4


def test_gen_cli_offline_error_without_weights():
    out = run_here("gen", "12345")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("error: could not get the weights of model 'gpt2'")
    assert "--model /path/to/dir" in out.stderr


def test_gen_cli_hub_unreachable_error():
    """The real online path: not cached, hub tried and unreachable (no network here) -> same clean error."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_HOME"] = "/nonexistent-hf-home"  # make sure nothing is cached
    out = subprocess.run([sys.executable, "run.py", "gen", "1", "--model", "no-such-org-xyz/no-such-model"],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "no-such-org-xyz/no-such-model" in out.stderr and "--model /path/to/dir" in out.stderr


def test_gen_cli_missing_tokenizer_error(tiny_dir, tmp_path):
    d = copy_checkpoint(tiny_dir, tmp_path / "notok")
    out = run_here("gen", "1", "--model", str(d))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "no GPT-2 tokenizer" in out.stderr and "--tokenizer" in out.stderr


@pytest.mark.parametrize("args, message", [
    (["gen", "abc"], "SR must be a non-negative integer"),
    (["gen", "-5"], "SR must be a non-negative integer"),
    (["gen", str(2**64)], "SR must be a non-negative integer"),
    (["gen", "1", "--temperature", "nan"], "argument --temperature"),
    (["gen", "1", "--model", "/no/such/dir"], "no such directory"),
    (["gen", "1", "--temperature", "-1", "--model", "/no/such/dir"], "argument --temperature: expected a number >= 0"),
    (["gen", "1", "--device", "cuda"], "no CUDA GPU"),
])
def test_gen_cli_bad_input(args, message):
    out = run_here(*args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr



def rounding_bound(x, w, b=None):
    """How far two float32 computations of x @ w^T + b may differ when they sum the same in + 1 terms in
    other orders (kernels and thread counts choose the order): each is off the exact value by at most
    (in + 1) * eps/2 times the sum of the terms' magnitudes (the worst case of any order of summation), so
    the two differ by at most (in + 1) * eps times it. Observed differences are far smaller."""
    magnitude = x.abs() @ w.abs().t() + (0 if b is None else b.abs())
    return (w.shape[1] + 1) * torch.finfo(torch.float32).eps * magnitude


def test_linear_few_row_paths_equal_nn_linear():
    """model.Linear computes a few rows at inference by the path this CPU runs fastest: the same outputs as
    nn.Linear to float rounding, for every row count, input shape and bias; training is untouched."""
    from model import Linear
    torch.manual_seed(0)
    for bias in (True, False):
        layer = Linear(48, 80, bias=bias)
        for shape in ((1, 48), (1, 1, 48), (3, 1, 48), (8, 48), (2, 5, 48), (0, 48)):
            x = torch.randn(shape)
            with torch.no_grad():
                fast, plain = layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias)
            assert fast.shape == plain.shape, (bias, shape)
            assert ((fast - plain).abs() <= rounding_bound(x, layer.weight, layer.bias)).all(), (bias, shape)
    x = torch.randn(1, 48, requires_grad=True)
    layer(x).sum().backward()  # with gradients on, nn.Linear's own path: backward works as ever
    # x.grad sums the 80 rows of the weight in whichever order the kernel likes (2.4e-7 off on a Xeon).
    ones = torch.ones(1, 80)
    assert ((x.grad - layer.weight.sum(0)).abs() <= rounding_bound(ones, layer.weight.t())).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_every_few_row_path_equals_nn_linear_and_the_chosen_one_runs(threads, monkeypatch):
    import model
    monkeypatch.setattr(model, "FEWROWS_CHOSEN", {})  # measured afresh here, not left for other tests
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        for bias, (n_in, n_out) in ((True, (48, 80)), (False, (256, 96))):
            layer = model.Linear(n_in, n_out, bias=bias).eval()
            w, b = layer.weight, layer.bias
            for rows in (1, 2, 8):
                x = torch.randn(rows, n_in)
                plain = torch.nn.functional.linear(x, w, b)
                candidates = model.fewrows_candidates(rows)
                assert ("matrix-vector" in candidates) == (rows == 1)  # a matrix-vector product takes one row
                with torch.no_grad():
                    for name in candidates:
                        out = model.FEWROWS_PATHS[name](x, w, b)
                        assert out.shape == plain.shape and out.is_contiguous(), (name, rows)  # SDPA's flash path
                        assert ((out - plain).abs() <= rounding_bound(x, w, b)).all(), (name, rows, bias)
                    chosen = model.fewrows_path(x, w, b)
                    assert chosen in candidates
                    # Measured once: the second time, the same answer without timing anything.
                    with monkeypatch.context() as m:
                        m.setattr(model, "fewrows_timings", lambda *a: pytest.fail("measured twice"))
                        assert model.fewrows_path(x, w, b) == chosen
                    # What is chosen is what runs: force each candidate in turn and count the calls.
                    key = next(k for k in model.FEWROWS_CHOSEN if k[:4] == (n_out, n_in, bias, rows))
                    assert key[4:] == (threads, torch.float32)
                    for name in candidates:
                        calls = []
                        with monkeypatch.context() as m:
                            m.setitem(model.FEWROWS_CHOSEN, key, name)
                            for other in candidates:
                                m.setitem(model.FEWROWS_PATHS, other,
                                          lambda *a, f=model.FEWROWS_PATHS[other], o=other: calls.append(o) or f(*a))
                            out = layer(x)
                        assert calls == [name] and torch.equal(out, model.FEWROWS_PATHS[name](x, w, b))
    finally:
        torch.set_num_threads(before)


def test_the_chooser_takes_the_fastest_path_and_keeps_nn_linears_on_a_tie(monkeypatch):
    """A machine where the weight-first product wins (the 2-core VM it was written for) gets it; one where
    nothing beats nn.Linear's path clearly keeps it. Here the other paths are made slow by sleeping."""
    import time

    import model
    monkeypatch.setattr(model, "FEWROWS_CHOSEN", {})
    w, x = torch.randn(80, 48), torch.randn(1, 48)

    def slowed(name, seconds):
        return lambda *a, f=model.FEWROWS_PATHS[name]: time.sleep(seconds) or f(*a)

    with monkeypatch.context() as m:
        for name in ("x @ W^T", "matrix-vector", "x @ W"):
            m.setitem(model.FEWROWS_PATHS, name, slowed(name, 0.003))
        assert model.fewrows_path(x, w, None) == "W @ x^T"
    model.FEWROWS_CHOSEN.clear()
    with monkeypatch.context() as m:
        for name in model.FEWROWS_PATHS:
            m.setitem(model.FEWROWS_PATHS, name, slowed(name, 0.01))  # all alike, to within noise
        assert model.fewrows_path(x, w, None) == "x @ W^T"


def test_the_cpu_dropout_mask_has_dropouts_distribution_and_follows_the_seed():
    from model import Dropout
    drop = Dropout(0.1).train()
    x = torch.ones(1000, 1001)  # an odd count: the last 64-bit draw is used in part
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    values = torch.unique(y).tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.9)
    assert abs(kept.float().mean().item() - 0.9) < 0.002  # 1e6 elements: the std of the mean is 3e-4
    assert abs(kept[:, 0].float().mean().item() - 0.9) < 0.05  # every position of a draw's four, alike
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # the global generator's stream: seeded runs repeat
    assert torch.equal(drop.eval()(x), x)
