"""`run.py report SR` on tiny runs made here: every section, figures equal to the run files, a
self-contained HTML page, idempotence, runs named when missing, damaged files reported, clean errors."""
import json
import re
import shutil

import pytest

from conftest import COLA_DIR, needs_cola, needs_tokenizer, ok, run, run_here, together, user_error

pytestmark = [needs_tokenizer, needs_cola]
SMALL = ["--data-dir", COLA_DIR, "--limit-train", 96, "--epochs", 2]
STUDENT = [*SMALL, "--emb-dim", 16, "--hidden", 16, "--seeds", 2]


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    """LoRA 5, distil 5 and rnn 5 (two seeds each) and a two-configuration sweep, as the README runs them (the sweep,
    which needs none of the others, made at the same time as LoRA)."""
    tmp = tmp_path_factory.mktemp("report")
    models, plots = tmp / "models", tmp / "plots"
    where = ["--plots-dir", plots]
    configs = tmp / "sweep.json"
    configs.write_text(json.dumps([{"name": "r2", "r": 2}, {"name": "ia3", "peft": "ia3"}]))
    for proc in together(
            lambda: run("LoRA", 5, "--model", tiny_dir, *SMALL, "--out-dir", models / "LoRA_5", *where),
            lambda: run("sweep", 5, "--model", tiny_dir, *SMALL[:4], "--epochs", 1, "--configs", configs,
                        "--models-dir", models, *where, fresh=True)):
        ok(proc)
    ok(run("distil", 5, "--models-dir", models, *STUDENT, *where))
    ok(run("rnn", 5, "--models-dir", models, *STUDENT, *where, fresh=True))  # sweep, rnn: new interpreters
    return tmp, models, plots


def tiny_name(config):
    return config["model"].rstrip("/").split("/")[-1]


def report(tmp, models, plots, sr=5, out="reports", how=run_here):
    """`run.py report SR` into tmp/out: (process, report_SR.md, report_SR.html). The report reads runs and writes two
    files, nothing else: made in this process (run_here) unless how is run (the first test's: a fresh interpreter)."""
    proc = ok(how("report", sr, "--models-dir", models, "--plots-dir", plots, "--out-dir", tmp / out))
    return proc, (tmp / out / f"report_{sr}.md").read_text(), (tmp / out / f"report_{sr}.html").read_text()


def test_report_has_every_section_and_the_run_files_figures(runs):
    tmp, models, plots = runs
    proc, md, page = report(*runs, how=lambda *args: run(*args, fresh=True))
    assert "report: " in proc.stdout and "missing:" not in proc.stdout and "warning:" not in proc.stdout
    for heading in ("# Report: SR 5", "## Fine-tuning with adapters", "### LoRA_5",
                    "## Distillation: teacher, KD students and scratch students", "### distil_5", "### distil_6",
                    "### rnn_5", "### rnn_6", "## Sweep", "### sweep_5/r2", "### sweep_5/ia3"):
        assert f"\n{heading}\n" in f"\n{md}", heading
    assert "Missing and damaged" not in md
    # Each run's command, environment, parameters, reduction and adapter size.
    lora = json.loads((models / "LoRA_5" / "run_config.json").read_text())
    assert f"`{lora['command']}`" in md and "python run.py LoRA 5" in lora["command"]
    assert f"torch {lora['environment']['torch']}" in md and "precision float32" in md and "device cpu" in md
    assert f"| {lora['parameters']:,} | {lora['trainable_parameters']:,} |" in md
    assert "reduction)" in md and "adapter on disk" in md
    # Every epoch's figures are the ones in metrics.jsonl, to the digit.
    for run_dir in ("LoRA_5", "distil_6", "rnn_5", "sweep_5/ia3"):
        for line in (models / run_dir / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            assert f"| {row['epoch']} | {row['train_loss']:.4f} | {row['train_acc']:.4f} | {row['dev_loss']:.4f} | " \
                   f"{row['dev_acc']:.4f} | {row['dev_mcc']:.4f} |" in md, (run_dir, row)
    # The comparison: mean ± std over the two seeds of each student, and the teacher.
    mccs = [max(json.loads(line)["dev_mcc"] for line in (models / f"rnn_{s}" / "metrics.jsonl").read_text().splitlines())
            for s in (5, 6)]
    mean, std = sum(mccs) / 2, abs(mccs[0] - mccs[1]) / 2 ** 0.5
    assert re.search(rf"\| scratch student \(rnn\) \| [\d.]+M \| [\d.]+ ± [\d.]+ \| {mean:.4f} ± {std:.4f} \|", md), md
    # The teacher is the LoRA run, merged: its size is the base model's.
    assert f"| teacher: LoRA {tiny_name(lora)} | {lora['parameters'] / 1e6:.2f}M | " in md
    assert "| KD student (distil) |" in md
    # The plots, linked relative to the report.
    for name in ("LoRA_5_loss", "LoRA_5_acc", "distil_6_acc", "rnn_5_loss", "compare_5", "sweep_5"):
        assert f"](../plots/{name}.png)" in md, name
    assert "no plot at" not in md


def test_html_is_self_contained_and_the_report_idempotent(runs):
    tmp = runs[0]
    _, md, page = report(*runs)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:|\.\.?/)""", page, re.I)
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', page)
    assert len(images) == md.count("](../plots/")
    assert page.count("<table>") == sum(line.startswith("|---") for line in md.splitlines()) and "<h3>LoRA_5</h3>" in page
    before = {p.name: p.read_bytes() for p in (tmp / "reports").iterdir()}
    report(*runs)
    assert {p.name: p.read_bytes() for p in (tmp / "reports").iterdir()} == before
    assert sorted(before) == ["report_5.html", "report_5.md"]  # and no temporary files left behind


def test_missing_runs_are_named_with_the_command_that_makes_them(runs):
    tmp, models, plots = runs
    only = tmp / "only-rnn"
    shutil.copytree(models / "rnn_5", only / "rnn_5")
    shutil.copytree(models / "rnn_6", only / "rnn_6")
    proc, md, _ = report(tmp, only, plots, out="reports-rnn")
    assert "missing: LoRA: python run.py LoRA 5 writes" in proc.stdout
    assert "missing: distil: python run.py distil 5 (after LoRA) writes" in proc.stdout
    assert "## Missing and damaged" in md and "Not run: `python run.py LoRA 5`" in md
    assert "### rnn_5" in md and "### rnn_6" in md and "## Sweep" not in md


def test_damaged_metrics_are_reported_and_the_rest_still_written(runs):
    tmp, models, plots = runs
    damaged = tmp / "damaged"
    shutil.copytree(models, damaged, symlinks=True)
    metrics = damaged / "rnn_6" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text(lines[0] + "\n" + lines[1][:25] + "\n")  # a write cut off in the middle of epoch 2
    proc, md, page = report(tmp, damaged, plots, out="reports-damaged")
    assert proc.returncode == 0
    assert f"warning: {metrics} line 2 is damaged" in proc.stdout
    assert f"**Problem:** {metrics} line 2 is damaged" in md and "<strong>Problem:</strong>" in page
    first = json.loads(lines[0])
    assert f"| 1 | {first['train_loss']:.4f} |" in md  # the readable epoch is still there
    assert "### LoRA_5" in md and "## Sweep" in md  # and so is everything else
    (damaged / "LoRA_5" / "run_config.json").write_text("{not json")
    proc, md, _ = report(tmp, damaged, plots, out="reports-damaged")
    assert "LoRA_5/run_config.json is damaged" in md and "### rnn_5" in md


def test_no_runs_is_a_clean_error_and_writes_nothing(runs, tmp_path):
    tmp, models, plots = runs
    err = user_error(run_here("report", 99, "--models-dir", models, "--plots-dir", plots, "--out-dir", tmp_path / "r"))
    assert "no runs of SR 99" in err and "python run.py LoRA 99" in err
    assert not (tmp_path / "r").exists()


def test_missing_and_damaged_is_a_list_on_the_page(runs):
    tmp, models, plots = runs
    only = tmp / "only-rnn-list"
    for seed in (5, 6):
        shutil.copytree(models / f"rnn_{seed}", only / f"rnn_{seed}")
    _, md, page = report(tmp, only, plots, out="reports-list")
    section = md.split("## Missing and damaged\n", 1)[1]
    assert "\n- LoRA: `python run.py LoRA 5` writes" in f"\n{section}"  # a markdown list
    assert "\n\n- " not in section.strip()  # one list, not paragraphs each starting with a dash
    html_section = page.split("<h2>Missing and damaged</h2>", 1)[1]
    assert html_section.lstrip().startswith("<ul>") and "<li>LoRA: <code>python run.py LoRA 5</code> writes" in page
    assert "<p>- " not in page and ">- " not in page


def test_a_damaged_line_leaves_the_comparison_table_showing_what_can_be_read(runs):
    tmp, models, plots = runs
    damaged = tmp / "damaged-student"
    shutil.copytree(models, damaged, symlinks=True)
    metrics = damaged / "distil_5" / "metrics.jsonl"  # the first seed: the one the comparison starts from
    lines = metrics.read_text().splitlines()
    metrics.write_text(lines[0] + "\n" + lines[1][:25] + "\n")  # a write cut off in the middle of epoch 2
    proc, md, page = report(tmp, damaged, plots, out="reports-damaged-student")
    assert f"warning: {metrics} line 2 is damaged" in proc.stdout
    # The table, from the epochs that can be read: distil_5's first epoch, distil_6's two.
    mccs = [json.loads(lines[0])["dev_mcc"],
            max(json.loads(line)["dev_mcc"] for line in (models / "distil_6" / "metrics.jsonl").read_text().splitlines())]
    mean, std = sum(mccs) / 2, abs(mccs[0] - mccs[1]) / 2 ** 0.5
    assert re.search(rf"\| KD student \(distil\) \| [\d.]+M \| [\d.]+ ± [\d.]+ \| {mean:.4f} ± {std:.4f} \| .* \| 2 \|",
                     md), md
    assert "| scratch student (rnn) |" in md and "| teacher: LoRA " in md and "](../plots/compare_5.png)" in md
    assert "### distil_5" in md and "### distil_6" in md  # both seeds of the group, the damaged one's too
    # and the damage said under the table and in the list at the end.
    table_section = md.split("## Distillation", 1)[1].split("### ", 1)[0]
    assert "damaged" in table_section, table_section
    assert f"\n- {metrics} line 2 is damaged" in md.split("## Missing and damaged\n", 1)[1]
    assert f"<li>{metrics} line 2 is damaged" in page
