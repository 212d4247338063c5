"""Data sets: CoLA's raw files (or the hub's copy), IMDB, your own TSV/CSV/JSONL files, the transfer set
of distillation (augmented sentences), and batching into dynamically padded batches. Every loader returns
{'train': (texts, label ids), 'dev': (texts, label ids), 'labels': label names, 'source': where from}."""
import os
import random
import re
from pathlib import Path
from types import SimpleNamespace

import torch

from utils import UserError, quiet_library_bars

IGNORE = -100  # the label of a transfer-set sentence: it carries the teacher's soft targets only

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


# The official raw release (CoLA 1.1). The two in-domain files are checked against the SHA-256 of the
# release's own bytes; the release's zip has no published checksum, and out_of_domain_dev.tsv is checked
# by its row count (516, as the release's README says), since we have no copy of its bytes to hash.
COLA_URL = "https://nyu-mll.github.io/CoLA/cola_public_1.1.zip"
COLA_SHA256 = {"in_domain_train.tsv": "f320a10f92d3bce6b29152fde322a362eac39238e50d8de0c8815457fdf4fc12",
               "in_domain_dev.tsv": "77176f6a03faa5a1c4f23c69971fc1bff565931112fb65af47b2d6e24b7f42f7"}
COLA_ROWS = {"in_domain_train.tsv": 8551, "in_domain_dev.tsv": 527, "out_of_domain_dev.tsv": 516}


def cola_candidates(data_dir=None):
    """Where the raw files are looked for, in order: --data-dir, $COLA_DIR, data/cola (raw/ or the release
    root), data/ (the course template's layout). Relative paths are from the current directory."""
    places = [("--data-dir", data_dir), ("$COLA_DIR", os.environ.get("COLA_DIR") or None),
              ("data/cola", "data/cola"), ("data/", "data")]
    return [(name, Path(d).expanduser()) for name, d in places if d]


def offline():
    return next((v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
                 if os.environ.get(v, "0") not in ("0", "", "false")), None)


def download(url, path, timeout=30):
    """The network boundary (tests replace this one function): the bytes at url, into path."""
    import shutil
    import urllib.request
    with urllib.request.urlopen(url, timeout=timeout) as response, open(path, "wb") as f:
        shutil.copyfileobj(response, f)


def fetch_cola(dest):
    """Download the official release, check its files, and put its raw/ files into dest/raw/. Returns
    dest/raw. Raises UserError when the download is not the release (nothing is unpacked then) and OSError
    or URLError when the network fails."""
    import hashlib
    import tempfile
    import zipfile
    from utils import atomic_write
    with tempfile.TemporaryDirectory(prefix="cola-download-") as tmp:  # nothing lands in dest unless checked
        archive = Path(tmp) / "cola_public_1.1.zip"
        download(COLA_URL, archive)
        problems, found = [], {}
        try:
            with zipfile.ZipFile(archive) as z:
                for member in z.namelist():  # the members' own paths are never used: no zip-slip
                    parent, _, name = member.rpartition("/")
                    if name in COLA_ROWS and parent.endswith("raw"):
                        found[name] = z.read(member)
        except zipfile.BadZipFile as e:
            problems.append(f"it is not a zip file ({e})")
    for name, rows in COLA_ROWS.items():
        data = found.get(name)
        digest = hashlib.sha256(data).hexdigest() if data is not None else None
        n = sum(1 for line in data.splitlines() if line.strip()) if data is not None else 0
        if data is None:
            problems.append(f"raw/{name} is missing")
        elif name in COLA_SHA256 and digest != COLA_SHA256[name]:
            problems.append(f"raw/{name} has SHA-256 {digest[:16]}..., the release's is {COLA_SHA256[name][:16]}...")
        elif n != rows:
            problems.append(f"raw/{name} has {n} rows, the release's has {rows}")
    if problems:
        raise UserError(f"the download from {COLA_URL} is not the CoLA 1.1 release ({'; '.join(problems)}); "
                        f"nothing was unpacked. Download and unzip it by hand and pass --data-dir "
                        f"path/to/cola_public/raw.")
    raw = Path(dest) / "raw"
    # Each file lands whole; the training file last, as it is what marks the directory as complete.
    for name in sorted(COLA_ROWS, key=lambda n: n == COLA_FILES["train"]):
        atomic_write(raw / name, lambda tmp, data=found[name]: Path(tmp).write_bytes(data))
    return raw


def find_cola(data_dir=None):
    """(directory of the raw files, how it was found), fetching the official release into --data-dir,
    $COLA_DIR or data/cola when no candidate holds it; (None, why not) when that fails too."""
    candidates = cola_candidates(data_dir)
    for name, d in candidates:
        if (cola_dir(d) / COLA_FILES["train"]).is_file():
            skipped = [f"{n} {p}" for n, p in candidates[:candidates.index((name, d))] if n.startswith(("-", "$"))]
            if skipped:
                print(f"note: {', '.join(skipped)} holds no {COLA_FILES['train']}; using {name}")
            return cola_dir(d), f"{name}: {cola_dir(d)}"
    looked = ", ".join(f"{n} {p}" if n.startswith(("-", "$")) else n for n, p in candidates)
    if offline():
        return None, f"looked in {looked}; no download, as {offline()} is set"
    dest = candidates[0][1]
    print(f"CoLA: no raw files in {looked}; downloading the official release {COLA_URL} into {dest}/raw ...",
          flush=True)
    try:
        raw = fetch_cola(dest)
    except UserError:
        raise
    except Exception as e:  # URLError, timeouts, refused connections, a broken transfer or zip, an unwritable dest
        return None, (f"looked in {looked}; the official release could not be downloaded from {COLA_URL} and "
                      f"unpacked into {dest}/raw ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
    print(f"CoLA: downloaded, checked (SHA-256 of the in-domain files, row counts) and unpacked into {raw}")
    return raw, f"downloaded: {raw}"


def load_cola(data_dir=None, eval_split="in_domain", skip_bad_rows=False):
    """{'train': (sentences, labels), 'dev': (sentences, labels), 'source': where they came from,
    'eval_split': the dev split used}. The raw files are found (or fetched) by find_cola; when there are
    none, the hub's GLUE copy, whose validation set is both dev sets (so eval_split becomes 'both')."""
    d, source = find_cola(data_dir)
    if d is not None:
        splits = {"train": ["train"], "dev": ["in_domain", "out_of_domain"] if eval_split == "both" else [eval_split]}
        out = {"source": source, "eval_split": eval_split}
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
    try:
        import datasets
        datasets.logging.set_verbosity_error()
        quiet_library_bars()
        ds = datasets.load_dataset("nyu-mll/glue", "cola")
    except Exception as e:
        raise UserError(f"no CoLA data: {source}, and the hub copy (datasets.load_dataset('nyu-mll/glue', "
                        f"'cola')) could not be loaded ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else ''}). Put the raw CoLA files "
                        f"(in_domain_train.tsv, in_domain_dev.tsv) in data/cola or pass --data-dir DIR "
                        f"(here: --data-dir ../shared/data/cola/raw).")
    if eval_split != "both":
        print(f"CoLA: using the hub's GLUE copy (nyu-mll/glue, cola), whose validation set holds the in- and "
              f"out-of-domain dev sentences together: --eval-split is both, not {eval_split}")
    return {"train": (list(ds["train"]["sentence"]), list(ds["train"]["label"])),
            "dev": (list(ds["validation"]["sentence"]), list(ds["validation"]["label"])),
            "source": "the hub (nyu-mll/glue, cola)", "eval_split": "both"}


# --------------------------------------------------------------------------- IMDB and your own files

IMDB_LABELS = ["negative", "positive"]
IMDB_SAMPLE = "imdb_labelled.txt"  # the offline sample's name: sentence TAB label (0/1), no header


def read_table(path, text_column="text", label_column="label", skip_bad_rows=False):
    """(texts, raw label strings, skipped rows) from a .tsv/.txt (tab-separated), .csv or .jsonl file. TSV
    and CSV: a header row that names text_column and label_column, or no header and two columns, text
    then label. A bad row is an error naming file and line, or skipped and counted with skip_bad_rows."""
    import csv
    import io
    import json
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: no such file. Give a .tsv, .csv or .jsonl file with a text and a label column.")
    kind = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}.get(path.suffix.lower(), "tsv")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e}); save it as UTF-8.")
    rows = []  # (line number, text, label, what is wrong)
    if kind == "jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                    assert isinstance(obj, dict)
                    rows.append((lineno, obj.get(text_column), obj.get(label_column), None))
                except (ValueError, AssertionError):
                    rows.append((lineno, None, None, "not a JSON object"))
    else:
        parsed = list(csv.reader(io.StringIO(text), delimiter="," if kind == "csv" else "\t",
                                 quoting=csv.QUOTE_MINIMAL if kind == "csv" else csv.QUOTE_NONE))
        header = parsed[0] if parsed else []
        if text_column in header and label_column in header:
            t, l, width, body = header.index(text_column), header.index(label_column), len(header), parsed[1:]
        else:  # no header: text, label
            t, l, width, body = 0, 1, 2, parsed
            others = {r[1].strip() for r in parsed[1:] if len(r) == 2}
            numeric = lambda v: v.lstrip("-").isdigit()
            if len(header) == 2 and others and all(map(numeric, others)) and not numeric(header[1].strip()):
                raise UserError(f"{path}, line 1: {header!r} looks like a header, but it names neither --text-column "
                                f"{text_column} nor --label-column {label_column}: pass the names of the text and "
                                f"label columns (e.g. --text-column {header[0]} --label-column {header[1]}).")
        for lineno, r in enumerate(body, len(parsed) - len(body) + 1):
            if any(x.strip() for x in r):
                rows.append((lineno, r[t], r[l], None) if len(r) == width else
                            (lineno, None, None, f"{len(r)} columns instead of {width}"))
    texts, labels, skipped = [], [], 0
    for lineno, t, l, problem in rows:
        if problem is None and (not isinstance(t, str) or not t.strip()):
            problem = f"no text (column {text_column!r})"
        elif problem is None and (l is None or not str(l).strip()):
            problem = f"no label (column {label_column!r})"
        if problem:
            if not skip_bad_rows:
                raise UserError(f"{path}, line {lineno}: {problem}. Rows need a text and a label: a header row "
                                f"naming --text-column ({text_column}) and --label-column ({label_column}), or two "
                                f"columns, text then label, without a header. Fix the row or pass --skip-bad-rows.")
            skipped += 1
            continue
        texts.append(t.strip())
        labels.append(str(l).strip())
    if not texts:
        raise UserError(f"{path}: no rows with a text and a label.")
    return texts, labels, skipped


def label_names(raw):
    """The classes of raw label strings, in order: numerically when all are integers (0, 1, 2 ...)."""
    values = set(raw)
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return sorted(values)


def split_off(texts, labels, share, seed):
    """Hold out a seeded share of (texts, labels) as a dev set: ((train), (dev))."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_dev = max(1, round(share * len(texts)))
    dev, train = sorted(order[:n_dev]), sorted(order[n_dev:])
    pick = lambda idx: ([texts[i] for i in idx], [labels[i] for i in idx])
    return pick(train), pick(dev)


def load_files(train_file, eval_file=None, text_column="text", label_column="label", skip_bad_rows=False,
               seed=0, names=None):
    """Your own data. Without eval_file, a seeded 20% of train_file is held out as the dev set."""
    train_t, train_raw, skipped = read_table(train_file, text_column, label_column, skip_bad_rows)
    if skipped:
        print(f"skipped {skipped} bad rows in {train_file}")
    given = names is not None
    names = names or label_names(train_raw)
    unknown = sorted(set(train_raw) - set(names)) if given else []
    if unknown:
        raise UserError(f"{train_file}: labels {unknown[:5]} are not among the expected {names}; fix the file's "
                        f"labels (or pass it as --train-file, where any labels go).")
    if eval_file:
        dev_t, dev_raw, skipped = read_table(eval_file, text_column, label_column, skip_bad_rows)
        if skipped:
            print(f"skipped {skipped} bad rows in {eval_file}")
        unknown = sorted(set(dev_raw) - set(names))
        if unknown:
            raise UserError(f"{eval_file}: labels {unknown[:5]} do not occur in {train_file} (whose labels are "
                            f"{names[:10]}); a classifier can only predict the classes it was trained on.")
    if len(names) < 2:
        raise UserError(f"{train_file}: every row has the label {names[0]!r}; a classifier needs two classes or more.")
    ids = {name: i for i, name in enumerate(names)}
    train = (train_t, [ids[x] for x in train_raw])
    if eval_file:
        dev, source = (dev_t, [ids[x] for x in dev_raw]), f"{train_file} (train), {eval_file} (dev)"
    else:
        train, dev = split_off(*train, 0.2, seed)
        source = f"{train_file} (a seeded 20% held out as dev)"
    return {"train": train, "dev": dev, "labels": names, "source": source}


def load_imdb(data_dir=None, skip_bad_rows=False, seed=0):
    """IMDB sentiment: the hub's stanfordnlp/imdb (25k train, 25k test reviews), or offline a local file or
    directory holding imdb_labelled.txt (sentence TAB 0/1, e.g. ../shared/data/imdb-sentences), of which
    a seeded 20% is the dev set."""
    if data_dir:
        path = Path(data_dir).expanduser()
        path = path / IMDB_SAMPLE if path.is_dir() else path
        data = load_files(path, skip_bad_rows=skip_bad_rows, seed=seed, names=["0", "1"])
        return {**data, "labels": IMDB_LABELS}
    try:
        import datasets
        datasets.logging.set_verbosity_error()
        quiet_library_bars()
        ds = datasets.load_dataset("stanfordnlp/imdb")
    except Exception as e:
        raise UserError(f"no IMDB data: the hub copy (datasets.load_dataset('stanfordnlp/imdb')) could not be "
                        f"loaded ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}). Offline, "
                        f"pass --data-dir with a file of 'sentence<TAB>label' rows or a directory holding "
                        f"{IMDB_SAMPLE} (here: --data-dir ../shared/data/imdb-sentences), or --train-file.")
    return {"train": (list(ds["train"]["text"]), list(ds["train"]["label"])),
            "dev": (list(ds["test"]["text"]), list(ds["test"]["label"])), "labels": IMDB_LABELS,
            "source": "the hub (stanfordnlp/imdb; dev = its test split)"}


def subsample(texts, labels, size, seed):
    """A seeded random subset of `size` examples (in their original order), or all of them."""
    if not size or size >= len(texts):
        return texts, labels
    keep = sorted(random.Random(seed).sample(range(len(texts)), size))
    return [texts[i] for i in keep], [labels[i] for i in keep]


# --------------------------------------------------------------------------- batching

class Examples:
    """Tokenised sentences with labels (and any per-example extras, e.g. teacher logits),
    served in dynamically padded batches: each batch is padded to its own longest sentence."""

    def __init__(self, ids, labels, pad_id, **extras):
        assert len(ids) == len(labels), "one label per sentence"
        self.ids, self.labels, self.pad_id = ids, torch.tensor(labels), pad_id
        self.extras = extras

    @classmethod
    def encode(cls, tokenizer, sentences, labels, max_length, name="data", add_special_tokens=False):
        """add_special_tokens: the tokenizer's [CLS] ... [SEP], for encoders whose head reads [CLS]
        (a longer sentence then keeps its closing token)."""
        ids = tokenizer(sentences, add_special_tokens=add_special_tokens)["input_ids"]
        cut = sum(len(x) > max_length for x in ids)
        if cut:
            print(f"{name}: {cut} of {len(ids)} sentences longer than --max-length {max_length} tokens "
                  f"were truncated")
        empty = [i for i, x in enumerate(ids) if not x]
        if empty:
            raise UserError(f"{name}: sentence {empty[0] + 1} encodes to no tokens; remove it.")
        keep_last = add_special_tokens and max_length > 1
        ids = [x if len(x) <= max_length else x[:max_length - 1] + x[-1:] if keep_last else x[:max_length]
               for x in ids]
        return cls(ids, labels, tokenizer.pad_token_id)

    def __len__(self):
        return len(self.ids)

    def subset(self, index):
        """The examples at `index` (a list of positions), extras included."""
        return Examples([self.ids[i] for i in index], self.labels[index].tolist(), self.pad_id,
                        **{k: v[index] for k, v in self.extras.items()})

    def batches(self, batch_size, shuffle=False, seed=0, group_by_length=False, shard=(0, 1)):
        """Padded batches in order, or shuffled by seed. group_by_length (with shuffle): sentences of similar
        length share a batch, so little compute goes to padding: the shuffled order is cut into windows of
        50 batches, each window sorted by length and cut into batches, and the batches shuffled again
        (transformers' LengthGroupedSampler does the same).
        shard=(rank, world), for training on `world` processes: every process draws the same order and takes
        rows rank, rank + world, ... of each batch of batch_size, so together they see exactly the batches
        of one process. Each such part says how many sentences (n_total) and labelled sentences
        (labelled_total) its whole batch has, so that the losses can average over the whole batch; a part
        left empty (a last batch smaller than world) gets one sentence marked dummy, which counts for nothing."""
        rank, world = shard
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self), generator=g) if shuffle else torch.arange(len(self))
        if shuffle and group_by_length:
            window = 50 * batch_size
            lengths = torch.tensor([len(x) for x in self.ids])
            order = torch.cat([w[lengths[w].argsort(descending=True, stable=True)] for w in order.split(window)])
            chunks = order.split(batch_size)
            order = torch.cat([chunks[i] for i in torch.randperm(len(chunks), generator=g).tolist()])
        for start in range(0, len(self), batch_size):
            whole = order[start:start + batch_size]
            idx = whole[rank::world] if world > 1 else whole
            dummy = len(idx) == 0
            if dummy:
                idx = whole[:1]
            seqs = [self.ids[i] for i in idx.tolist()]
            T = max(len(s) for s in seqs)
            input_ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
            for row, s in enumerate(seqs):
                input_ids[row, :len(s)] = torch.tensor(s)
                attention_mask[row, :len(s)] = 1
            batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": self.labels[idx]}
            batch.update({k: v[idx] for k, v in self.extras.items()})
            if world > 1:
                batch["n_total"] = torch.tensor(len(whole))
                batch["labelled_total"] = (self.labels[whole] != IGNORE).sum()
                batch["dummy"] = torch.tensor(dummy)
            yield batch


# --------------------------------------------------------------------------- the transfer set of distillation

def augment(sentences, n, seed, mask_token=None, p_mask=0.1, p_swap=0.1, p_ngram=0.25, tries=10):
    """Tang et al. (2019)'s rules for a distillation transfer set: n new sentences per sentence, each
    made by masking words (each with p_mask), swapping words with another word of the sentence (each
    with p_swap), and then, with p_ngram, keeping only a random n-gram (n from 1 to 5). A mask is
    mask_token where the teacher's tokenizer has one (BERT's [MASK]); without one (GPT-2, SmolLM2) the
    word is replaced by a word drawn from all the sentences' words, as a teacher that never saw a mask
    token inside a sentence reads it. Copies of the original or of an earlier new sentence are redrawn
    up to `tries` times, then given up (one-word sentences have few variants). The new sentences have no
    labels: the teacher's logits are their targets. Same seed, same sentences."""
    rng = random.Random(seed)
    corpus = None if mask_token else [w for s in sentences for w in s.split()]
    out = []
    for sentence in sentences:
        words, seen = sentence.split(), {sentence}
        for _ in range(n):
            for _ in range(tries):
                w = list(words)
                for i in range(len(w)):
                    r = rng.random()
                    if r < p_mask:
                        w[i] = mask_token or rng.choice(corpus)
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


def lm_prompts(sentences, n, seed, max_words=4):
    """n prompts per sentence for --transfer-lm: its first k words, k drawn from 1 to max_words (and at most
    all but the last word), so that the language model writes the rest. A fraction n < 1: one prompt for
    each sentence with probability n (a cheaper transfer set). Same seed, same prompts."""
    rng = random.Random(seed)
    out = []
    for sentence in sentences:
        words = sentence.split()
        for _ in range(int(n) if n >= 1 else int(rng.random() < n)):
            out.append(" ".join(words[:rng.randint(1, max(1, min(max_words, len(words) - 1)))]))
    return out


SENTENCE_END = re.compile(r"[.!?]")
SENTENCE_CHARS = re.compile(r"[A-Za-z][A-Za-z ,;:'\-]*[.!?]")


def lm_sentence(prompt, continuation, min_words=3, max_words=30):
    """The first sentence of prompt + continuation when it looks like one of CoLA's (letters, spaces and
    light punctuation, 3 to 30 words, ending in . ! or ?), else None: the language model's lists, code,
    dialogue, numbers and run-ons are dropped."""
    text = prompt + continuation
    end = SENTENCE_END.search(text, len(prompt))
    if end is None:
        return None
    text = text[:end.end()].strip()
    if not SENTENCE_CHARS.fullmatch(text) or not min_words <= len(text.split()) <= max_words:
        return None
    return text


# --------------------------------------------------------------------------- the data of a training run

COLA_LABELS = ["unacceptable", "acceptable"]


def task_data(args):
    """The data of a training run (CoLA, IMDB or --train-file), read but not yet tokenised, as a namespace:
    texts and train_labels, dev_texts and dev_labels, labels (class names), name, and majority (the dev
    accuracy of always answering the most common class: MCC 0). encode_task adds train and dev."""
    if not args.train_file and (args.eval_file or args.text_column != "text" or args.label_column != "label"):
        raise UserError("--eval-file, --text-column and --label-column go with --train-file (your own data); "
                        "without it the data is --dataset's.")
    if args.train_file:
        data, name = load_files(args.train_file, args.eval_file, args.text_column, args.label_column,
                                args.skip_bad_rows, seed=args.SR), Path(args.train_file).stem
    elif args.dataset == "imdb":
        data, name = load_imdb(args.data_dir, args.skip_bad_rows, seed=args.SR), "imdb"
    else:
        data, name = load_cola(args.data_dir, args.eval_split, args.skip_bad_rows), "cola"
        data["labels"] = COLA_LABELS
        args.eval_split = data["eval_split"]  # the hub's copy has one validation set: both dev sets
    train_s, train_l = subsample(*data["train"], args.train_size, args.SR)
    if args.limit_train:
        train_s, train_l = train_s[:args.limit_train], train_l[:args.limit_train]
    dev_s, dev_l = subsample(*data["dev"], args.eval_size, args.SR + 1)
    majority = max(dev_l.count(k) for k in range(len(data["labels"]))) / len(dev_l)
    title = {"cola": "CoLA", "imdb": "IMDB"}.get(name, name)
    print(f"{title} data from {data['source']}")
    what = f"sentences ({args.eval_split})" if name == "cola" else f"examples, {len(data['labels'])} classes"
    print(f"{title}: {len(train_s)} training and {len(dev_s)} dev {what}; majority-class baseline on dev: accuracy "
          f"{majority:.4f}, MCC 0.0000")
    return SimpleNamespace(texts=train_s, train_labels=train_l, dev_texts=dev_s, dev_labels=dev_l,
                           labels=data["labels"], name=name, majority=majority)


def encode_task(task, tok, max_length, add_special_tokens=False):
    """task.train and task.dev: the texts as token ids (Examples), truncated to max_length."""
    task.train = Examples.encode(tok, task.texts, task.train_labels, max_length, "train", add_special_tokens)
    task.dev = Examples.encode(tok, task.dev_texts, task.dev_labels, max_length, "dev", add_special_tokens)
    return task
