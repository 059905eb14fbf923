"""The run's metrics log: ``metrics.jsonl``, and with ``--log tensorboard`` the same numbers in TensorBoard.

``metrics.jsonl`` is the source of truth: :meth:`MetricsLog.record` appends every record
to it exactly as :func:`run_dir.append_jsonl` always has, whatever ``--log`` says. With
``--log tensorboard`` the finite numeric fields of the step and epoch records are also
written as TensorBoard scalars (``torch.utils.tensorboard.SummaryWriter``) into event files
beside ``metrics.jsonl``, so ``tensorboard --logdir runs/`` shows each run directory as a run.

Tag scheme; the x axis is the record's ``step`` (the global optimizer step):

========================  ==================  ==========================================
record (metrics.jsonl)    field               tag
========================  ==================  ==========================================
step (each optimizer      ``f``               ``train/f``: train/loss, train/lr,
step)                                         train/grad_norm, train/samples_per_s
epoch (each epoch; 0 is   ``val_x``           ``val/x``: val/loss, val/accuracy
the start, drawn at       any other ``f``     ``epoch/f``: epoch/train_loss (the epoch's
step 0)                                       mean), epoch/majority_baseline,
                                              epoch/feature_cache_hit_rate
========================  ==================  ==========================================

``step`` and ``epoch`` are a record's keys, not plotted; booleans, text, lists and
non-finite numbers are left out, and the other records (step_options, guard events) stay
in ``metrics.jsonl`` alone. Scalars are stored as float32 (TensorBoard's simple values).

Resume: the records after the checkpoint (an interrupted run's tail) are replayed, so
:meth:`MetricsLog.resume_after` drops them from ``metrics.jsonl`` and opens the writer with
``purge_step`` = the checkpoint's step + 1. SummaryWriter then writes a ``SessionLog.START``
at that step, on which TensorBoard's readers discard every earlier event at that step or
later: no replayed step is shown twice. A fresh run (``--overwrite true``) deletes the old
event files with the old log (run_dir.clear_earlier_run).

Under torchrun only rank 0 writes (as for metrics.jsonl); the event file is opened at the
first scalar (a run that fails while being set up leaves none), flushed after every epoch
record and closed by :meth:`MetricsLog.close` (``with`` closes it on errors too).
"""

from __future__ import annotations

import math
from pathlib import Path

from . import distributed, run_dir
from .run_config import LOGS, ConfigError

PLOTTED = ("step", "epoch")  # the record types drawn in TensorBoard
KEYS = ("type", "step", "epoch")  # what identifies a record; not plotted


def tag(record_type: str, field: str) -> str:
    """The TensorBoard tag of ``field`` of a ``record_type`` record (the scheme in the module docstring)."""
    if record_type == "step":
        return f"train/{field}"
    if field.startswith("val_"):
        return f"val/{field.removeprefix('val_')}"
    return f"epoch/{field}"


def scalars(record: dict) -> dict[str, float]:
    """``record``'s scalars, tag -> value: its finite int/float fields other than the keys ({} for other types)."""
    if record.get("type") not in PLOTTED:
        return {}
    return {
        tag(record["type"], field): float(value)
        for field, value in record.items()
        if field not in KEYS
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


def summary_writer(log: str):
    """The SummaryWriter class ``log`` needs (None for 'jsonl').

    ConfigError for an unknown ``log`` or a missing tensorboard package; train calls it before
    building anything, so a missing package costs no model loading."""
    if log not in LOGS:
        raise ConfigError(f"option 'log' is {log!r}; expected one of {LOGS}")
    if log != "tensorboard":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch raises it when the tensorboard package is absent
        raise ConfigError(
            f"--log tensorboard needs the tensorboard package ({err}); install qformer-lora[tensorboard]"
        ) from None
    return SummaryWriter


class MetricsLog:
    """Appends records to ``<directory>/metrics.jsonl`` and, for ``log='tensorboard'``, mirrors their scalars.

    ``directory``: the run directory; ``log``: one of run_config.LOGS. Use it as a context
    manager, or call :meth:`close`, so the event file is flushed and closed."""

    def __init__(self, directory: str | Path, log: str = "jsonl"):
        self.directory = Path(directory)
        self.path = self.directory / run_dir.LOG_FILE
        self._writer_class = summary_writer(log)
        self._writer = None
        self._purge_step: int | None = None

    def resume_after(self, step: int, epochs_done: int | None = None) -> None:
        """Continue after the checkpoint at global step ``step`` with ``epochs_done`` epochs complete:
        drop later records (see the module docstring)."""
        run_dir.truncate_log(self.path, step, epochs_done)
        self._purge_step = step + 1

    def record(self, record: dict) -> None:
        """Append ``record`` (a JSON-serialisable dict with "type" and "step") and draw its scalars."""
        run_dir.append_jsonl(self.path, record)
        values = scalars(record) if self._writer_class is not None and distributed.is_main() else {}
        if not values:
            return
        if self._writer is None:
            self._writer = self._writer_class(log_dir=str(self.directory), purge_step=self._purge_step)
        for name, value in values.items():
            self._writer.add_scalar(name, value, global_step=record["step"])
        if record["type"] == "epoch":  # an epoch is minutes apart: show it now, not at the 2-minute flush
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()
