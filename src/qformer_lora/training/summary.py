"""A training run at a glance: where its adapter is, its best and last validation figures, time and throughput.

Everything comes from the run directory (metrics.jsonl and checkpoints/), so ``qformer-lora
report RUN`` prints later what ``train`` printed at its end. The records used:

* ``epoch`` records with ``val_loss`` / ``val_accuracy`` (epoch 0: before training);
* ``end`` records (one per ``train`` call that finished; a resumed run has one per part):
  wall seconds, training samples and the seconds spent in training steps;
* ``warning`` records: upstream warnings kept off the terminal (known_warnings.py).

Numbers are read with jsonio.number, so a non-finite loss written as "NaN" stays a NaN.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .. import checkpoint, jsonio
from . import run_dir


def read_log(directory: str | Path) -> list[dict]:
    """The records of ``directory``'s metrics.jsonl. FileNotFoundError when there is none;
    ValueError naming file and line for a line that is not a JSON record (a last line cut
    short by an interrupted run is skipped, as resuming does)."""
    path = Path(directory) / run_dir.LOG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {run_dir.LOG_FILE} here; is it a run directory (--output-dir)?")
    lines, records = path.read_text(encoding="utf-8").splitlines(), []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)  # not strict: logs written before jsonio hold bare NaN
        except json.JSONDecodeError as err:
            if number == len(lines):
                break  # torn by an interruption
            raise ValueError(f"{path}:{number}: not a log record ({err})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: not a log record (a JSON {type(record).__name__})")
        records.append(record)
    return records


def best(epochs: list[dict], field: str, lower: bool) -> dict | None:
    """{"epoch", "value"} of the best finite ``field`` (the earliest on a tie); None if none is finite."""
    values = [(r["epoch"], jsonio.number(r.get(field))) for r in epochs]
    finite = [(e, v) for e, v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    epoch, value = min(finite, key=lambda ev: (ev[1] if lower else -ev[1], ev[0]))
    return {"epoch": epoch, "value": value}


def summarise(directory: str | Path) -> dict:
    """The run's summary as a dict (``--json``): adapter path, start / best / last validation
    figures with their epochs, steps, wall seconds, samples/s in training steps, hidden warnings."""
    records = read_log(directory)
    epochs = [r for r in records if r.get("type") == "epoch" and "val_loss" in r]
    trained = [r for r in epochs if r["epoch"] > 0] or epochs
    ends = [r for r in records if r.get("type") == "end"]
    latest = checkpoint.latest_checkpoint(directory)
    samples, seconds = sum(r["train_samples"] for r in ends), sum(r["train_s"] for r in ends)
    last = epochs[-1] if epochs else {}
    best_epoch = last.get("best_epoch")  # logged with --best-metric, whose checkpoint is kept
    return {
        "run_dir": str(directory),
        "adapter": str(latest / checkpoint.ADAPTER_DIR) if latest is not None else None,
        "best_checkpoint": {
            "epoch": best_epoch,
            "adapter": str(checkpoint.checkpoint_dir(directory, best_epoch) / checkpoint.ADAPTER_DIR),
        }
        if best_epoch is not None
        else None,
        "epochs": max((r["epoch"] for r in epochs), default=0),
        "steps": max((r.get("step", 0) for r in records), default=0),
        "start": {k: jsonio.number(epochs[0].get(k)) for k in ("val_loss", "val_accuracy")}
        if epochs and epochs[0]["epoch"] == 0
        else None,
        "best_val_loss": best(trained, "val_loss", lower=True),
        "best_val_accuracy": best(trained, "val_accuracy", lower=False),
        "last": {"epoch": last.get("epoch")} | {k: jsonio.number(last.get(k)) for k in ("val_loss", "val_accuracy")},
        "majority_baseline": jsonio.number(last.get("majority_baseline")),
        "wall_s": sum(r["wall_s"] for r in ends) if ends else None,
        "samples_per_s": samples / seconds if seconds > 0 else None,
        "hidden_warnings": [r["name"] for r in records if r.get("type") == "warning"],
        # --batch-size auto: what it chose and why (the first part's; a resumed part keeps it)
        "batch_size_auto": next((r["why"] for r in records if r.get("type") == "auto_batch" and "why" in r), None),
    }


def _figure(best: dict | None, last_value, last_epoch, spec: str) -> str:
    if best is None:
        return "not measured"
    return f"best {best['value']:{spec}} (epoch {best['epoch']}), last {last_value:{spec}} (epoch {last_epoch})"


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def format_summary(summary: dict) -> str:
    """The summary in a few lines, as ``train`` prints it at its end."""
    last, start = summary["last"], summary["start"]
    lines = [
        f"run: {summary['run_dir']} ({_count(summary['epochs'], 'epoch')}, "
        f"{_count(summary['steps'], 'optimizer step')})",
        f"adapter: {summary['adapter'] or 'no checkpoint saved'}",
        *(
            [f"best checkpoint (--best-metric): {best['adapter']} (epoch {best['epoch']})"]
            if (best := summary.get("best_checkpoint"))
            else []
        ),
        "validation loss: "
        + _figure(summary["best_val_loss"], last["val_loss"], last["epoch"], ".4f")
        + (f"; before training {start['val_loss']:.4f}" if start else ""),
        "validation accuracy: "
        + _figure(summary["best_val_accuracy"], last["val_accuracy"], last["epoch"], ".3f")
        + (f"; majority answer {summary['majority_baseline']:.3f}" if summary["majority_baseline"] is not None else ""),
    ]
    if summary.get("batch_size_auto"):
        lines.append(summary["batch_size_auto"])
    if summary["wall_s"] is not None:
        rate = f", {summary['samples_per_s']:.1f} samples/s in training steps" if summary["samples_per_s"] else ""
        lines.append(f"time: {summary['wall_s']:.1f} s wall{rate}")
    if summary["hidden_warnings"]:
        lines.append(
            f"upstream warnings kept off the terminal: {len(summary['hidden_warnings'])} (in {run_dir.LOG_FILE})"
        )
    return "\n".join(lines)
