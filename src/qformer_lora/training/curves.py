"""``curves.png`` of a training run, drawn from its metrics.jsonl alone.

Three panels against the optimizer step (the epochs on the top axis): the loss (each step's
training loss, each epoch's mean training loss, the validation loss, which starts at step 0
before any training), the validation accuracy with the majority-answer baseline, and the
learning rate. ``qformer-lora train`` draws it at its end and ``qformer-lora report RUN``
redraws it. matplotlib is the optional ``bench`` extra: without it :func:`write` returns None
and the caller says so in one line.
"""

from __future__ import annotations

from pathlib import Path

from .. import jsonio, plotting
from .summary import best, read_log

CURVES_FILE = "curves.png"


def _series(records: list[dict], record_type: str, field: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``field`` in the ``record_type`` records that have it ("NaN" read as nan)."""
    found = [(r["step"], jsonio.number(r[field])) for r in records if r.get("type") == record_type and field in r]
    return [s for s, _ in found], [v for _, v in found]


def _epoch_axis(axes, records: list[dict]) -> None:
    """Epochs on the top axis, when every epoch has the same number of steps (the first epoch's)."""
    ends = {r["epoch"]: r["step"] for r in records if r.get("type") == "epoch" and r["epoch"] > 0}
    per_epoch = ends.get(min(ends, default=0), 0) if ends else 0
    if per_epoch and all(step == epoch * per_epoch for epoch, step in ends.items()):
        from matplotlib.ticker import MaxNLocator

        top = axes.secondary_xaxis("top", functions=(lambda s: s / per_epoch, lambda e: e * per_epoch))
        top.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs only
        top.set_xlabel("epoch")


def _mark_best(axes, records: list[dict], field: str, lower: bool, spec: str) -> None:
    """A ring on the best validation value after training started, named in the legend as the summary names it."""
    trained = [r for r in records if r.get("type") == "epoch" and r["epoch"] > 0 and field in r]
    found = best(trained, field, lower)
    if found is not None:
        step = next(r["step"] for r in trained if r["epoch"] == found["epoch"])
        label = f"best: {found['value']:{spec}} (epoch {found['epoch']})"
        axes.plot([step], [found["value"]], "o", ms=12, mfc="none", mec="black", mew=1.5, label=label)


def draw(records: list[dict], title: str = ""):
    """The curves as a matplotlib Figure (None without matplotlib)."""
    figure = plotting.new_figure(10, 8.5)
    if figure is None:
        return None
    loss, accuracy, lr = figure.subplots(3, 1, sharex=True, height_ratios=(2.2, 1.3, 1))
    loss.plot(*_series(records, "step", "loss"), color="#aec7e8", linewidth=0.8, label="training, each step")
    loss.plot(*_series(records, "epoch", "train_loss"), "o-", ms=4, color="#1f77b4", label="training, epoch mean")
    loss.plot(*_series(records, "epoch", "val_loss"), "s-", ms=4, color="#d62728", label="validation")
    _mark_best(loss, records, "val_loss", lower=True, spec=".4f")
    loss.set(ylabel="loss (per answer token)", ylim=(0, None))
    accuracy.plot(*_series(records, "epoch", "val_accuracy"), "s-", ms=4, color="#d62728", label="validation")
    _mark_best(accuracy, records, "val_accuracy", lower=False, spec=".3f")
    _, baseline = _series(records, "epoch", "majority_baseline")
    if baseline:
        accuracy.axhline(baseline[-1], color="0.4", linestyle="--", linewidth=1, label="majority answer")
    accuracy.set(ylabel="accuracy", ylim=(0, 1.02))
    lr.plot(*_series(records, "step", "lr"), color="#2ca02c", label="learning rate")
    lr.set(ylabel="learning rate", xlabel="optimizer step", ylim=(0, None))
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for axes in (loss, accuracy, lr):
        axes.grid(alpha=0.3)
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside: the curves keep the area
    _epoch_axis(loss, records)
    figure.suptitle(title)
    return figure


def write(directory: str | Path) -> Path | None:
    """Draw ``directory``/curves.png from its metrics.jsonl (atomically: a reader never sees half a
    PNG); returns the path, or None when matplotlib is not installed."""
    directory = Path(directory)
    figure = draw(read_log(directory), title=f"{directory.name}: training curves")
    if figure is None:
        return None
    path = directory / CURVES_FILE
    tmp = path.with_suffix(".png.tmp")
    tmp.write_bytes(plotting.png_bytes(figure))
    tmp.replace(path)
    return path
