"""The run directory: its log (metrics.jsonl), the checks before a run starts or resumes there.

A run directory holds ``metrics.jsonl`` (one JSON record a line: step, epoch, step_options
and guard events; rank 0 alone writes it under torchrun), with ``--log tensorboard`` the
TensorBoard event files beside it (training/metrics_log.py), and ``checkpoints/``. A fresh run
refuses a directory that holds an earlier one unless told to overwrite it; a resumed run
checks its checkpoint and the options it keeps before anything is built, and drops log
lines written after that checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

from .. import checkpoint, jsonio, writes
from . import distributed
from .run_config import ConfigError, TrainConfig

LOG_FILE = "metrics.jsonl"  # one JSON record a line: step, epoch, step_options and guard events
EVENT_FILES = "events.out.tfevents.*"  # TensorBoard's (SummaryWriter's) event files, beside LOG_FILE


def append_jsonl(path: Path, record: dict) -> None:
    if not distributed.is_main():  # under torchrun only rank 0 writes the log
        return
    with writes.writing(path, "the log record"), path.open("a", encoding="utf-8") as f:
        f.write(jsonio.dumps(record) + "\n")  # strict: a NaN loss is written "NaN"


def epoch_records(path: Path) -> list[dict]:
    """The epoch records of the log at ``path`` so far ([] before the first)."""
    if not path.exists():
        return []
    records = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return [r for r in records if r.get("type") == "epoch"]


def truncate_log(path: Path, last_step: int, epochs_done: int | None = None) -> None:
    """Drop log lines written after the checkpoint we resume from (an interrupted run's tail):
    records after step ``last_step``, and epoch records after epoch ``epochs_done`` (a step
    checkpoint at an epoch's last step precedes that epoch's record of the same step).

    A last line cut short (the process died while writing it) is dropped too; any other line
    that is not a log record is an error naming it.
    """
    if not path.exists() or not distributed.is_main():
        return
    lines, kept = path.read_text(encoding="utf-8").splitlines(), []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            step = record.get("step", 0)
        except (json.JSONDecodeError, AttributeError) as err:
            if number == len(lines) and isinstance(err, json.JSONDecodeError):
                break  # torn by the interruption this resume recovers from
            raise checkpoint.CheckpointError(
                f"{path}:{number}: not a log record ({err}); fix or delete the line"
            ) from None
        if not isinstance(step, int):
            raise checkpoint.CheckpointError(f"{path}:{number}: field 'step' is {step!r}, not an integer")
        later_epoch = epochs_done is not None and record.get("type") == "epoch" and record["epoch"] > epochs_done
        if step <= last_step and not later_epoch:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    with writes.writing(path, "the truncated log"):
        try:
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def resume_point(run_dir: Path, resume) -> Path:
    """The checkpoint ``resume`` names, verified (checkpoint.verify) before anything is built.

    'latest': the run's newest checkpoint that verifies; each newer one that does not is
    skipped with a warning naming its bad file. A named checkpoint that does not verify is
    refused (CheckpointError naming the file)."""
    if str(resume) != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise checkpoint.CheckpointError(f"{path}: no such checkpoint directory")
        checkpoint.verify(path)
        return path
    for path in reversed(checkpoint.list_checkpoints(run_dir)):
        try:
            checkpoint.verify(path)
        except checkpoint.CheckpointError as err:
            warnings.warn(f"--resume latest: skipping {path.name}: {err}", stacklevel=2)
            continue
        return path
    raise checkpoint.CheckpointError(f"{run_dir}: no checkpoint to resume from")


# What a resumed run takes from its checkpoint: the adapter's shape (another one cannot load),
# the frozen forward it was trained against (another quantization of the language model would
# silently continue against other weights) and the optimizer settings its restored state carries
# (another --lr was silently overridden).
RESUME_KEEPS = (
    "preset",
    "base_checkpoint",
    "quantize_language_model",
    "scope",
    "targets",
    "exclude_untrainable",
    "lora_r",
    "lora_alpha",
    "lr",
    "weight_decay",
    "adam_eps",
)


def check_resume_options(path: Path, config: TrainConfig) -> None:
    state_file = path / checkpoint.STATE_FILE
    if not state_file.is_file():
        return  # checkpoint.restore names what is missing
    saved = json.loads(state_file.read_text(encoding="utf-8")).get("config", {})

    def same(name: str) -> bool:
        old, new = saved[name], getattr(config, name)
        if name == "targets":
            return list(old) == list(new)
        if name == "base_checkpoint" and old and new:
            return old == new or Path(old).resolve() == Path(new).resolve()
        return old == new

    differ = [
        f"{name}={saved[name]!r} (this run: {getattr(config, name)!r})"
        for name in RESUME_KEEPS
        if name in saved and not same(name)
    ]
    if differ:
        raise checkpoint.CheckpointError(
            f"{path} was trained with {', '.join(differ)}; a resumed run keeps the "
            f"checkpoint's values: leave these options out, or start a new run"
        )


def earlier_run(run_dir: Path) -> list[str]:
    """What in ``run_dir`` an earlier run left: its log, its TensorBoard event files and its checkpoints."""
    return (
        ([LOG_FILE] if (run_dir / LOG_FILE).exists() else [])
        + [p.name for p in sorted(run_dir.glob(EVENT_FILES))]
        + [f"checkpoints/{p.name}" for p in checkpoint.list_checkpoints(run_dir)]
    )


def refuse_earlier_run(run_dir: Path) -> None:
    # a fresh run here would replace the log but keep the old checkpoints, and pruning
    # (keep_last) would then delete the new run's own checkpoints before the old ones
    earlier = earlier_run(run_dir)
    if earlier:
        raise ConfigError(
            f"{run_dir}: holds an earlier run ({', '.join(earlier)}); continue it with --resume, "
            f"start afresh with --overwrite true, or choose another --output-dir"
        )


def clear_earlier_run(run_dir: Path) -> None:
    if distributed.is_main():
        (run_dir / LOG_FILE).unlink(missing_ok=True)
        for events in run_dir.glob(EVENT_FILES):  # or TensorBoard would draw the old curves under the new
            events.unlink()
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
