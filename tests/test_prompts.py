"""Prompt tuning and prefix tuning (prompts.py): the same logits as peft on the same adapter, both ways, for our
GPT-2, a tiny Llama and a tiny BERT; trainable counts as peft's; padding; generation with the virtual tokens."""
import pytest
import torch

from conftest import TOKENIZER_DIR, needs_tokenizer
from model import GPTClassifier, mark_trainable
from prompts import add_virtual_tokens, model_dims, prompt_settings, text_init
from test_adapters import LAYERNORMS, LOGITS, PAD, padded_batch, peft_base, perturb_trainable
from test_backbones import PAD as HF_PAD, ours as hf_ours, padded_batch as hf_batch, plain_transformers, tiny  # noqa: F401
from utils import UserError, attach_adapter, load_gpt, read_adapter, save_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = [("prompt", None), ("prefix", None), ("prefix", 16)]  # (kind, --encoder-hidden-size of a projection)


def peft_config(kind, n, projection=None, modules_to_save=None, **extra):
    from peft import PrefixTuningConfig, PromptTuningConfig
    modules_to_save = list(modules_to_save) if modules_to_save else None  # peft extends it in place
    if kind == "prompt":
        return PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=n, modules_to_save=modules_to_save, **extra)
    return PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=n, prefix_projection=bool(projection),
                              encoder_hidden_size=projection, modules_to_save=modules_to_save, **extra)


def with_virtual_tokens(model, kind, n, projection, heads, norms, seed):
    """Ours with random virtual tokens, a perturbed head and norms, trainable as the CLI makes it; its settings."""
    torch.manual_seed(seed)
    add_virtual_tokens(model, kind, n, projection)
    mark_trainable(model, train_layernorm=bool(norms), head_names=(*heads, "prompt_encoder"))
    perturb_trainable(model, seed)
    return prompt_settings(kind, n, model_dims(model, kind), [*heads, *norms], encoder_hidden_size=projection)


def peft_adapter(base, out_dir, config, seed):
    """Peft's own adapter on `base`, every trainable parameter perturbed by a seeded generator, saved."""
    from peft import get_peft_model
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    perturb_trainable(model, seed)
    model.eval().save_pretrained(out_dir)
    return model


def both(ours, theirs, ids, mask):
    with torch.no_grad():
        return ours(ids, mask), theirs(input_ids=ids, attention_mask=mask).logits


def without_virtual_tokens(model, ids, mask):
    """The logits of the model with the same head and norms but no virtual tokens: a comparison is not vacuous.
    (peft's disable_adapter() fails on prompt learning in 0.21.2: UnboundLocalError.)"""
    vt = model._modules.pop("prompt_encoder")
    with torch.no_grad():
        out = model(ids, mask)
    model.prompt_encoder = vt
    return out


def our_gpt(tiny_dir):
    return load_gpt(tiny_dir, cls=GPTClassifier, num_labels=2).eval()


# --------------------------------------------------------------------------- our GPT-2 against peft's

@pytest.mark.parametrize("kind,projection", METHODS)
def test_peft_loads_our_gpt2_adapter(tiny_dir, tmp_path, kind, projection):
    from peft import PeftModel
    ours = our_gpt(tiny_dir)
    settings = with_virtual_tokens(ours, kind, 5, projection, ["score"], LAYERNORMS, seed=5)
    save_adapter(ours, tmp_path, settings)
    theirs = PeftModel.from_pretrained(peft_base(tiny_dir), tmp_path).eval()
    # Peft's decoder with prompt tuning reads the last position (no input ids): right for rows without padding.
    lengths = [6, 6, 6] if kind == "prompt" else [8, 3, 5]
    mine, peft_logits = both(ours, theirs, *padded_batch(lengths, seed=3))
    torch.testing.assert_close(mine, peft_logits, **LOGITS)
    assert (without_virtual_tokens(ours, *padded_batch(lengths, seed=3)) - mine).abs().max() > 1e-3
    # Left padding (pads between the virtual tokens and the sentence, masked), where peft reads the right token too.
    left = torch.tensor([[PAD, PAD, PAD, 5, 6, 7], [1, 2, 3, 4, 5, 6]])
    torch.testing.assert_close(*both(ours, theirs, left, (left != PAD).long()), **LOGITS)


@pytest.mark.parametrize("kind,projection", METHODS)
def test_we_load_a_peft_gpt2_adapter(tiny_dir, tmp_path, kind, projection):
    theirs = peft_adapter(peft_base(tiny_dir), tmp_path, peft_config(kind, 4, projection, LAYERNORMS), seed=6)
    settings, tensors, extras = read_adapter(tmp_path)
    assert settings["kind"] == kind and extras == {}
    assert tensors["prompt_encoder.embedding.weight"].shape == (4, 64 if kind == "prompt" else 2 * 2 * 64)
    ours = attach_adapter(our_gpt(tiny_dir), settings, tensors)
    lengths = [7, 7] if kind == "prompt" else [8, 3, 5]
    mine, peft_logits = both(ours, theirs, *padded_batch(lengths, seed=4))
    torch.testing.assert_close(mine, peft_logits, **LOGITS)


def test_peft_prompt_tuning_reads_a_pad_with_right_padding(tiny_dir, tmp_path):
    """The one difference from peft (docs/lora.md): peft's decoder classifier with prompt tuning gets no input ids
    and reads the last position, a pad in a right-padded row; ours reads each row's last real token, the same
    logits the row gives alone (and peft gives it alone)."""
    theirs = peft_adapter(peft_base(tiny_dir), tmp_path, peft_config("prompt", 3), seed=7)
    ours = attach_adapter(our_gpt(tiny_dir), *read_adapter(tmp_path)[:2])
    ids, mask = padded_batch([8, 3], seed=5)
    mine, peft_logits = both(ours, theirs, ids, mask)
    alone = both(ours, theirs, ids[1:, :3], mask[1:, :3])
    torch.testing.assert_close(mine[1:], alone[0], **LOGITS)
    torch.testing.assert_close(alone[0], alone[1], **LOGITS)
    assert (peft_logits[1] - mine[1]).abs().max() > 1e-3


@pytest.mark.parametrize("kind,projection", METHODS)
@pytest.mark.parametrize("norms", [LAYERNORMS, []])
def test_trainable_parameters_are_pefts(tiny_dir, kind, projection, norms):
    from peft import get_peft_model
    ours = our_gpt(tiny_dir)
    with_virtual_tokens(ours, kind, 7, projection, ["score"], norms, seed=0)
    theirs = get_peft_model(peft_base(tiny_dir), peft_config(kind, 7, projection, norms or None))
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(ours) == count(theirs)
    assert count(ours) > 7 * 64


@pytest.mark.parametrize("kind,projection", METHODS)
def test_padding_and_batching_change_nothing(tiny_dir, kind, projection):
    ours = our_gpt(tiny_dir)
    with_virtual_tokens(ours, kind, 5, projection, ["score"], LAYERNORMS, seed=2)
    ids, mask = padded_batch([8, 3, 5], seed=1)
    with torch.no_grad():
        batch = ours(ids, mask)
        for i, n in enumerate([8, 3, 5]):
            torch.testing.assert_close(batch[i:i + 1], ours(ids[i:i + 1, :n]), **LOGITS)


@needs_tokenizer
def test_text_init_is_pefts(tiny_dir, tmp_path):
    from conftest import copy_checkpoint
    base = copy_checkpoint(tiny_dir, tmp_path / "base", with_tokenizer=True)
    from utils import load_tokenizer
    text = "Is this sentence grammatical?"
    theirs = peft_adapter(peft_base(base), tmp_path / "peft",
                          peft_config("prompt", 9, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
                                      tokenizer_name_or_path=str(base)), seed=0)
    ours = our_gpt(base)
    init = text_init(ours, load_tokenizer(TOKENIZER_DIR), text, 9)
    # peft's table was perturbed after its TEXT start: take the perturbation off again.
    g = torch.Generator().manual_seed(0)
    perturbations = {n: torch.randn(p.shape, generator=g) * 0.1 for n, p in sorted(theirs.named_parameters())
                     if p.requires_grad}
    table = theirs.prompt_encoder.default.embedding.weight - perturbations["prompt_encoder.default.embedding.weight"]
    torch.testing.assert_close(init, table, rtol=0, atol=1e-6)
    assert torch.equal(init[6], init[0])  # 6 tokens, repeated to fill 9 rows


# --------------------------------------------------------------------------- transformers backbones

HF_METHODS = [("llama", "prompt", None), ("llama", "prefix", None), ("llama", "prefix", 16),
              ("bert", "prompt", None), ("bert", "prefix", None), ("distilbert", "prompt", None)]


PEFT_DIMS = {"distilbert": dict(token_dim=32, num_attention_heads=4)}  # peft cannot read DistilBERT's dim, n_heads


def hf_lengths(family, kind):
    # Peft's decoder with prompt tuning reads the last position: rows of one length there.
    return (6, 6, 6) if family == "llama" and kind == "prompt" else (7, 3, 5, 1)


@pytest.mark.parametrize("family,kind,projection", HF_METHODS)
def test_hf_adapters_both_ways(tiny, tmp_path, family, kind, projection):
    from peft import PeftModel
    model, tok, info = hf_ours(tiny[family])
    settings = with_virtual_tokens(model, kind, 4, projection, info["head"], info["norms"], seed=3)
    save_adapter(model.eval(), tmp_path / "ours", settings)
    theirs = PeftModel.from_pretrained(plain_transformers(tiny[family], family), tmp_path / "ours").eval()
    ids, mask = hf_batch(family, hf_lengths(family, kind), seed=2)
    mine, peft_logits = both(model, theirs, ids, mask)
    torch.testing.assert_close(mine, peft_logits, **LOGITS)
    assert (without_virtual_tokens(model, ids, mask) - mine).abs().max() > 1e-3
    # Peft -> ours.
    theirs = peft_adapter(plain_transformers(tiny[family], family), tmp_path / "peft",
                          peft_config(kind, 3, projection, info["norms"], **PEFT_DIMS.get(family, {})), seed=4)
    settings, tensors, _ = read_adapter(tmp_path / "peft")
    model = attach_adapter(hf_ours(tiny[family])[0], settings, tensors, head_names=info["head"])
    mine, peft_logits = both(model, theirs, ids, mask)
    torch.testing.assert_close(mine, peft_logits, **LOGITS)


@pytest.mark.parametrize("family,kind", [("llama", "prompt"), ("llama", "prefix"), ("bert", "prefix")])
def test_hf_padding_changes_nothing(tiny, family, kind):
    model, tok, info = hf_ours(tiny[family])
    with_virtual_tokens(model.eval(), kind, 4, None, info["head"], info["norms"], seed=1)
    ids, mask = hf_batch(family, (7, 3, 5), seed=3)
    with torch.no_grad():
        batch = model(ids, mask)
        for i, n in enumerate((7, 3, 5)):
            torch.testing.assert_close(batch[i:i + 1], model(ids[i:i + 1, :n], mask[i:i + 1, :n]), **LOGITS)


@pytest.mark.parametrize("family,kind,projection", [("llama", "prompt", None), ("llama", "prefix", None),
                                                    ("llama", "prefix", 8), ("bert", "prompt", None)])
def test_hf_trainable_parameters_are_pefts(tiny, family, kind, projection):
    from peft import get_peft_model
    model, tok, info = hf_ours(tiny[family])
    with_virtual_tokens(model, kind, 5, projection, info["head"], info["norms"], seed=0)
    theirs = get_peft_model(plain_transformers(tiny[family], family), peft_config(kind, 5, projection, info["norms"]))
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(model) == count(theirs)


def test_prefix_needs_a_cache(tiny):
    from prompts import check_fits
    model, tok, info = hf_ours(tiny["distilbert"])
    with pytest.raises(UserError, match="past_key_values"):
        check_fits(model, "prefix")


def test_attach_rejects_an_adapter_of_another_shape(tiny_dir, tiny, tmp_path):
    ours = our_gpt(tiny_dir)
    save_adapter(ours, tmp_path, with_virtual_tokens(ours, "prefix", 3, None, ["score"], [], seed=0))
    model, tok, info = hf_ours(tiny["llama"])
    with pytest.raises(UserError, match="layers"):
        attach_adapter(model, *read_adapter(tmp_path)[:2], head_names=info["head"])


# --------------------------------------------------------------------------- generation

@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_generation_with_virtual_tokens_equals_recomputing(tiny_dir, kind):
    """generate's cache (virtual tokens prefilled, then one token at a time) gives the tokens that recomputing
    the whole sequence after the virtual tokens at every step gives."""
    from model import GPT
    torch.manual_seed(0)
    model = load_gpt(tiny_dir, cls=GPT).eval()
    vt = add_virtual_tokens(model, kind, 4)
    with torch.no_grad():
        vt.embedding.weight.mul_(0.3)
    idx = torch.tensor([[11, 22, 33]])
    new = torch.cat(list(model.generate(idx, 6, temperature=0)))
    seq = idx
    with torch.no_grad():
        for _ in range(6):
            virtual = {"prompt": vt.prompt(1)} if kind == "prompt" else {"prefix": vt.prefix(1)}
            nxt = model.lm_head(model.hidden_states(seq, **virtual)[:, -1]).argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
    assert new.tolist() == seq[0, 3:].tolist()
    # Not vacuous: without the virtual tokens the model writes something else.
    del model.prompt_encoder
    assert torch.cat(list(model.generate(idx, 6, temperature=0))).tolist() != new.tolist()


# --------------------------------------------------------------------------- training and resuming

def test_resumed_prefix_projection_run_equals_uninterrupted(tiny_dir, tmp_path):
    """The projection MLP trains and resumes from last.pt with the table: a cut and resumed run is the whole run."""
    from test_training import CPU, numbers, separable
    from train_utils import TrainConfig, fit, trainable_state

    def model(seed):
        torch.manual_seed(seed)
        m = our_gpt(tiny_dir)
        add_virtual_tokens(m, "prefix", 4, 16)
        mark_trainable(m, head_names=("score", "prompt_encoder"))
        return m

    train, dev = separable(64, seed=5), separable(32, seed=6)
    cfg = TrainConfig(epochs=2, lr=1e-2, batch_size=16, seed=21)
    full_model = model(21)
    start = {n: p.detach().clone() for n, p in full_model.named_parameters()}
    full = fit(full_model, train, dev, cfg, CPU, tmp_path / "full")
    moved = {n for n, p in full_model.named_parameters() if not torch.equal(p, start[n])}
    assert {"prompt_encoder.embedding.weight", "prompt_encoder.transform.0.weight", "prompt_encoder.transform.2.bias",
            "score.weight"} <= moved and not any(n.startswith("transformer.wte") for n in moved)
    fit(model(21), train, dev, cfg, CPU, tmp_path / "cut", stop_after_epoch=1)
    resumed_model = model(999)
    resumed = fit(resumed_model, train, dev, cfg, CPU, tmp_path / "cut", resume=True)
    assert numbers(resumed) == numbers(full)
    a, b = trainable_state(full_model), trainable_state(resumed_model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def cli_runs(tiny_dir, tmp_path_factory):
    """`run.py LoRA 7 --peft prefix --prefix-projection` (exported for peft) and `--peft prompt --prompt-init`, on
    the tiny GPT-2 and 200 CoLA sentences, made at the same time: {kind: its directory}."""
    from conftest import COLA_DIR, ok, run, together
    tmp = tmp_path_factory.mktemp("prompt-cli")
    args = lambda kind, *extra: ["LoRA", 7, "--model", tiny_dir, "--data-dir", COLA_DIR, "--limit-train", 200,  # noqa
                                 "--epochs", 1, "--out-dir", tmp / kind, "--plots-dir", tmp / "plots", "--peft", kind,
                                 "--num-virtual-tokens", 5, *extra]
    together(lambda: ok(run(*args("prefix", "--prefix-projection", "--encoder-hidden-size", 24,
                                  "--export-peft", tmp / "peft"))),
             lambda: ok(run(*args("prompt", "--prompt-init", "Is this English?"))))
    return {"prefix": tmp / "prefix", "prompt": tmp / "prompt", "peft": tmp / "peft"}


CLI = [pytest.mark.usefixtures("one_thread"), needs_tokenizer, pytest.mark.skipif(
    not (TOKENIZER_DIR.parent / "cola" / "raw" / "in_domain_train.tsv").exists(), reason="no CoLA here")]


def cli(f):
    for mark in CLI:
        f = mark(f)
    return f


@cli
def test_cli_saves_pefts_files_and_peft_reads_them(cli_runs, tiny_dir):
    import json
    from peft import PeftModel
    from safetensors.torch import load_file
    for kind in ("prefix", "prompt"):
        config = json.loads((cli_runs[kind] / "adapter_config.json").read_text())
        assert config["peft_type"] == {"prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING"}[kind]
        assert config["num_virtual_tokens"] == 5 and config["modules_to_save"] == ["score", *LAYERNORMS]
        tensors = load_file(cli_runs[kind] / "adapter_model.safetensors")
        assert set(tensors) == {"prompt_embeddings", "base_model.score.weight",
                                *(f"base_model.transformer.{n}" for n in ["ln_f.weight", "ln_f.bias"]),
                                *(f"base_model.transformer.h.{i}.{ln}.{w}" for i in range(2)
                                  for ln in ("ln_1", "ln_2") for w in ("weight", "bias"))}
        # The prefix is saved projected, (P, layers * 2 * width): no MLP in the file.
        assert tensors["prompt_embeddings"].shape == ((5, 2 * 2 * 64) if kind == "prefix" else (5, 64))
    config = json.loads((cli_runs["prefix"] / "adapter_config.json").read_text())
    assert config["prefix_projection"] and config["encoder_hidden_size"] == 24
    config = json.loads((cli_runs["prompt"] / "adapter_config.json").read_text())
    assert config["prompt_tuning_init"] == "TEXT" and config["prompt_tuning_init_text"] == "Is this English?"
    # peft loads the exported adapter and gives our logits.
    theirs = PeftModel.from_pretrained(peft_base(tiny_dir), cli_runs["peft"]).eval()
    ours = attach_adapter(our_gpt(tiny_dir), *read_adapter(cli_runs["prefix"])[:2])
    mine, peft_logits = both(ours, theirs, *padded_batch([8, 3, 5], seed=9))
    torch.testing.assert_close(mine, peft_logits, **LOGITS)


@cli
def test_cli_predict_and_gen_put_the_virtual_tokens_first(cli_runs, tiny_dir, tmp_path):
    from conftest import ok, run, run_here
    from flags import DEFAULT_PROMPT
    from model import GPT
    from utils import load_tokenizer
    sentences = ["The cat sat on the mat.", "Mat the on sat cat the."]
    (tmp_path / "in.txt").write_text("\n".join(sentences) + "\n")
    proc = ok(run_here("predict", 7, "--adapter", f"a={cli_runs['prompt']}", "--adapter", f"b={cli_runs['prefix']}",
                  "--input", tmp_path / "in.txt"))
    tok = load_tokenizer(tiny_dir)
    for line, sentence in zip(proc.stdout.strip().splitlines(), sentences):
        for name, kind in (("a", "prompt"), ("b", "prefix")):
            model = attach_adapter(our_gpt(tiny_dir), *read_adapter(cli_runs[kind])[:2])
            with torch.no_grad():
                p = model(tok(sentence, return_tensors="pt")["input_ids"]).softmax(-1)[0]
            label = ["unacceptable", "acceptable"][int(p.argmax())]
            assert f"{name}: {label} ({float(p.max()):.3f})" in line, line
    proc = ok(run("gen", 7, "--model", tiny_dir, "--adapter", cli_runs["prompt"], "--max-new-tokens", 4,
                  "--temperature", 0))
    assert "5 virtual tokens of prompt tuning before the prompt" in proc.stdout
    model = attach_adapter(load_gpt(tiny_dir, cls=GPT).eval(), *read_adapter(cli_runs["prompt"])[:2])
    ids = tok(DEFAULT_PROMPT, return_tensors="pt")["input_ids"]
    new = [int(t[0]) for t in model.generate(ids, 4, temperature=0, eos_token_id=tok.eos_token_id)]
    text = tok.decode(new)
    while text.endswith("\ufffd"):
        new.pop()
        text = tok.decode(new)
    assert proc.stdout.endswith(DEFAULT_PROMPT + text + "\n"), proc.stdout


@cli
def test_cli_refuses_inconsistent_flags(tiny_dir, tiny, tmp_path, cli_runs, capsys):
    """Each refused before training, in this process (run.main, as the command line runs it)."""
    import run as cli
    from conftest import COLA_DIR, run, run_here, user_error
    args = lambda *extra: ["LoRA", 7, "--model", tiny_dir, "--data-dir", COLA_DIR, "--limit-train", 20,  # noqa
                           "--epochs", 1, "--out-dir", tmp_path / "out", "--plots-dir", tmp_path / "plots", *extra]
    cases = {
        ("--num-virtual-tokens", 5): "--num-virtual-tokens does not apply to --peft lora",
        ("--peft", "prefix", "--prompt-init", "Hello"): "--prompt-init does not apply to --peft prefix",
        ("--peft", "prompt", "--prefix-projection"): "--prefix-projection does not apply to --peft prompt",
        ("--peft", "prompt", "--lora-alpha", 8): "--lora-alpha does not apply to --peft prompt",
        ("--peft", "prefix", "--encoder-hidden-size", 8): "add --prefix-projection",
        ("--peft", "prompt", "--num-virtual-tokens", 256): "leaves no room for a sentence",
        ("--peft", "prefix", "--num-virtual-tokens", 200, "--max-length", 100): "less the 200 virtual tokens",
        ("--peft", "prefix", "--model", tiny["distilbert"]): "past_key_values",
    }
    for case, expected in cases.items():
        assert cli.main([str(a) for a in args(*case)]) == 2, case
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err, (case, err)
    assert not (tmp_path / "out").exists()
    # Serving in mixed batches: on our GPT-2 (test_serve.py); on a transformers backbone refused, saying why.
    # A transformer student copying the teacher's layers: no layer holds the virtual tokens.
    serve = run("serve", 7, "--model", tiny["llama"], "--tokenizer", tiny["llama"], "--adapter", cli_runs["prompt"],
                "--port", 1)  # a server: in a process of its own, should it start
    distil = run_here("distil", 7, "--teacher", cli_runs["prompt"], "--student", "transformer", "--student-from",
                      "teacher", "--student-layers", 1, "--data-dir", COLA_DIR, "--limit-train", 20, "--epochs", 1,
                      "--models-dir", tmp_path / "models", "--plots-dir", tmp_path / "plots")
    msg = user_error(serve)
    assert "our GPT-2 only" in msg and "run.py predict" in msg
    assert "whose virtual tokens no layer holds" in user_error(distil)
