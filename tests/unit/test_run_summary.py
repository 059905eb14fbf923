"""The end of a run (issue 21, item 5): train prints a short summary (adapter, best and last validation
figures with their epochs, wall time, samples/s) and writes curves.png; `qformer-lora report RUN`
prints and draws the same again from the run directory. Before, train printed the last epoch's
metrics as JSON and drew nothing."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from qformer_lora import cli, data, jsonio
from qformer_lora.training import curves, run_dir, summary

NAN = float("nan")


def write_log(directory: Path, records: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / run_dir.LOG_FILE).write_text("".join(jsonio.dumps(r) + "\n" for r in records))
    return directory


# Two epochs of 2 steps, written as train writes them, with numbers chosen to be read back by hand.
RECORDS = [
    {"type": "step_options", "step": 0, "choices": []},
    {"type": "warning", "step": 0, "name": "is_gradient_checkpointing deprecated", "reason": "r"},
    {"type": "epoch", "epoch": 0, "step": 0, "val_loss": 1.5, "val_accuracy": 0.25, "majority_baseline": 0.2},
    {"type": "step", "epoch": 1, "step": 1, "loss": 1.4, "lr": 0.001},
    {"type": "step", "epoch": 1, "step": 2, "loss": NAN, "lr": 0.002},  # written "NaN"
    {"type": "epoch", "epoch": 1, "step": 2, "train_loss": 1.2, "val_loss": 0.9, "val_accuracy": 0.5,
     "majority_baseline": 0.2},
    {"type": "step", "epoch": 2, "step": 3, "loss": 0.8, "lr": 0.001},
    {"type": "step", "epoch": 2, "step": 4, "loss": 0.7, "lr": 0.0},
    {"type": "epoch", "epoch": 2, "step": 4, "train_loss": 0.75, "val_loss": 1.0, "val_accuracy": 0.5,
     "majority_baseline": 0.2},
    {"type": "end", "step": 4, "wall_s": 10.0, "train_samples": 32, "train_s": 4.0, "samples_per_s": 8.0},
]  # fmt: skip


def test_the_summary_reads_best_and_last_from_the_log(tmp_path):
    found = summary.summarise(write_log(tmp_path / "run", RECORDS))
    # best loss 0.9 at epoch 1 (epoch 0 is before training); accuracy 0.5 at epochs 1 and 2: the
    # earliest; last = epoch 2; 32 samples in 4.0 s of steps = 8.0 samples/s; no checkpoint saved
    assert found["best_val_loss"] == {"epoch": 1, "value": 0.9}
    assert found["best_val_accuracy"] == {"epoch": 1, "value": 0.5}
    assert found["last"] == {"epoch": 2, "val_loss": 1.0, "val_accuracy": 0.5}
    assert found["start"] == {"val_loss": 1.5, "val_accuracy": 0.25}
    assert (found["epochs"], found["steps"], found["wall_s"], found["samples_per_s"]) == (2, 4, 10.0, 8.0)
    assert found["adapter"] is None and found["hidden_warnings"] == ["is_gradient_checkpointing deprecated"]
    text = summary.format_summary(found)
    assert "validation loss: best 0.9000 (epoch 1), last 1.0000 (epoch 2); before training 1.5000" in text
    assert "validation accuracy: best 0.500 (epoch 1), last 0.500 (epoch 2); majority answer 0.200" in text
    assert "time: 10.0 s wall, 8.0 samples/s in training steps" in text


def test_a_resumed_run_adds_its_parts_and_a_nan_loss_is_not_best(tmp_path):
    records = [r | {"val_loss": NAN} if r.get("epoch") == 1 and r["type"] == "epoch" else r for r in RECORDS]
    records.append({"type": "end", "step": 4, "wall_s": 5.0, "train_samples": 8, "train_s": 1.0})
    found = summary.summarise(write_log(tmp_path / "run", records))
    assert found["best_val_loss"] == {"epoch": 2, "value": 1.0}  # NaN at epoch 1 is skipped
    assert found["wall_s"] == 15.0 and found["samples_per_s"] == pytest.approx(40 / 5.0)


def test_the_best_checkpoint_of_best_metric_is_named(tmp_path):
    # --best-metric logs best_epoch in the epoch records and keeps that checkpoint
    records = [r | {"best_epoch": 1} if r["type"] == "epoch" and r["epoch"] == 2 else r for r in RECORDS]
    found = summary.summarise(write_log(tmp_path / "run", records))
    adapter = tmp_path / "run" / "checkpoints" / "epoch-0001" / "adapter"
    assert found["best_checkpoint"] == {"epoch": 1, "adapter": str(adapter)}
    assert f"best checkpoint (--best-metric): {adapter} (epoch 1)" in summary.format_summary(found)
    assert summary.summarise(write_log(tmp_path / "plain", RECORDS))["best_checkpoint"] is None


def test_a_bad_log_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl here"):
        summary.summarise(tmp_path)
    log = write_log(tmp_path / "run", RECORDS[:3]) / run_dir.LOG_FILE
    log.write_text(log.read_text() + "[1, 2]\n" + '{"type": "st')
    with pytest.raises(ValueError, match=r"metrics.jsonl:4: not a log record \(a JSON list\)"):
        summary.read_log(tmp_path / "run")


def test_the_curves_show_the_logged_numbers(tmp_path):
    pytest.importorskip("matplotlib")
    figure = curves.draw(summary.read_log(write_log(tmp_path / "run", RECORDS)))
    loss, accuracy, lr = (a for a in figure.axes if a.get_ylabel())
    lines = {line.get_label(): line for line in loss.lines}
    assert list(lines["validation"].get_xdata()) == [0, 2, 4] and list(lines["validation"].get_ydata()) == [
        1.5,
        0.9,
        1.0,
    ]
    steps = lines["training, each step"].get_ydata()
    assert steps[0] == 1.4 and math.isnan(steps[1])  # the "NaN" loss is a gap, not an error
    marks = {line.get_label(): line for line in accuracy.lines}
    assert list(marks["validation"].get_ydata()) == [0.25, 0.5, 0.5] and marks["majority answer"].get_ydata()[0] == 0.2
    # the best values ringed and named as the summary names them: loss 0.9 at epoch 1 (step 2)
    assert list(lines["best: 0.9000 (epoch 1)"].get_xydata()[0]) == [2, 0.9] and "best: 0.500 (epoch 1)" in marks
    assert list(lr.lines[0].get_ydata()) == [0.001, 0.002, 0.001, 0.0]
    top = [a for a in loss.child_axes if a.get_xlabel() == "epoch"]
    assert len(top) == 1, "2 steps per epoch throughout: the epochs are on the top axis"


def short_run(tmp_path: Path) -> list[str]:
    """One epoch on 8 training and 8 validation shapes samples, batch 4: 2 optimizer steps."""
    flags = []
    for split in ("train", "val"):
        flags += [f"--{split}-manifest", str(data.shapes_subset(tmp_path, split, 8))]
    return ["train", *flags, "--image-root", str(data.SHAPES_DIR), "--epochs", "1", "--batch-size", "4",
            "--progress", "false", "--output-dir", str(tmp_path / "run")]  # fmt: skip


def test_train_ends_with_its_summary_and_curves_and_report_repeats_them(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli.main(short_run(tmp_path)) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    assert f"adapter: {run}/checkpoints/epoch-0001/adapter" in out and "(1 epoch, 2 optimizer steps)" in out
    assert "validation loss: best " in out and " samples/s in training steps" in out
    assert f"curves: {run}/curves.png (redraw: qformer-lora report {run})" in out
    assert (run / curves.CURVES_FILE).read_bytes()[:4] == b"\x89PNG"
    (run / curves.CURVES_FILE).unlink()
    assert cli.main(["report", str(run)]) == 0
    again = capsys.readouterr().out
    assert again == out and (run / curves.CURVES_FILE).exists()
    assert cli.main(["report", str(run), "--json"]) == 0
    assert jsonio.loads_strict(capsys.readouterr().out)["epochs"] == 1
    assert cli.main(["report", str(tmp_path)]) == 2  # not a run directory: named, no traceback
    assert "no metrics.jsonl here" in capsys.readouterr().err


def test_without_matplotlib_the_run_says_so_in_one_line_and_succeeds(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    write_log(tmp_path / "run", RECORDS)
    assert cli.main(["report", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        f"matplotlib is not installed: skipped {tmp_path / 'run'}/curves.png (pip install 'qformer-lora[bench]')"
    ]
    assert "validation loss: best" in captured.out and not (tmp_path / "run" / curves.CURVES_FILE).exists()


def test_train_json_prints_the_metrics_alone(tmp_path, capsys):
    assert cli.main([*short_run(tmp_path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["epoch"] == 1 and "val_loss" in printed
