"""distil: distillation on CoLA, ours only: a distil epoch with the teacher-logit cache against an rnn epoch and
against one that runs the teacher every batch, the student's inference speed against the teacher's, and the
teacher's own inference the old way against run.py's.

The teacher is our GPTClassifier on the random-weight gpt2 checkpoint with a LoRA adapter merged, the student
run.py's DistilRNN with its defaults; the epochs are train_utils.fit's own (its "train_seconds", which leave out
the evaluation), on a fixed random subset of CoLA's training sentences, in turns. With --distil-teacher and
--distil-student, bench_kd_pair times a trained student against its real teacher instead.
"""
import copy
import functools
import io
import statistics
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from types import SimpleNamespace

import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from backbones import HFClassifier
from benchmarks.common import seconds_in_turns, timed
from data import Examples, load_cola
from distil import Teacher, logits_by_length, teacher_precision
from model import GPT2_TARGETS, DistilRNN, GPTClassifier, RNNConfig, inject_adapters, mark_trainable, merge_adapters
from predict import load_student_classifier
from train_utils import TrainConfig, ce_loss, fit, kd_loss, predict_logits
from utils import load_gpt, load_tokenizer

DEVICE = torch.device("cpu")
BATCH, INFER_BATCH = 32, 64  # run.py's student batch; run.py's teacher-logit batch, for both models' inference
RNN_CONFIG = RNNConfig(vocab_size=50257)


def bench_distil(args, ckpt):
    """distil vs rnn epochs (teacher-logit cache, teacher every batch) and student vs teacher inference."""
    bench_distil_teacher(args)
    train, dev = distil_sets(args)
    teacher = merged_teacher(ckpt)
    size = {"student": count(DistilRNN(RNN_CONFIG)), "teacher": count(teacher)}
    # The cache: the teacher once over the training sentences (also its warm-up), logits in example order.
    t0 = time.perf_counter()
    logits = predict_logits(teacher, train, DEVICE, INFER_BATCH, progress=False)
    cache_s = time.perf_counter() - t0
    times = runs_in_turns(args, train, dev, teacher, logits)
    print_distil(args, train, size, cache_s, times)


def distil_sets(args):
    """A fixed random subset of CoLA's training sentences (not the file's first rows, which come from a few
    sources only), and 64 dev sentences for fit's evaluation (untimed)."""
    tok = load_tokenizer(args.tokenizer)
    cola = load_cola(args.data_dir)
    sentences, labels = cola["train"]
    pick = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(0))[:args.distil_sentences].tolist()
    train = Examples.encode(tok, [sentences[i] for i in pick], [labels[i] for i in pick], 128, "distil train")
    dev = Examples.encode(tok, *(x[:64] for x in cola["dev"]), 128, "distil dev")
    return train, dev


def first(examples, k, **extras):
    """The first k examples, with extra per-example fields (e.g. teacher_logits) cut alike."""
    return Examples(examples.ids[:k], examples.labels[:k].tolist(), examples.pad_id,
                    **{name: v[:k] for name, v in extras.items()})


def count(model):
    return sum(p.numel() for p in model.parameters())


def merged_teacher(ckpt):
    teacher = load_gpt(str(ckpt), cls=GPTClassifier, num_labels=2)
    inject_adapters(teacher, "lora", GPT2_TARGETS, r=4, alpha=4.0)
    mark_trainable(teacher)
    merge_adapters(teacher)  # as run.py's Teacher: inference at the base model's speed
    return teacher.eval()


def epoch_seconds(examples, dev, loss_fn):
    """One epoch of train_utils.fit (run.py's student settings) from the same initial student; fit's
    own training time of the epoch, which leaves out its evaluation and file writing."""
    torch.manual_seed(0)
    student = DistilRNN(RNN_CONFIG)
    cfg = TrainConfig(epochs=1, lr=2e-3, batch_size=BATCH, weight_decay=0.0, seed=0)
    with tempfile.TemporaryDirectory(prefix="bench-distil-") as out, \
            redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):  # fit's epoch line, progress bar
        history = fit(student, examples, dev, cfg, DEVICE, out, loss_fn=loss_fn)
    return history[-1]["train_seconds"]


def infer_seconds(model, examples):
    return timed(lambda: predict_logits(model, examples, DEVICE, INFER_BATCH, progress=False))


def runs_in_turns(args, train, dev, teacher, logits):
    """{kind: [seconds of each run]}: epochs of rnn, of distil with the cache ("kd"), of distil running the
    teacher every batch ("naive", scaled per sentence to the whole set), and inference of student and teacher."""
    n, n_naive = len(train), min(args.distil_naive_sentences, len(train))
    cached = Examples(train.ids, train.labels.tolist(), train.pad_id, teacher_logits=logits)
    kd = functools.partial(kd_loss, temperature=2.0, alpha=0.5)

    def kd_teacher_every_batch(student_logits, batch):  # the naive way: the teacher runs in every step
        with torch.no_grad():
            batch["teacher_logits"] = teacher(batch["input_ids"], batch["attention_mask"])
        return kd(student_logits, batch)

    student = DistilRNN(RNN_CONFIG).eval()
    infer_set = first(train, args.distil_infer_sentences)
    warm = 2 * BATCH  # warm-ups: two batches of each
    epoch_seconds(first(train, warm), dev, ce_loss)
    epoch_seconds(first(train, warm, teacher_logits=logits), dev, kd)
    epoch_seconds(first(train, warm), dev, kd_teacher_every_batch)
    infer_seconds(student, first(train, warm))
    infer_seconds(teacher, first(train, warm))
    times = {k: [] for k in ("rnn", "kd", "naive", "student", "teacher")}
    for _ in range(args.distil_repeats):  # in turns, so that a slow spell hits all alike
        times["rnn"].append(epoch_seconds(train, dev, ce_loss))
        times["kd"].append(epoch_seconds(cached, dev, kd))
        times["naive"].append(epoch_seconds(first(train, n_naive), dev, kd_teacher_every_batch) * n / n_naive)
        times["student"].append(infer_seconds(student, infer_set))
        times["teacher"].append(infer_seconds(teacher, infer_set))
    return times


def spread(t, fmt="{:.2f} s"):
    return f"{fmt.format(min(t))}-{fmt.format(max(t))}"


def print_distil(args, train, size, cache_s, times):
    """The set-up, the table of medians and the spread of the runs."""
    n = len(train)
    n_naive, m = min(args.distil_naive_sentences, n), min(args.distil_infer_sentences, n)
    rnn_s, kd_s, naive_s = (statistics.median(times[k]) for k in ("rnn", "kd", "naive"))
    student_sps, teacher_sps = m / statistics.median(times["student"]), m / statistics.median(times["teacher"])
    ratio = kd_s / rnn_s
    naive_note = (f"measured on {n_naive} of the {n} sentences, scaled per sentence" if n_naive < n
                  else "measured on all of them")
    print(f"distil: one epoch of train_utils.fit on a fixed random subset of {n} CoLA training sentences "
          f"({sum(map(len, train.ids))} tokens), batches of {BATCH}, lr 2e-3, fit's own train_seconds (its dev "
          f"evaluation left out); median of {args.distil_repeats} runs per kind, in turns, after a warm-up. "
          f"Student: DistilRNN with its defaults (biGRU, emb 64, hidden 128, max pool; {size['student'] / 1e6:.2f}M "
          f"parameters); teacher: our GPTClassifier, gpt2 shape, random weights, LoRA r=4 merged "
          f"({size['teacher'] / 1e6:.1f}M); kd_loss T=2 alpha=0.5")
    print(f"distil: teacher-logit cache built in {cache_s:.1f} s (one teacher pass over the {n} sentences, "
          f"batches of {INFER_BATCH}; once per data set: run.py keeps it on disk, so later runs skip even that)")
    print(f"distil: teacher every batch: {naive_note}")
    print()
    print("| what | measured | compared with | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| distil epoch (teacher-logit cache) vs rnn epoch, {n} sentences | {kd_s:.2f} s | rnn {rnn_s:.2f} s | "
          f"**{ratio:.2f}x** | <= 1.2x{'' if ratio <= 1.2 else ': **missed**'} |")
    print(f"| distil epoch: teacher-logit cache vs the teacher run every batch | {kd_s:.2f} s | teacher every "
          f"batch {naive_s:.1f} s{f' (timed on {n_naive} sentences, scaled)' if n_naive < n else ''} | "
          f"**{kd_s / naive_s:.3f}x** (the cache: {naive_s / kd_s:.0f}x faster) | |")
    print(f"| inference, student vs teacher ({m} sentences, batches of {INFER_BATCH}, eval, no_grad) | "
          f"{student_sps:.0f} sent/s | teacher {teacher_sps:.1f} sent/s | **{student_sps / teacher_sps:.0f}x** | |")
    print()
    student_spread = spread([m / t for t in times["student"]], "{:.0f}")
    teacher_spread = spread([m / t for t in times["teacher"]], "{:.1f}")
    print(f"distil: spread of the runs: rnn {spread(times['rnn'])}, distil (cache) {spread(times['kd'])}, distil "
          f"(teacher every batch) {spread(times['naive'], '{:.1f} s')}; inference student {student_spread} sent/s, "
          f"teacher {teacher_spread} sent/s")
    print(f"distil README: on {n} CoLA sentences a distil epoch with the teacher-logit cache takes {kd_s:.2f} s, "
          f"{ratio:.2f}x an rnn epoch ({rnn_s:.2f} s; target <= 1.2x) and is {naive_s / kd_s:.0f}x faster than one "
          f"running the teacher every batch ({naive_s:.1f} s); the cache costs one teacher pass ({cache_s:.1f} s); the "
          f"student infers {student_sps / teacher_sps:.0f}x faster than the teacher ({student_sps:.0f} vs "
          f"{teacher_sps:.1f} sent/s)", flush=True)


# --------------------------------------------------------------------------- the teacher alone, and a trained pair

def bench_distil_teacher(args):
    """The teacher's inference speed on a SmolLM2-shaped Llama (random weights, a classification head): the
    old way (sentences in file order, batches of 64, fp32) against run.py's (sorted by length, batches of
    --teacher-batch-size 128, the precision distil.teacher_precision picks here)."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         tie_word_embeddings=True, num_labels=2, pad_token_id=0)
    teacher = HFClassifier(LlamaForSequenceClassification(config)).eval().requires_grad_(False)
    sentences, labels = load_cola(args.data_dir)["train"]
    pick = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(0))[:args.distil_teacher_sentences]
    ex = Examples.encode(load_tokenizer(args.tokenizer), [sentences[i] for i in pick], [labels[i] for i in pick], 128)
    ex = Examples([[t % 49152 or 1 for t in x] for x in ex.ids], ex.labels.tolist(), 0)  # GPT-2 ids into Llama's
    amp = teacher_precision(SimpleNamespace(teacher_precision="auto"), DEVICE, None)
    warm = ex.subset(list(range(32)))
    ways = {"before: file order, batches of 64, fp32": lambda e: predict_logits(teacher, e, DEVICE, 64, progress=False),
            f"after: sorted by length, batches of 128, {'bf16' if amp else 'fp32'}":
                lambda e: logits_by_length(teacher, e, DEVICE, 128, amp, progress=False)}
    for way in ways.values():
        way(warm)
    times = seconds_in_turns({k: lambda way=way: way(ex) for k, way in ways.items()}, max(1, args.distil_repeats // 2))
    n, size, runs = len(ex), count(teacher), len(next(iter(times.values())))
    print(f"distil teacher: SmolLM2-shaped Llama (30 layers, 576 wide, random weights, {size / 1e6:.1f}M parameters), "
          f"{n} CoLA training sentences, {torch.get_num_threads()} threads, median of {runs} runs")
    speeds = {k: n / statistics.median(t) for k, t in times.items()}
    before = next(iter(speeds.values()))
    for k, v in speeds.items():
        print(f"| teacher inference, {k} | {v:.1f} sentences/s | {v / before:.2f}x |")


def bench_kd_pair(args):
    """A trained student against its real teacher (--distil-teacher, an adapter directory) on the dev set of
    --data-dir, in turns in one process: the inference speeds behind docs/distillation.md's ">= 50x"."""
    student, tok, _, max_length = load_student_classifier(args.distil_student, None, DEVICE)
    sentences, labels = load_cola(args.data_dir)["dev"]
    dev = Examples.encode(tok, sentences, labels, max_length)
    flags = SimpleNamespace(teacher=args.distil_teacher, models_dir="models", SR=0, model=None, gguf_file=None,
                            tokenizer=None, teacher_batch_size=128, teacher_precision="auto")
    amp = teacher_precision(flags, DEVICE, None)
    teacher = Teacher(flags, DEVICE, amp).load()
    ways = {"teacher": lambda: logits_by_length(teacher, dev, DEVICE, 128, None, progress=False),
            # the student in the same batches as the teacher: sorted by length (a transformer student pays for padding)
            "student": lambda: logits_by_length(student, dev, DEVICE, 128, None, progress=False, local=True)}
    if amp is not None:  # the student in the teacher's precision too: like for like
        cast = copy.deepcopy(student).to(amp)
        ways["student in the teacher's precision"] = lambda: logits_by_length(cast, dev, DEVICE, 128, None,
                                                                              progress=False, local=True)
    for way in ways.values():
        way()  # warm-up
    speed = {k: len(dev) / statistics.median(t) for k, t in seconds_in_turns(ways, 3).items()}
    size = {"student": count(student), "teacher": Teacher.parameters_of(teacher)}
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
