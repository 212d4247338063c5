"""The plots as a person sees them: a long title wraps (or shrinks) inside the figure, whole; an epoch axis
reads whole epochs, a one-epoch run's included. No training here: the writers get made-up histories."""
import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.image  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from train_utils import write_comparison, write_plots, write_sweep  # noqa: E402

# As run.py titles a distil run (and longer): 7 inches of figure cannot hold it on one line.
LONG = ("distil SR=12345: biGRU x2, emb 300, hidden 300, mean pool, lr=0.002, batch=32, alpha=0.5, T=2, "
        "augment=20, init-embeddings-from-teacher, on my_own_sentences.tsv")
UNBROKEN = "sweep SR=1: gpt2, " + "a_training_file_whose_name_has_no_spaces_at_all_" * 3 + ".tsv"


def epochs(n):
    return [{"epoch": e, "train_loss": 0.7 - 0.01 * e, "dev_loss": 0.69, "train_acc": 0.6, "dev_acc": 0.65 + 0.01 * e,
             "dev_mcc": 0.1 * e, "train_seconds": 1.0} for e in range(1, n + 1)]


@pytest.fixture
def drawn(monkeypatch):
    """What every figure saved in the test shows: {"texts": [(text, its box, the figure's box)],
    "ticks": [the epoch ticks in view, per axes]}, one dict per figure."""
    figures, save = [], Figure.savefig

    def savefig(fig, *args, **kwargs):
        save(fig, *args, **kwargs)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        texts = [(t.get_text(), t.get_window_extent(renderer), fig.bbox) for t in fig.findobj(Text)
                 if t.get_visible() and t.get_text().strip()]
        ticks = [[v for v in ax.get_xticks() if min(ax.get_xlim()) <= v <= max(ax.get_xlim())] for ax in fig.axes]
        figures.append({"texts": texts, "ticks": ticks})

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures


def every_writer(tmp_path, history, title):
    """Each plot writer once, with this history and title; returns the PNG files."""
    row = {"name": "KD student (distil)", "params": 1000, "acc": [0.7], "mcc": [0.2], "train_seconds": [1.0],
           "sentences_per_s": [100.0], "history": history}
    config = {"name": "r2", "method": "LORA", "targets": "c_attn", "r": 2, "alpha": 4, "dropout": 0.1,
              "trainable": 10, "total": 1000, "acc": 0.7, "mcc": 0.2, "best_epoch": 1, "epoch_seconds": 1.0,
              "adapter_kb": 1.0, "history": history}
    return [*write_plots(history, tmp_path / "run", title, baseline_acc=0.69),
            write_comparison(tmp_path / "compare", [row, {**row, "name": "teacher"}], 0.69, title)[1],
            write_sweep(tmp_path / "sweep", [config], title)[2]]


@pytest.mark.parametrize("title", [LONG, UNBROKEN], ids=["words", "one-long-word"])
def test_a_long_title_is_shown_whole_inside_the_figure(tmp_path, drawn, title):
    pngs = every_writer(tmp_path, epochs(3), title)
    assert len(drawn) == len(pngs) == 4
    for png, fig in zip(pngs, drawn):
        shown = [(text, box, frame) for text, box, frame in fig["texts"]
                 if "".join(text.split()) == "".join(title.split())]
        assert len(shown) == 1, (png, [t for t, _, _ in fig["texts"]])  # the whole title, once (wrapped at most)
        text, box, frame = shown[0]
        assert "\n" in text and (title is UNBROKEN or text.split() == title.split()), text  # at spaces, if it can
        assert frame.x0 - 1 <= box.x0 and box.x1 <= frame.x1 + 1 and frame.y0 - 1 <= box.y0 and box.y1 <= frame.y1 + 1, \
            (png, box, frame)
        # And in the picture: no ink on the left or right edge, where a title running off the figure is cut.
        pixels = matplotlib.image.imread(png)[..., :3]
        assert pixels[:, :3].min() > 0.9 and pixels[:, -3:].min() > 0.9, png


def test_a_short_title_stays_on_one_line(tmp_path, drawn):
    every_writer(tmp_path, epochs(3), "LoRA SR=1: gpt2")
    assert all(any(text == "LoRA SR=1: gpt2" for text, _, _ in fig["texts"]) for fig in drawn)


@pytest.mark.parametrize("n", [1, 2, 7])
def test_the_epoch_axis_reads_whole_epochs(tmp_path, drawn, n):
    every_writer(tmp_path, epochs(n), "a run")
    for fig in drawn:
        for ticks in fig["ticks"]:
            assert ticks and all(float(v).is_integer() for v in ticks), ticks  # not 0.945 ... 1.050
            assert 1 in ticks or n > 2, ticks
