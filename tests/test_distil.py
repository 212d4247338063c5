"""The pieces of distillation, in-process: the KD loss against hand computation, the student's mask
handling, the transfer set, the teacher-logit cache files, PCA embeddings, resuming a student, and the
held-out result that KD with a transfer set beats the scratch student when the teacher is right."""
import functools
import math
import random

import pytest
import torch
import torch.nn.functional as F

from data import Examples, augment
from model import DistilRNN, RNNConfig, pca_embeddings
from train_utils import IGNORE, TrainConfig, ce_loss, fit, kd_loss
from utils import cache_key, cache_path, read_cached_logits, write_cached_logits

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models, and a shared CPU


# --------------------------------------------------------------------------- the loss

STUDENT = torch.tensor([[2.0, -1.0], [0.5, 0.3], [-1.0, 1.5]])
TEACHER = torch.tensor([[-1.0, 3.0], [1.0, 0.0], [2.0, -2.0]])
LABELS = torch.tensor([1, 0, 0])


def by_hand(student, teacher, labels, t, alpha):
    """The formula, term by term with Python floats: alpha T^2 mean_i sum_c p_t log(p_t / p_s) + (1 - alpha) CE."""
    def softmax(row):
        e = [math.exp(x / t) for x in row]
        return [x / sum(e) for x in e]
    kl = ce = 0.0
    for s, te, y in zip(student.tolist(), teacher.tolist(), labels.tolist()):
        ps, pt = softmax(s), softmax(te)
        kl += sum(b * math.log(b / a) for a, b in zip(ps, pt))
        ce -= math.log(math.exp(s[y]) / sum(math.exp(x) for x in s))
    n = len(labels)
    return alpha * t * t * kl / n + (1 - alpha) * ce / n


@pytest.mark.parametrize("t,alpha", [(1.0, 0.5), (2.0, 0.5), (4.0, 0.9), (2.0, 1.0)])
def test_kd_loss_equals_the_formula_by_hand(t, alpha):
    got = kd_loss(STUDENT, {"labels": LABELS, "teacher_logits": TEACHER}, temperature=t, alpha=alpha)
    # float32 against Python's float64, a loss ~0.5-5 of a few logs and exps: ~1e-7 relative (rel 1e-5 is 80 ulps)
    assert float(got) == pytest.approx(by_hand(STUDENT, TEACHER, LABELS, t, alpha), rel=1e-5, abs=0)
    # The usual mistakes give other numbers: the KL the wrong way round, or averaged over classes too.
    wrong_order = alpha * t * t * F.kl_div(F.log_softmax(TEACHER / t, -1), F.softmax(STUDENT / t, -1),
                                           reduction="batchmean")
    mean_reduction = alpha * t * t * F.kl_div(F.log_softmax(STUDENT / t, -1), F.softmax(TEACHER / t, -1),
                                              reduction="sum") / STUDENT.numel()  # what reduction="mean" does
    soft = float(got) - (1 - alpha) * float(ce_loss(STUDENT, {"labels": LABELS}))
    assert soft > 0.1, "the soft term must not vanish when teacher and student disagree"
    assert abs(soft - float(wrong_order)) > 1e-3 and abs(soft - float(mean_reduction)) > 1e-3


def test_alpha_zero_is_plain_cross_entropy():
    got = kd_loss(STUDENT, {"labels": LABELS, "teacher_logits": TEACHER}, temperature=3.0, alpha=0.0)
    # alpha 0: the cross-entropy term alone, as torch computes it (a loss ~1: rel 1e-6 is 8 ulps)
    assert float(got) == pytest.approx(float(F.cross_entropy(STUDENT, LABELS)), rel=1e-6, abs=0)


def test_identical_logits_and_alpha_one_give_zero():
    got = kd_loss(TEACHER, {"labels": LABELS, "teacher_logits": TEACHER.clone()}, temperature=2.0, alpha=1.0)
    # Exactly 0 with the same log-softmax on both sides; 1e-6 leaves room for an equivalent formula (kl_div of a
    # softmax), off by T^2 = 4 times a few ulps of log p ~ 2 (2.4e-7 each).
    assert abs(float(got)) <= 1e-6


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0, 8.0])
def test_soft_term_gradient_is_t_times_the_probability_gap(t):
    """d/dz [T^2 KL(p_t || softmax(z / T))] = T (p_s - p_t) per sentence, over the batch size."""
    z = STUDENT.clone().requires_grad_(True)
    kd_loss(z, {"labels": LABELS, "teacher_logits": TEACHER}, temperature=t, alpha=1.0).backward()
    expected = t * (F.softmax(STUDENT / t, -1) - F.softmax(TEACHER / t, -1)) / len(LABELS)
    # gradients ~0.1-2 (T times a probability gap over 3), float32 through log-softmax: a few ulps of T
    assert torch.allclose(z.grad, expected, rtol=1e-5, atol=1e-6)


def test_soft_term_gradient_scale_is_comparable_across_temperatures():
    """With T^2 the soft gradient stays on one scale as T grows (without it, it would fall like 1/T^2)."""
    small_s, small_t = STUDENT / 4, TEACHER / 4  # logits of moderate size, the usual regime
    norms = {}
    for t in (1.0, 2.0, 4.0, 8.0):
        z = small_s.clone().requires_grad_(True)
        kd_loss(z, {"labels": LABELS, "teacher_logits": small_t}, temperature=t, alpha=1.0).backward()
        norms[t] = float(z.grad.norm())
    assert max(norms.values()) / min(norms.values()) < 2.0, norms
    assert norms[8.0] / norms[1.0] > 1 / 8, "the 1/T^2 fall of an unscaled soft term"


def test_transfer_sentences_have_no_hard_term():
    labels = torch.tensor([1, IGNORE, IGNORE])
    batch = {"labels": labels, "teacher_logits": TEACHER}
    # the labelled row's cross-entropy (~3), the sum over one row divided by one: rel 1e-6 is 8 ulps
    assert float(ce_loss(STUDENT, batch)) == pytest.approx(float(F.cross_entropy(STUDENT[:1], labels[:1])),
                                                           rel=1e-6, abs=0)
    z = STUDENT.clone().requires_grad_(True)
    loss = ce_loss(z, {"labels": torch.full((3,), IGNORE)})  # a batch of transfer sentences only
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(z.grad.abs().sum()) == 0.0
    both = kd_loss(STUDENT, batch, temperature=2.0, alpha=0.5)
    soft = kd_loss(STUDENT, batch, temperature=2.0, alpha=1.0)
    # the same two terms, added in float32 or in Python: rel 1e-6 is 8 ulps of a loss ~1
    assert float(both) == pytest.approx(0.5 * float(soft) + 0.5 * float(ce_loss(STUDENT, batch)), rel=1e-6, abs=0)


# --------------------------------------------------------------------------- the student

@pytest.mark.parametrize("rnn_type", ["gru", "lstm", "rnn"])
@pytest.mark.parametrize("pool", ["last", "mean", "max"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_student_gives_a_sentence_the_same_logits_alone_and_padded(rnn_type, pool, bidirectional):
    torch.manual_seed(0)
    model = DistilRNN(RNNConfig(vocab_size=100, rnn_type=rnn_type, pool=pool, bidirectional=bidirectional,
                                emb_dim=8, hidden=16, n_layers=2)).eval()
    sentence = torch.tensor([5, 17, 42, 8])
    alone = model(sentence[None], torch.ones(1, 4, dtype=torch.long))
    others = torch.randint(1, 100, (2, 7))
    for side in ("right", "left"):
        ids, mask = torch.full((3, 7), 99), torch.zeros(3, 7, dtype=torch.long)  # pads are a real token id
        ids[1:], mask[1:] = others, 1
        if side == "right":
            ids[0, :4], mask[0, :4] = sentence, 1
        else:
            ids[0, 3:], mask[0, 3:] = sentence, 1
        batched = model(ids, mask)
        # logits ~0.1-1 of a 2-layer 16-wide RNN, packed or not: float32 sums of <= 32 terms in another order
        assert torch.allclose(batched[0], alone[0], rtol=1e-5, atol=1e-5), (side, batched[0], alone[0])
        assert torch.allclose(model(others, torch.ones(2, 7, dtype=torch.long)), batched[1:], rtol=1e-5, atol=1e-5)


def test_pca_embeddings_keep_the_main_directions():
    torch.manual_seed(0)
    weight = torch.randn(500, 3) @ torch.tensor([[5.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0.1, 0]]) + 3.0
    emb = pca_embeddings(weight, 2)
    # scaled to std 1 in float32, then its std computed again over 1000 numbers: ~1e-7 relative
    assert emb.shape == (500, 2) and emb.std().item() == pytest.approx(1.0, rel=1e-5, abs=0)
    assert torch.equal(emb, pca_embeddings(weight, 2))  # deterministic
    # the first kept direction is the widest one (the first column, up to sign)
    corr = torch.corrcoef(torch.stack([emb[:, 0], weight[:, 0]]))[0, 1]
    assert abs(float(corr)) > 0.99


# --------------------------------------------------------------------------- the transfer set

def test_augment_is_seeded_and_makes_new_sentences():
    sentences = ["the quick brown fox jumps over the lazy dog", "John likes Mary very much", "Go"]
    a = augment(sentences, 5, seed=1, mask_token="<mask>")
    assert a == augment(sentences, 5, seed=1, mask_token="<mask>")
    assert a != augment(sentences, 5, seed=2, mask_token="<mask>")
    assert len(a) >= 10 and len(set(a)) == len(a) and not set(a) & set(sentences)
    assert any("<mask>" in s for s in a)  # masking
    assert any(len(s.split()) < 5 for s in a[:5])  # n-gram sampling shortens sentences
    words = set(" ".join(sentences).split()) | {"<mask>"}
    assert all(set(s.split()) <= words for s in a)  # only the sentences' own words (and the mask)
    # Without a mask token (GPT-2, SmolLM2): masked words become words of the data, never a special token.
    b = augment(sentences, 5, seed=1)
    assert b == augment(sentences, 5, seed=1) and len(set(b)) == len(b) and not set(b) & set(sentences)
    assert all(set(s.split()) <= words - {"<mask>"} for s in b)
    # a replaced word: some new sentence holds a word that its own source sentence does not
    assert any(not any(set(s.split()) <= set(o.split()) for o in sentences) for s in b)


# --------------------------------------------------------------------------- the cache files

def test_teacher_cache_round_trip_and_damage(tmp_path):
    ids = [[1, 2, 3], [4, 5]]
    key = cache_key("teacher-a", ids)
    assert key != cache_key("teacher-b", ids) and key != cache_key("teacher-a", [[1, 2], [3, 4, 5]])
    assert read_cached_logits(tmp_path, key, 2) == (None, None)  # nothing there: no warning
    logits = torch.tensor([[0.5, -0.5], [1.0, 2.0]])
    path = write_cached_logits(tmp_path, key, logits, {"parameters": 7})
    got, info = read_cached_logits(tmp_path, key, 2)
    assert torch.equal(got, logits) and info == {"parameters": 7}

    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip bits inside the logits
    path.write_bytes(bytes(raw))
    got, why = read_cached_logits(tmp_path, key, 2)
    assert got is None and "damaged" in why
    path.write_bytes(b"not a safetensors file")
    got, why = read_cached_logits(tmp_path, key, 2)
    assert got is None and "cannot be read" in why
    # a file under this key's name but written for other sentences: stale
    other = cache_key("teacher-a", [[9]])
    write_cached_logits(tmp_path, other, logits[:1], {})
    cache_path(tmp_path, other).rename(cache_path(tmp_path, key))
    got, why = read_cached_logits(tmp_path, key, 2)
    assert got is None and "other sentences" in why


# --------------------------------------------------------------------------- training a student

def student_data(n, seed, vocab=60):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(1, vocab, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
           for _ in range(n)]
    labels = [int(x[0] < vocab // 2) for x in ids]
    logits = torch.tensor([[-2.0, 2.0] if y else [2.0, -2.0] for y in labels])
    return Examples(ids, labels, pad_id=0, teacher_logits=logits)


def test_student_resumed_equals_uninterrupted(tmp_path):
    train, dev = student_data(96, 1), student_data(48, 2)
    loss = functools.partial(kd_loss, temperature=2.0, alpha=0.5)
    cfg = TrainConfig(epochs=3, lr=3e-3, batch_size=16, seed=5)

    def student():
        torch.manual_seed(5)
        return DistilRNN(RNNConfig(vocab_size=60, emb_dim=8, hidden=16))

    full = fit(student(), train, dev, cfg, CPU, tmp_path / "a", loss_fn=loss)
    fit(student(), train, dev, cfg, CPU, tmp_path / "b", loss_fn=loss, stop_after_epoch=1)
    resumed = fit(student(), train, dev, cfg, CPU, tmp_path / "b", loss_fn=loss, resume=True)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("train_sentences_per_s", "train_seconds")} for r in h]
    assert strip(resumed) == strip(full)


class WordTokenizer:
    """Word-level ids for the synthetic task (0 is padding)."""
    pad_token_id = 0

    def __init__(self, words):
        self.vocab = {w: i + 1 for i, w in enumerate(words)}

    def __call__(self, sentences, add_special_tokens=False):
        return {"input_ids": [[self.vocab[w] for w in s.split()] for s in sentences]}


WORDS = [f"w{i}" for i in range(200)] + ["MASK"]
KEYS = set(WORDS[:20])


def rule(sentence):
    return int(any(w in KEYS for w in sentence.split()))


def synthetic_sentences(n, seed):
    rng, out = random.Random(seed), []
    for i in range(n):
        ws = [rng.choice(WORDS[20:200]) for _ in range(rng.randint(4, 10))]
        if i % 2:  # a positive: one key word somewhere
            ws[rng.randrange(len(ws))] = rng.choice(WORDS[:20])
        out.append(" ".join(ws))
    return out


def synthetic_best_dev_acc(out_dir, alpha=None, augment_n=8, seed=0):
    """Best held-out accuracy of a student on the synthetic task: a perfect teacher of a rule the 100
    labelled sentences barely show (label 1 iff one of 20 'key' words of 200 occurs). alpha None: the
    scratch student (cross-entropy, no transfer set)."""
    tok = WordTokenizer(WORDS)
    teacher = lambda ss: torch.tensor([[-4.0, 4.0] if rule(s) else [4.0, -4.0] for s in ss])
    train_s, dev_s = synthetic_sentences(100, 1), synthetic_sentences(400, 2)
    dev = Examples.encode(tok, dev_s, [rule(s) for s in dev_s], 64)
    ss, labels = list(train_s), [rule(s) for s in train_s]
    if alpha is not None and augment_n:
        new = augment(train_s, augment_n, seed=seed, mask_token="MASK")
        ss, labels = ss + new, labels + [IGNORE] * len(new)
    train = Examples.encode(tok, ss, labels, 64)
    train.extras["teacher_logits"] = teacher(ss)
    torch.manual_seed(seed)
    model = DistilRNN(RNNConfig(vocab_size=len(WORDS) + 1, emb_dim=16, hidden=32))
    loss = functools.partial(kd_loss, temperature=2.0, alpha=alpha) if alpha is not None else ce_loss
    history = fit(model, train, dev, TrainConfig(epochs=12, lr=5e-3, batch_size=16, weight_decay=0.0, seed=seed),
                  CPU, out_dir, loss_fn=loss)
    return max(r["dev_acc"] for r in history)


def test_kd_with_a_transfer_set_beats_the_scratch_student_on_a_held_out_set(tmp_path):
    """The transfer set's masked words and n-grams, labelled by the teacher, show the student which words
    matter. Measured on held-out sentences (seed 0): scratch 0.53, KD + augment 0.82."""
    scratch = synthetic_best_dev_acc(tmp_path / "scratch")
    distilled = synthetic_best_dev_acc(tmp_path / "kd", alpha=0.5)
    assert distilled >= scratch + 0.15, (scratch, distilled)


if __name__ == "__main__":  # PYTHONPATH=. python tests/test_distil.py: the synthetic task over alpha and seeds (README)
    import sys
    import tempfile
    sys.stdout.reconfigure(line_buffering=True)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [("scratch (rnn)", None, 0)] + [(f"KD alpha={a}, augment 8", a, 8) for a in (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)] \
            + [("KD alpha=0.5, no augment", 0.5, 0)]
        print("| student | best held-out accuracy, seeds 0 / 1 / 2 | mean |\n|---|---|---|")
        for name, alpha, n in rows:
            accs = [synthetic_best_dev_acc(f"{tmp}/{name}{seed}".replace(" ", "_"), alpha, n, seed) for seed in (0, 1, 2)]
            print(f"| {name} | {' / '.join(f'{a:.2f}' for a in accs)} | {sum(accs) / 3:.2f} |")


# --------------------------------------------------------------------------- the levers of distillation

def test_mse_kd_loss_equals_the_formula_by_hand():
    """--kd-loss mse: alpha * mean_i mean_c (z_s - z_t)^2 + (1 - alpha) CE, term by term with Python floats."""
    for alpha in (0.5, 1.0):
        got = kd_loss(STUDENT, {"labels": LABELS, "teacher_logits": TEACHER}, temperature=4.0, alpha=alpha, loss="mse")
        mse = sum((a - b) ** 2 for s, t in zip(STUDENT.tolist(), TEACHER.tolist()) for a, b in zip(s, t)) / STUDENT.numel()
        ce = -sum(math.log(math.exp(s[y]) / sum(math.exp(x) for x in s))
                  for s, y in zip(STUDENT.tolist(), LABELS.tolist())) / len(LABELS)
        # float32 sums of a few squares ~1-16 against float64: rel 1e-6 is 8 ulps
        assert float(got) == pytest.approx(alpha * mse + (1 - alpha) * ce, rel=1e-6, abs=0)
    # the temperature plays no part, and the gradient is 2 (z_s - z_t) / (classes * sentences)
    z = STUDENT.clone().requires_grad_(True)
    kd_loss(z, {"labels": LABELS, "teacher_logits": TEACHER}, temperature=1.0, alpha=1.0, loss="mse").backward()
    assert torch.allclose(z.grad, 2 * (STUDENT - TEACHER) / STUDENT.numel(), rtol=1e-6, atol=1e-7)


def test_data_vocabulary_maps_ids_to_rows_and_survives_save_and_load(tmp_path):
    """--student-vocab data: rows for the kept token ids only (+ the unknown row 0); the tokenizer's ids go
    in, the mapping is saved in student.safetensors, and a loaded student gives the same logits."""
    from utils import load_student, save_student
    kept = [3, 17, 42, 99]
    torch.manual_seed(0)
    model = DistilRNN(RNNConfig(vocab_size=100, emb_dim=8, hidden=8, rows=len(kept) + 1))
    model.keep_tokens(kept)
    full = DistilRNN(RNNConfig(vocab_size=100, emb_dim=8, hidden=8))
    assert model.embed.weight.shape == (5, 8)
    assert sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in model.parameters()) == 95 * 8
    assert model.vocab_map[kept].tolist() == [1, 2, 3, 4] and int(model.vocab_map[[0, 5, 98]].abs().sum()) == 0
    assert float(model.embed.weight[0].detach().abs().sum()) == 0.0  # the unknown row adds nothing until trained
    model.eval()
    ids = torch.tensor([[3, 17, 42, 99], [42, 7, 3, 55]])  # 7 and 55 are unknown
    # an unknown token reads the same row as any other unknown one
    assert torch.equal(model(ids), model(torch.tensor([[3, 17, 42, 99], [42, 8, 3, 56]])))
    save_student(model, tmp_path / "s", {"labels": ["a", "b"]})
    loaded, extras = load_student(tmp_path / "s")
    assert extras["student"]["rows"] == 5 and loaded.vocab_map.dtype == torch.int32
    assert torch.equal(loaded(ids), model(ids))


def test_lm_prompts_and_sentence_filter():
    from data import lm_prompts, lm_sentence
    sentences = ["the quick brown fox jumps over the lazy dog", "John likes Mary", "Go"]
    p = lm_prompts(sentences, 3, seed=1)
    assert p == lm_prompts(sentences, 3, seed=1) and len(p) == 9
    assert all(s.startswith(q) for s, q in zip([x for x in sentences for _ in range(3)], p))
    assert all(1 <= len(q.split()) <= 4 for q in p) and all(len(q.split()) <= 2 for q in p[3:6])
    quarter = lm_prompts(sentences * 100, 0.25, seed=3)  # a fraction: one prompt for about that share
    assert 40 <= len(quarter) <= 110 and quarter == lm_prompts(sentences * 100, 0.25, seed=3)
    assert lm_sentence("John", " likes the red car. And then") == "John likes the red car."
    assert lm_sentence("John", " likes\n\nthe car.") is None           # a line break
    assert lm_sentence("John", " likes 3 cars.") is None               # numbers
    assert lm_sentence("John", " left") is None                        # no end
    assert lm_sentence("John", " left.") is None                       # too short
    assert lm_sentence("The", " man who " + "saw " * 40 + "it.") is None  # a run-on


class TinyLM:
    """A stand-in for distil.Teacher as lm_sentences uses it: the tiny random GPT-2 as the base model."""

    def __init__(self, base):
        self.base, self.gguf, self.amp, self.device, self.loads = str(base), None, None, CPU, 0

    def language_model(self):
        from utils import load_gpt
        self.loads += 1
        lm = load_gpt(self.base)
        lm.generate_tokens = lm.generate
        return lm.eval()


def test_lm_sentences_are_seeded_and_cached(tiny_dir, tmp_path, monkeypatch, capsys):
    """--transfer-lm: the same seed writes the same sentences, another seed others; the second call reads
    the cache and never loads the language model."""
    from conftest import TOKENIZER_DIR
    if not (TOKENIZER_DIR / "vocab.json").exists():
        pytest.skip(f"{TOKENIZER_DIR} is not here")
    import distil
    from utils import load_tokenizer
    # A random model writes no sentence that passes the filter: keep every continuation, to compare them.
    monkeypatch.setattr(distil, "lm_sentence", lambda prompt, continuation: prompt + continuation)
    tok = load_tokenizer(TOKENIZER_DIR)
    texts = ["The cat sat on the mat.", "John likes Mary very much.", "She left early."]
    lm = TinyLM(tiny_dir)
    a = distil.lm_sentences(lm, tok, texts, 2, seed=1, cache_dir=tmp_path / "c1", batch_size=4)
    b = distil.lm_sentences(lm, tok, texts, 2, seed=1, cache_dir=tmp_path / "c2", batch_size=4)
    c = distil.lm_sentences(lm, tok, texts, 2, seed=2, cache_dir=tmp_path / "c2", batch_size=4)
    assert lm.loads == 3 and a == b and a != c and len(a) == 6
    assert all(any(s.startswith(t.split()[0]) for t in texts) for s in a)  # prompts are the sentences' first words
    capsys.readouterr()
    assert distil.lm_sentences(lm, tok, texts, 2, seed=1, cache_dir=tmp_path / "c1", batch_size=4) == a
    assert lm.loads == 3 and "the language model did not run" in capsys.readouterr().out
