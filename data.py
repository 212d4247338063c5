"""Data sets: CoLA's raw files (or the hub's copy), the transfer set of distillation (augmented
sentences), and batching into dynamically padded batches."""
import random
from pathlib import Path

import torch

from utils import UserError

# --------------------------------------------------------------------------- CoLA

COLA_FILES = {"train": "in_domain_train.tsv", "in_domain": "in_domain_dev.tsv",
              "out_of_domain": "out_of_domain_dev.tsv"}


def read_cola_tsv(path, skip_bad_rows=False):
    """The official raw CoLA format: source TAB label TAB original-mark TAB sentence, no header.
    Returns (sentences, labels, number of skipped rows). A bad row is an error naming file and line,
    or, with skip_bad_rows, skipped and counted."""
    sentences, labels, skipped = [], [], 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            problem = None
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                problem = "bytes that are not UTF-8"
            if problem is None:
                if not line.strip():
                    continue  # blank lines (a trailing newline) are not rows
                cols = line.split("\t")
                if len(cols) != 4:
                    problem = f"{len(cols)} tab-separated columns instead of 4"
                elif cols[1] not in ("0", "1"):
                    problem = f"label {cols[1]!r} is not 0 or 1"
                elif not cols[3].strip():
                    problem = "an empty sentence"
            if problem:
                if not skip_bad_rows:
                    raise UserError(f"{path}, line {lineno}: {problem}. CoLA rows are 'source<TAB>label<TAB>"
                                    f"mark<TAB>sentence' with label 0 or 1; fix the row or pass --skip-bad-rows "
                                    f"to skip such rows (they are counted).")
                skipped += 1
                continue
            sentences.append(cols[3].strip())
            labels.append(int(cols[1]))
    return sentences, labels, skipped


def cola_dir(data_dir):
    """Accept the raw/ directory itself or the CoLA release root that holds raw/."""
    d = Path(data_dir).expanduser()
    if not (d / COLA_FILES["train"]).is_file() and (d / "raw" / COLA_FILES["train"]).is_file():
        d = d / "raw"
    return d


def load_cola(data_dir, eval_split="in_domain", skip_bad_rows=False):
    """{'train': (sentences, labels), 'dev': (sentences, labels)} from the raw files in data_dir,
    or, when data_dir holds none, from the hub (GLUE's CoLA, whose validation is both dev sets)."""
    d = cola_dir(data_dir)
    if (d / COLA_FILES["train"]).is_file():
        splits = {"train": ["train"], "dev": ["in_domain", "out_of_domain"] if eval_split == "both" else [eval_split]}
        out = {}
        for split, parts in splits.items():
            sents, labels = [], []
            for part in parts:
                path = d / COLA_FILES[part]
                if not path.is_file():
                    raise UserError(f"--eval-split {eval_split} needs {path}, which does not exist. CoLA's raw "
                                    f"release has in_domain_dev.tsv and out_of_domain_dev.tsv; pick a split "
                                    f"whose file is there.")
                s, l, skipped = read_cola_tsv(path, skip_bad_rows)
                if skipped:
                    print(f"skipped {skipped} bad rows in {path}")
                sents += s
                labels += l
            if not sents:
                raise UserError(f"no sentences in {', '.join(COLA_FILES[p] for p in parts)} under {d}.")
            out[split] = (sents, labels)
        return out
    hint = ("; the hub's GLUE validation set is both dev sets together, so also pass --eval-split both"
            if eval_split != "both" else "")
    try:
        import datasets
        datasets.logging.set_verbosity_error()
        ds = datasets.load_dataset("nyu-mll/glue", "cola")
    except Exception as e:
        raise UserError(f"no CoLA data: {d} does not hold {COLA_FILES['train']}, and the hub copy "
                        f"(datasets.load_dataset('nyu-mll/glue', 'cola')) could not be loaded "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}). Put the raw "
                        f"CoLA files (in_domain_train.tsv, in_domain_dev.tsv) in data/cola or pass "
                        f"--data-dir DIR (here: --data-dir ../shared/data/cola/raw){hint}.")
    if eval_split != "both":
        raise UserError("CoLA came from the hub, whose validation set mixes in- and out-of-domain dev "
                        "sentences: pass --eval-split both, or point --data-dir at the raw files.")
    return {"train": (list(ds["train"]["sentence"]), list(ds["train"]["label"])),
            "dev": (list(ds["validation"]["sentence"]), list(ds["validation"]["label"]))}


# --------------------------------------------------------------------------- batching

class Examples:
    """Tokenised sentences with labels (and any per-example extras, e.g. teacher logits),
    served in dynamically padded batches: each batch is padded to its own longest sentence."""

    def __init__(self, ids, labels, pad_id, **extras):
        assert len(ids) == len(labels), "one label per sentence"
        self.ids, self.labels, self.pad_id = ids, torch.tensor(labels), pad_id
        self.extras = extras

    @classmethod
    def encode(cls, tokenizer, sentences, labels, max_length, name="data"):
        ids = tokenizer(sentences, add_special_tokens=False)["input_ids"]
        cut = sum(len(x) > max_length for x in ids)
        if cut:
            print(f"{name}: {cut} of {len(ids)} sentences longer than --max-length {max_length} tokens "
                  f"were truncated")
        empty = [i for i, x in enumerate(ids) if not x]
        if empty:
            raise UserError(f"{name}: sentence {empty[0] + 1} encodes to no tokens; remove it.")
        return cls([x[:max_length] for x in ids], labels, tokenizer.pad_token_id)

    def __len__(self):
        return len(self.ids)

    def batches(self, batch_size, shuffle=False, seed=0):
        order = (torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)) if shuffle
                 else torch.arange(len(self)))
        for start in range(0, len(self), batch_size):
            idx = order[start:start + batch_size]
            seqs = [self.ids[i] for i in idx.tolist()]
            T = max(len(s) for s in seqs)
            input_ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
            for row, s in enumerate(seqs):
                input_ids[row, :len(s)] = torch.tensor(s)
                attention_mask[row, :len(s)] = 1
            batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": self.labels[idx]}
            batch.update({k: v[idx] for k, v in self.extras.items()})
            yield batch


# --------------------------------------------------------------------------- the transfer set of distillation

def augment(sentences, n, seed, mask_token, p_mask=0.1, p_swap=0.1, p_ngram=0.25, tries=10):
    """Tang et al. (2019)'s rules for a distillation transfer set: n new sentences per sentence, each
    made by masking words (each with p_mask), swapping words with another word of the sentence (each
    with p_swap), and then, with p_ngram, keeping only a random n-gram (n from 1 to 5). Copies of the
    original or of an earlier new sentence are redrawn up to `tries` times, then given up (one-word
    sentences have few variants). The new sentences have no labels: the teacher's logits are their
    targets. Same seed, same sentences."""
    rng = random.Random(seed)
    out = []
    for sentence in sentences:
        words, seen = sentence.split(), {sentence}
        for _ in range(n):
            for _ in range(tries):
                w = list(words)
                for i in range(len(w)):
                    r = rng.random()
                    if r < p_mask:
                        w[i] = mask_token
                    elif r < p_mask + p_swap:
                        j = rng.randrange(len(w))
                        w[i], w[j] = w[j], w[i]
                if len(w) > 1 and rng.random() < p_ngram:
                    k = rng.randint(1, min(5, len(w)))
                    start = rng.randrange(len(w) - k + 1)
                    w = w[start:start + k]
                new = " ".join(w)
                if new not in seen:
                    seen.add(new)
                    out.append(new)
                    break
    return out
