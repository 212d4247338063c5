"""Benchmarks of our hand-written GPT-2 + LoRA against the reference (transformers / peft), printed
side by side with ratios and the targets, in one run. CPU, float32, no hub needed.

    python bench.py gen     greedy decoding, batch 1: tokens/s of ours vs transformers' generate; each
                            weight shape's one-row product in every candidate way, the way model.Linear
                            chose here, and the ceiling they set; and sampling K=4 continuations as one
                            batch vs one alone (total tokens/s)
    python bench.py lora    LoRA training on CoLA: sentences/s of ours vs transformers+peft, ours' FLOP/s
                            against this machine's matmul peak, peak memory of each, and ours' evaluation
                            speed with the adapters merged vs unmerged; DoRA and prompt tuning the same way;
                            and long inputs (rows of ~700 tokens of CoLA's sentences one after the other)
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

The benchmarks are modules of benchmarks/, one a mode (benchmarks/gen.py, lora.py, precision.py, distil.py,
backbone.py, threads.py, serve.py), with their shared timing and checkpoint helpers in benchmarks/common.py;
this file is the command line: the parser, and the dispatch of each mode to its module (imported only when that
mode runs, so that `--help` answers at once).
"""
import argparse
import importlib
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may wait on the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from benchmarks.common import ROOT, checkpoint, quiet_transformers  # noqa: E402


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("what", choices=["gen", "lora", "precision", "distil", "backbone", "threads", "serve", "all",
                                         "_lora_worker", "_serve_memory"],
                   help="what to benchmark")
    p.add_argument("side", nargs="?", choices=["ours", "peft", "ours-dora", "peft-dora", "ours-prompt", "peft-prompt",
                                                    "ours-long", "peft-long"],
                   help=argparse.SUPPRESS)
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
    p.add_argument("--long-tokens", type=int, default=704, help="lora: tokens of each row of the long-input rows "
                   "(CoLA's training sentences one after the other, no padding); 0 leaves the long-input rows out")
    p.add_argument("--long-batch", type=int, default=2, help="lora: rows per step of the long-input rows")
    p.add_argument("--long-steps", type=int, default=3, help="lora: timed steps of the long-input rows (after one "
                   "untimed)")
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
    return p


def bench(name, *args):
    """benchmarks/NAME.py's bench_NAME(*args), the module imported only now."""
    return getattr(importlib.import_module(f"benchmarks.{name}"), f"bench_{name}")(*args)


def main():
    p = parser()
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tmp = None  # a temporary --workdir, removed when main returns
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-gpt2-")
        args.workdir = tmp.name
    quiet_transformers()
    if args.what in ("threads", "backbone"):
        return bench(args.what, args)
    if args.what == "distil" and (args.distil_teacher or args.distil_student):
        if not (args.distil_teacher and args.distil_student):
            p.error("--distil-teacher and --distil-student go together: a student and the teacher it learned from")
        from benchmarks.distil import bench_kd_pair
        return bench_kd_pair(args)
    ckpt = checkpoint(args.workdir)
    if args.what == "_lora_worker":
        from benchmarks.lora import lora_worker
        return lora_worker(args.side, args, ckpt)
    if args.what == "_serve_memory":
        from benchmarks.serve import serve_memory_worker
        return serve_memory_worker(args, ckpt)
    import peft
    import transformers
    print(f"bench: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
          f"CPU, float32, torch threads: {torch.get_num_threads()} (of {os.cpu_count()} cores); random-weight "
          f"gpt2-shaped checkpoint in {ckpt}", flush=True)
    for name in ["gen", "lora", "precision", "distil"] if args.what == "all" else [args.what]:
        bench(name, args, ckpt)
    if args.what == "all":
        bench("backbone", args)


if __name__ == "__main__":
    main()
