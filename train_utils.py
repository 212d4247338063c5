"""One training loop for every mode (LoRA, distil, rnn), the losses, the metrics and the plots."""
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import IGNORE
from model import cast_frozen_linears
from machine import distributed
from utils import atomic_write


# --------------------------------------------------------------------------- metrics and losses

def classification_metrics(preds, labels):
    """Accuracy and Matthews correlation (CoLA's official metric: 0 for any constant predictor), in its
    multi-class form (Gorodkin's R_K), which for two classes is the usual (tp*tn - fp*fn) / sqrt(...)."""
    preds, labels = preds.long().tolist(), labels.long().tolist()
    k = max(preds + labels, default=0) + 1
    true_counts, pred_counts = [0] * k, [0] * k
    correct = 0
    for p, t in zip(preds, labels):
        true_counts[t] += 1
        pred_counts[p] += 1
        correct += p == t
    n = len(labels)
    cov_tp = correct * n - sum(p * t for p, t in zip(pred_counts, true_counts))
    denom = math.sqrt((n * n - sum(p * p for p in pred_counts)) * (n * n - sum(t * t for t in true_counts)))
    return {"acc": correct / max(1, n), "mcc": cov_tp / denom if denom else 0.0}



def ce_loss(logits, batch):
    """Cross-entropy over the labelled sentences of the batch (0 when it has none). Averaged over the
    labelled sentences of the whole batch: when the batch is one process's part of a batch shared by
    several (batch["labelled_total"], see Examples.batches), the parts' losses add up to the batch's."""
    labels = batch["labels"]
    labelled = labels != IGNORE
    total = batch.get("labelled_total")
    if total is None:
        if bool(labelled.all()):
            return F.cross_entropy(logits.float(), labels)
        total = labelled.sum()
    if not bool(labelled.any()) or int(total) == 0:
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float()[labelled], labels[labelled], reduction="sum") / total


def kd_loss(logits, batch, temperature=2.0, alpha=0.5, loss="kl"):
    """The distillation loss, alpha * soft + (1 - alpha) * CE, with one of two soft terms:
    loss="kl", Hinton et al.'s T^2 * KL(teacher_T || student_T), where x_T = softmax(logits / T). The KL is
    the teacher's expectation of log(p_teacher / p_student), summed over the classes. Its gradient with
    respect to the student's logits is T * (p_student - p_teacher) / batch, which shrinks like 1/T for
    large T: T^2 brings it back to the hard term's scale, so alpha means the same at every temperature.
    loss="mse", Tang et al. (2019)'s mean squared error between the logits themselves, averaged over the
    classes: it matches the teacher's margins, not only its probabilities (no temperature).
    Both are averaged over the sentences (all of them: transfer-set sentences have no label, so the CE
    averages over the labelled ones only)."""
    assert loss in ("kl", "mse"), f"unknown soft loss {loss!r}"
    teacher = batch["teacher_logits"].float()
    if loss == "mse":
        soft = ((logits.float() - teacher) ** 2).mean(-1)
    else:
        t = temperature
        log_p_student = F.log_softmax(logits.float() / t, -1)
        log_p_teacher = F.log_softmax(teacher / t, -1)
        soft = t * t * (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    soft = soft.mean() if "n_total" not in batch else soft.sum() / batch["n_total"]  # over the whole batch (ce_loss)
    if alpha == 1:
        return soft
    return alpha * soft + (1 - alpha) * ce_loss(logits, batch)


# --------------------------------------------------------------------------- progress

LOG_EVERY = 30  # seconds between progress lines in a log


def progress_bar(iterable, total, desc, disable=False):
    """A tqdm bar on a terminal. Off a terminal (a log file, CI, nohup, 2>&1 | tee), a bar redrawn dozens
    of times a second makes the log unreadable: one plain line every LOG_EVERY seconds instead."""
    if not disable and sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
    return LogProgress(iterable, total, desc, every=float("inf") if disable else LOG_EVERY)


class LogProgress:
    """tqdm's interface as far as fit() uses it, printing 'desc: i/total (p%), s s, key value' lines."""

    def __init__(self, iterable, total, desc, every=LOG_EVERY, file=None):
        self.iterable, self.total, self.desc, self.every, self.file = iterable, total, desc, every, file
        self.postfix = {}

    def set_postfix(self, **values):
        self.postfix = values

    def __iter__(self):
        start = last = time.time()
        for i, item in enumerate(self.iterable, 1):
            yield item
            now = time.time()
            if now - last >= self.every and i < self.total:
                last = now
                extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
                print(f"{self.desc}: {i}/{self.total} ({100 * i / self.total:.0f}%), {now - start:.0f} s{extra}",
                      file=self.file or sys.stderr, flush=True)


# --------------------------------------------------------------------------- the loop

@dataclass
class TrainConfig:
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    grad_clip: float = 1.0
    seed: int = 0
    eval_batch_size: int = 128
    group_by_length: bool = False  # batches of similar lengths (Examples.batches)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def predict_logits(model, examples, device, batch_size=128, amp_dtype=None, desc="eval", progress=True):
    """(len(examples), num_labels) float32 logits on the CPU, in the examples' order. Under torchrun each
    process computes every world-th batch of batch_size and all of them get all the logits: whole batches, not
    every world-th sentence, so that each sentence is padded and computed in the same batch as on one process,
    and float32 logits are bit for bit those of one process (sentences batched otherwise differed by up to 9e-8:
    another padding and matrix shape, another rounding)."""
    rank, world = distributed()
    if world > 1:
        import torch.distributed as dist
        starts = range(0, len(examples), batch_size)
        shares = [[i for s in starts[r::world] for i in range(s, min(s + batch_size, len(examples)))]
                  for r in range(world)]
        mine = local_logits(model, examples.subset(shares[rank]), device, batch_size, amp_dtype, desc,
                            progress and rank == 0) if shares[rank] else None
        parts = [None] * world
        dist.all_gather_object(parts, mine)
        out = torch.empty(len(examples), next(p for p in parts if p is not None).shape[1])
        for share, part in zip(shares, parts):
            if part is not None:
                out[share] = part
        return out
    return local_logits(model, examples, device, batch_size, amp_dtype, desc, progress)


@torch.no_grad()
def local_logits(model, examples, device, batch_size=128, amp_dtype=None, desc="eval", progress=True):
    model.eval()
    out = []
    for batch in progress_bar(examples.batches(batch_size), math.ceil(len(examples) / batch_size), desc,
                              disable=not progress):
        with autocast(device, amp_dtype):
            logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        out.append(logits.float().cpu())
    return torch.cat(out)


def evaluate(model, examples, device, batch_size=128, amp_dtype=None, desc="eval"):
    logits = predict_logits(model, examples, device, batch_size, amp_dtype, desc)
    return {"loss": float(F.cross_entropy(logits, examples.labels)),
            **classification_metrics(logits.argmax(-1), examples.labels)}


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def trainable_state(model):
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def rng_states(device):
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)  # dropout on a GPU draws from the GPU's generator
    return states


def set_rng_states(states, device):
    torch.set_rng_state(states["cpu"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def gather_rng(device):
    """rng_states of this process; under torchrun {"ranks": [one per rank]}, so that --resume gives each
    process back its own dropout stream."""
    rank, world = distributed()
    if world == 1:
        return rng_states(device)
    import torch.distributed as dist
    states = [None] * world
    dist.all_gather_object(states, rng_states(device))
    return {"ranks": states}


def rank_rng(saved, rank, world):
    """This rank's state from gather_rng's record (one written with as many processes, or a one-process one)."""
    if "ranks" not in saved:
        return saved
    ranks = saved["ranks"]
    if len(ranks) != world:
        print(f"note: --resume with {world} processes from a run of {len(ranks)}: the dropout draws differ from an "
              f"uninterrupted run (the rest does not)")
    return ranks[rank % len(ranks)]


def all_reduce_sum(values, device):
    """The sums over every process of a list of numbers (float64, so that counts stay exact)."""
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def data_parallel(model, device, params):
    """model under DistributedDataParallel, which all-reduces the gradients of the trainable parameters only
    (the frozen base never crosses the network). Every process loaded the same base and seeded the same
    adapter, so nothing is broadcast at the start (init_sync off) but the trainable parameters, to be sure."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   init_sync=False, forward_sync_buffers=False)


def fit(model, train, dev, cfg, device, out_dir, loss_fn=ce_loss, amp_dtype=None, resume=False,
        on_epoch_end=None, on_best=None, stop_after_epoch=None, run_settings=None):
    """Train the parameters of `model` that require grad (under autocast to amp_dtype, if given: the frozen
    base layers of the adapters are then kept in amp_dtype); after each epoch evaluate on dev, append
    the epoch's metrics to out_dir/metrics.jsonl, call on_epoch_end(history) (plots), call
    on_best(model, metrics) when dev MCC improves (save the adapter), and save out_dir/last.pt, from
    which resume=True continues with exactly the numbers an uninterrupted run gives. run_settings (a
    JSON-able dict: model, adapter, data) must then equal the interrupted run's, like cfg.
    Returns the history: one dict of metrics per epoch."""
    out_dir = Path(out_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing to train: every parameter is frozen"
    if amp_dtype is not None:
        cast_frozen_linears(model, amp_dtype)  # once, instead of autocast's cast at every step: the same products
    rank, world = distributed()
    main = rank == 0  # rank 0 alone prints and writes files; every rank holds the same parameters and history
    engine = data_parallel(model, device, params) if world > 1 else model
    # Weight decay on matrices only; biases, layer norms and IA3 vectors are left alone.
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_ratio * total)

    def lr_lambda(step):  # linear warm-up, then linear decay to zero
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    history, start_epoch, best_mcc = [], 0, -float("inf")

    ckpt_path = out_dir / "last.pt"
    if resume and ckpt_path.is_file():
        from utils import UserError
        try:  # weights_only: tensors, numbers, strings, lists and dicts, never objects that run code on loading
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            # A setting added since the checkpoint was written has its default there.
            before = {"config": {**asdict(TrainConfig()), **ckpt["config"]}, "settings": ckpt.get("settings"), "n_train": ckpt.get("n_train"),
                      "shapes": {n: tuple(t.shape) for n, t in ckpt["trainable"].items()}}
        except Exception as e:
            raise UserError(f"--resume: {ckpt_path} is not a resume checkpoint that can be read safely "
                            f"({type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}). "
                            f"A resume checkpoint holds only tensors, numbers, strings, lists and dicts; this one is "
                            f"damaged or holds other objects, which could run code when loaded. Delete it to start "
                            f"afresh.")
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
        now = {"config": asdict(cfg), "settings": run_settings, "n_train": len(train), "shapes": shapes}
        differ = [k for k in now if now[k] != before[k]]
        if differ:
            raise UserError(f"--resume: {ckpt_path} was written by a run with other settings (they differ in: "
                            f"{', '.join(differ)}); rerun with the same flags as the interrupted run, or delete "
                            f"{ckpt_path} to start afresh.")
        model.load_state_dict(ckpt["trainable"], strict=False)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_states(rank_rng(ckpt["rng"], rank, world), device)
        history, start_epoch, best_mcc = ckpt["history"], ckpt["epoch"] + 1, ckpt["best_mcc"]
        print(f"resumed from {ckpt_path} after epoch {start_epoch} of {cfg.epochs}")
    elif resume:
        print(f"--resume: no checkpoint at {ckpt_path}; starting from epoch 1")

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0, seen, loss_sum, labelled, correct = time.time(), 0, 0.0, 0, 0
        bar = progress_bar(train.batches(cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch,
                                         group_by_length=cfg.group_by_length, shard=(rank, world)),
                           steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", disable=not main)
        for batch in bar:
            dummy = bool(batch.pop("dummy", False))  # this process's part of a short last batch is empty
            batch = to_device(batch, device)
            with autocast(device, amp_dtype):
                logits = engine(batch["input_ids"], batch["attention_mask"])
            loss = loss_fn(logits, batch) * (0.0 if dummy else 1.0)
            optimizer.zero_grad(set_to_none=True)
            # DDP averages the processes' gradients, and each process's loss is already its share of the
            # whole batch's (the losses divide by the whole batch's size): times world undoes the averaging.
            scaler.scale(loss * world if world > 1 else loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if dummy:
                continue
            n = len(batch["labels"])
            seen += n
            loss_sum += loss.item() * int(batch.get("n_total", n))  # summed over the processes: the batch's loss
            has_label = batch["labels"] != IGNORE  # transfer-set sentences count in the loss, not the accuracy
            labelled += int(has_label.sum())
            correct += int((logits.argmax(-1) == batch["labels"])[has_label].sum())
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / max(1, labelled):.3f}")
        if world > 1:  # the epoch's figures over all processes
            seen, loss_sum, labelled, correct = all_reduce_sum([seen, loss_sum, labelled, correct], device)
            seen, labelled, correct = int(seen), int(labelled), int(correct)
        train_time = time.time() - t0
        rng = rng_states(device)  # evaluation must not move the training's random stream
        dev_metrics = evaluate(model, dev, device, cfg.eval_batch_size, amp_dtype=amp_dtype)
        set_rng_states(rng, device)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / max(1, labelled),
               "dev_loss": dev_metrics["loss"], "dev_acc": dev_metrics["acc"], "dev_mcc": dev_metrics["mcc"],
               "lr": scheduler.get_last_lr()[0], "train_sentences_per_s": seen / train_time,
               "train_seconds": train_time}
        history.append(row)
        rng = gather_rng(device)  # every process's random state (a collective: all ranks take part)
        best = row["dev_mcc"] > best_mcc  # the same on every rank: the dev logits were gathered
        best_mcc = max(best_mcc, row["dev_mcc"])
        if main:
            print(f"epoch {epoch + 1}/{cfg.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  |  "
                  f"dev loss {row['dev_loss']:.4f} acc {row['dev_acc']:.4f} MCC {row['dev_mcc']:.4f}  |  "
                  f"{row['train_sentences_per_s']:.1f} sent/s", flush=True)
            if best and on_best:
                on_best(model, row)
            write_metrics(out_dir / "metrics.jsonl", history)
            if on_epoch_end:
                on_epoch_end(history)
            state = {"epoch": epoch, "trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng,
                     "history": history, "best_mcc": best_mcc, "config": asdict(cfg), "settings": run_settings,
                     "n_train": len(train)}
            atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break  # tests use this to stand for a run killed between epochs
    return history


def print_config(args):
    print("configuration: " + ", ".join(f"{k}={v}" for k, v in vars(args).items() if k != "command"), flush=True)


def train_run(args, name, model, train, dev, majority, out_dir, save_best, run_settings, title, device, amp,
              loss_fn=None, seed=None):
    """What every training mode shares once its model, data and loss exist: the optimiser settings from
    the flags, fit() with the best checkpoint saved by save_best(model, row) (which returns what to say),
    plots redrawn every epoch, and the closing summary. Returns the history."""
    seed = args.SR if seed is None else seed
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay,
                      warmup_ratio=args.warmup_ratio, grad_clip=args.grad_clip, seed=seed,
                      group_by_length=args.group_by_length)
    prefix = Path(args.plots_dir) / name
    t0 = time.time()
    history = fit(model, train, dev, cfg, device, out_dir, loss_fn=loss_fn or ce_loss, amp_dtype=amp,
                  resume=args.resume, on_best=lambda m, row: print(save_best(m, row)),
                  on_epoch_end=lambda h: write_plots(h, prefix, title, baseline_acc=majority),
                  run_settings=run_settings,
                  # For the tests: end the run after that epoch, as a run killed then would leave it.
                  stop_after_epoch=int(os.environ.get("RUN_PY_STOP_AFTER_EPOCH", "0")) or None)
    best = max(history, key=lambda r: r["dev_mcc"])
    print(f"done in {time.time() - t0:.0f} s. Best epoch {best['epoch']}: dev accuracy {best['dev_acc']:.4f}, "
          f"MCC {best['dev_mcc']:.4f} (majority baseline {majority:.4f}, MCC 0). Saved: {out_dir}/; plots: "
          f"{prefix}_loss.png, {prefix}_acc.png; metrics: {out_dir}/metrics.jsonl", flush=True)
    return history


def write_metrics(path, history):
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in history)))


# --------------------------------------------------------------------------- plots

def epoch_axis(ax):
    """An x axis of whole epochs. MaxNLocator keeps to integers only where it finds two in view, so a
    one-epoch run's axis read 0.945 ... 1.050: one integer tick is enough."""
    from matplotlib.ticker import MaxNLocator
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


DPI = 110  # of the PNGs, and of the figures: a title is measured as it will be drawn (figure_title)


def figure_title(fig, title, fontsize=10, margin=0.03):
    """The figure's title, centred and wrapped to the figure's width: a run's title (its settings) can be
    longer than a plot is wide. Lines break at spaces; a word wider than the figure (a long file name)
    breaks where it must."""
    text = fig.suptitle(title, fontsize=fontsize)
    renderer, width = fig.canvas.get_renderer(), fig.bbox.width * (1 - 2 * margin)

    def fits(line):
        text.set_text(line)
        return text.get_window_extent(renderer).width <= width

    lines, line = [], ""
    for word in title.split():
        if fits(f"{line} {word}" if line else word):
            line = f"{line} {word}" if line else word
            continue
        if line:
            lines.append(line)
        while not fits(word):
            n = 1
            while n < len(word) and fits(word[:n + 1]):
                n += 1
            lines.append(word[:n])
            word = word[n:]
        line = word
    text.set_text("\n".join([*lines, line]))
    return text


def write_plots(history, prefix, title, baseline_acc=None):
    """prefix_loss.png (train/dev loss) and prefix_acc.png (train/dev accuracy and dev MCC), rewritten
    after every epoch so a user can watch them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    paths = []
    for kind, series in (("loss", [("train_loss", "train loss"), ("dev_loss", "dev loss")]),
                         ("acc", [("train_acc", "train accuracy"), ("dev_acc", "dev accuracy"),
                                  ("dev_mcc", "dev MCC")])):
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=DPI)
        for key, label in series:
            ax.plot(epochs, [r[key] for r in history], marker="o", label=label)
        if kind == "acc" and baseline_acc is not None:
            ax.axhline(baseline_acc, color="grey", linestyle="--", label=f"majority class ({baseline_acc:.3f})")
        epoch_axis(ax)
        ax.set_ylabel("loss" if kind == "loss" else "accuracy / MCC")
        figure_title(fig, title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = Path(f"{prefix}_{kind}.png")
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI))
        plt.close(fig)
        paths.append(path)
    return paths


def sample_std(values):
    """The sample standard deviation of the values given (None left out); 0 for fewer than two."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return 0.0
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def mean_std(values, fmt="{:.4f}"):
    """'m' for one value, 'm ± s' (sample std) for several, 'n/a' for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    m = sum(values) / len(values)
    if len(values) == 1:
        return fmt.format(m)
    return f"{fmt.format(m)} ± {fmt.format(sample_std(values))}"


def markdown_table(columns, cells):
    """The lines of a markdown table; integers get thousands separators."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(f"{v:,}" if isinstance(v, int) else str(v) for v in row) + " |" for row in cells)]


def comparison_table(rows):
    """(columns, cells) of the teacher / KD student / scratch student table (see write_comparison)."""
    columns = ["model", "parameters", "dev accuracy", "dev MCC", "training time (s)", "inference (sentences/s)",
               "seeds"]
    return columns, [[r["name"], f"{r['params'] / 1e6:.2f}M", mean_std(r["acc"]), mean_std(r["mcc"]),
                      mean_std(r["train_seconds"], "{:.0f}"), mean_std(r["sentences_per_s"], "{:.0f}"),
                      len(r["acc"])] for r in rows]


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def frontier_table(rows):
    """(columns, cells) of the speed/accuracy frontier: every model of a comparison (write_comparison's rows,
    the teacher's first) from the fastest to the slowest, each with what it keeps of the teacher's MCC and how
    much smaller and faster than the teacher it is."""
    teacher = rows[0]
    t_mcc, t_speed = mean(teacher["mcc"]), mean(teacher["sentences_per_s"])
    columns = ["model", "parameters", "x smaller", "inference (sentences/s)", "x faster", "dev MCC",
               "of the teacher's MCC", "seeds"]
    cells = []
    for r in sorted(rows, key=lambda r: -(mean(r["sentences_per_s"]) or 0)):
        speed, mcc = mean(r["sentences_per_s"]), mean(r["mcc"])
        cells.append([r["name"], f"{r['params'] / 1e6:.2f}M", f"{teacher['params'] / r['params']:.1f}",
                      mean_std(r["sentences_per_s"], "{:.0f}"),
                      f"{speed / t_speed:.1f}" if speed and t_speed else "n/a", mean_std(r["mcc"]),
                      f"{100 * mcc / t_mcc:.0f}%" if mcc is not None and t_mcc else "n/a", len(r["mcc"])])
    return columns, cells


def write_frontier(path, rows, title):
    """The speed/accuracy frontier as a picture: dev MCC (mean, ± std over the seeds as error bars) against
    inference sentences/s on a log axis, one point per model of the comparison, its area growing with the
    parameters; each point named with its parameters."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=DPI)
    biggest = max(r["params"] for r in rows)
    for r in rows:
        speed, mcc = mean(r["sentences_per_s"]), mean(r["mcc"])
        if speed is None or mcc is None:
            continue
        std = sample_std(r["mcc"])
        marker = "*" if r.get("teacher") else ("o" if r.get("mode") == "distil" else "s")
        ax.errorbar(speed, mcc, yerr=std, fmt=marker, markersize=6 + 14 * (r["params"] / biggest) ** 0.5,
                    capsize=3, label=r["name"], alpha=0.8)
        ax.annotate(f"{r['params'] / 1e6:.1f}M", (speed, mcc), textcoords="offset points", xytext=(8, -12),
                    fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("inference speed (sentences/s, log scale)")
    ax.set_ylabel("dev MCC (best epoch; mean ± std over seeds)")
    ax.axhline(0.0, color="grey", linestyle="--", linewidth=0.8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    figure_title(fig, title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI))
    plt.close(fig)
    return Path(path)


def sweep_table(rows):
    """(columns, cells) of the sweep table (see write_sweep)."""
    columns = ["name", "method", "targets", "r", "alpha", "dropout", "trainable", "trainable %", "dev accuracy",
               "dev MCC", "best epoch", "epoch time (s)", "adapter (KB)"]
    return columns, [[r["name"], r["method"], r["targets"], r["r"], r["alpha"], r["dropout"], r["trainable"],
                      f"{100 * r['trainable'] / r['total']:.3f}", f"{r['acc']:.4f}", f"{r['mcc']:.4f}",
                      r["best_epoch"], f"{r['epoch_seconds']:.1f}", f"{r['adapter_kb']:.1f}"] for r in rows]


def write_comparison(prefix, rows, baseline_acc, title):
    """prefix.md, a table (one row per model: parameters, best dev accuracy and MCC, training time,
    inference speed; mean ± std over seeds), and prefix.png, dev accuracy and MCC per epoch side by side.
    rows: dicts with name, params, acc, mcc, train_seconds, sentences_per_s (lists, one entry per seed)
    and history (the first seed's metrics, for the curves)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [f"# {title}", "",
             f"Best epoch (by dev MCC) of each run; the majority class scores accuracy {baseline_acc:.4f}, MCC 0.",
             "", *markdown_table(*comparison_table(rows)), "", "## Speed/accuracy frontier", "",
             "Fastest first; speeds as each run recorded them (the teacher's from its logit pass, a student's on the "
             "dev set, both in batches of one length), on the machine that ran it. `python bench.py distil "
             "--distil-teacher DIR --distil-student DIR` times a pair in turns on one machine.", "",
             *markdown_table(*frontier_table(rows))]
    atomic_write(f"{prefix}.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=DPI)
    for ax, key, label in ((axes[0], "dev_acc", "dev accuracy"), (axes[1], "dev_mcc", "dev MCC")):
        for r in rows:
            ax.plot([h["epoch"] for h in r["history"]], [h[key] for h in r["history"]], marker="o", label=r["name"])
        if key == "dev_acc":
            ax.axhline(baseline_acc, color="grey", linestyle="--", label=f"majority class ({baseline_acc:.3f})")
        else:
            ax.axhline(0.0, color="grey", linestyle="--", label="majority class (MCC 0)")
        epoch_axis(ax)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure_title(fig, title)
    fig.tight_layout()
    atomic_write(f"{prefix}.png", lambda tmp: fig.savefig(tmp, dpi=DPI))
    plt.close(fig)
    return Path(f"{prefix}.md"), Path(f"{prefix}.png")


def write_sweep(prefix, rows, title):
    """prefix.md and prefix.csv (one row per configuration: method, targets, r, alpha, dropout, trainable
    parameters and share, best dev accuracy and MCC, mean epoch time, adapter size on disk) and prefix.png
    (every configuration's dev accuracy per epoch)."""
    import csv
    import io
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns, table = sweep_table(rows)
    lines = [f"# {title}", "", "Best epoch (by dev MCC) of each configuration.", "", *markdown_table(columns, table)]
    atomic_write(f"{prefix}.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    buffer = io.StringIO()
    csv.writer(buffer).writerows([columns, *table])
    atomic_write(f"{prefix}.csv", lambda tmp: Path(tmp).write_text(buffer.getvalue()))

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=DPI)
    for r in rows:
        ax.plot([h["epoch"] for h in r["history"]], [h["dev_acc"] for h in r["history"]], marker="o", label=r["name"])
    epoch_axis(ax)
    ax.set_ylabel("dev accuracy")
    figure_title(fig, title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(f"{prefix}.png", lambda tmp: fig.savefig(tmp, dpi=DPI))
    plt.close(fig)
    return Path(f"{prefix}.md"), Path(f"{prefix}.csv"), Path(f"{prefix}.png")
