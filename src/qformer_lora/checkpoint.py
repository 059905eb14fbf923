"""Checkpoints: the adapter (PEFT's own format) plus trainer state, written atomically.

Layout of one checkpoint directory ``<run>/checkpoints/epoch-0002/``::

    adapter/                 PeftModel.save_pretrained (adapter_config.json + safetensors);
                             plain PeftModel.from_pretrained(base, this_dir) loads it
    optimizer.safetensors    every optimizer state tensor, keyed "state.<param index>.<name>"
    trainer_state.json       epoch, global step, param groups, scheduler, scaler, RNG, config

No pickle anywhere: tensors go to safetensors, everything else to strict JSON (jsonio: a
non-finite number is the string "NaN" / "Infinity", turned back into a float on loading for
the numeric parts, the optimizer, scheduler and scaler state). A checkpoint is
written into a temporary sibling directory and renamed into place only when complete, so
a crash mid-save leaves the previous checkpoint untouched and never a torn one.

Durability and integrity: every file and the staging directory are fsynced before the
rename, and ``checkpoints/`` after it, so a power cut cannot leave a renamed directory
whose files were never written. ``trainer_state.json`` records each other file's size and
sha256 (``files``) and a sha256 of its own content (``state_sha256``: the JSON with that key
left out, keys sorted); :func:`verify` checks them all, :func:`load_state` before any resume.
Checkpoints written before these fields existed load unverified.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import jsonio, pause_points, writes

ADAPTER_DIR = "adapter"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
PREFIX = "epoch-"  # an epoch's end: checkpoints/epoch-0002
FORMAT_VERSION = 2  # trainer_state.json's "format_version"; 1: before the field (and "files") existed
STEP_PREFIX = "step-"  # --save-steps, mid-epoch: checkpoints/step-00000150 (the global optimizer step)


class CheckpointError(RuntimeError):
    """A checkpoint is missing or incomplete (the message names the path)."""


def should_save(epoch: int, num_epochs: int, every: int) -> bool:
    """Every ``every`` epochs and always after the last (epochs count from 1), as in the seed."""
    return epoch % every == 0 or epoch == num_epochs


def checkpoint_dir(run_dir: str | os.PathLike, epoch: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{epoch:04d}"


def step_checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{STEP_PREFIX}{step:08d}"


def _training_order(path: Path) -> tuple[float, int]:
    """Where ``path`` was saved in training: (global step, 0 mid-epoch / 1 at the epoch's end).

    An epoch's checkpoint follows a step checkpoint of the same step (the epoch's validation ran
    after it). An unreadable state file sorts last, so ``--resume latest`` meets it first and
    says why it skips it."""
    try:
        step = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return math.inf, 0
    return step, int(path.name.startswith(PREFIX))


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The run's checkpoints (epoch and step), oldest first in training order."""
    root = Path(run_dir) / "checkpoints"
    found = [p for prefix in (PREFIX, STEP_PREFIX) for p in root.glob(f"{prefix}*")]
    return sorted((p for p in found if p.is_dir() and (p / STATE_FILE).is_file()), key=_training_order)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"state.{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> dict:
    # torch's CPU generator state is a uint8 tensor: stored as a list of ints in JSON
    state = {"python": _jsonable(random.getstate()), "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tupled(state["python"]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def save(
    run_dir,
    epoch: int,
    *,
    model,
    optimizer,
    scheduler,
    scaler,
    global_step: int,
    config: dict,
    keep_last: int | None = None,
    metrics: dict | None = None,
    keep: int | None = None,
    position: dict | None = None,
    guard: dict | None = None,
) -> Path:
    """Write checkpoint ``epoch`` atomically; then prune to the ``keep_last`` newest, sparing
    epoch ``keep`` (the best epoch by --best-metric).

    ``position``: for a step checkpoint inside epoch ``epoch`` (written to step-<global_step>),
    where the epoch stands: {"batches": micro-batches consumed, "loss_sum", "tokens": the
    epoch's running totals}. ``guard``: the guard's counters (numerics.Guard rollbacks, skipped)."""
    final = checkpoint_dir(run_dir, epoch) if position is None else step_checkpoint_dir(run_dir, global_step)
    tensors, optimizer_meta = _optimizer_tensors(optimizer)
    state = {
        "format_version": FORMAT_VERSION,
        "epoch": epoch,
        "global_step": global_step,
        "optimizer": optimizer_meta,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": rng_state(),
        "config": config,
        "metrics": metrics or {},
        "guard": guard,
    }
    if position is not None:
        state["position"] = position
    with writes.writing(final, "the checkpoint"):  # ENOSPC, EROFS, EACCES: named, the previous ones intact
        _write(final, model, tensors, state)
    if keep_last:
        with writes.writing(final.parent, "(prune) the checkpoints"):
            for old in list_checkpoints(run_dir)[:-keep_last]:
                if keep is None or old != checkpoint_dir(run_dir, keep):
                    _remove(old)
                    pause_points.reached("checkpoint.pruning")
    return final


def _write(final: Path, model, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Stage the checkpoint next to ``final``, fsync it, rename it into place (see the module docstring)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(final.parent)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING}{final.name}-", dir=final.parent))
    try:
        model.save_pretrained(str(staging / ADAPTER_DIR), safe_serialization=True)
        pause_points.reached("checkpoint.adapter")
        save_file(tensors, str(staging / OPTIMIZER_FILE))
        _write_state(staging, state)
        pause_points.reached("checkpoint.staged")
        if final.exists():  # re-saving the same epoch (e.g. after a rollback) replaces it whole
            _remove(final)
        os.replace(staging, final)
        pause_points.reached("checkpoint.renamed")
        _fsync(final.parent)  # the rename itself
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


STAGING, REMOVING = ".tmp-", ".del-"  # a checkpoint being written, one being deleted


def _remove(path: Path) -> None:
    """Delete checkpoint ``path``: renamed out of the listing first, so a crash mid-delete leaves no
    half-deleted checkpoint behind (only a .del- directory, removed by the next save)."""
    doomed = path.with_name(f"{REMOVING}{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def _remove_leftovers(root: Path) -> None:
    """What killed saves and deletes left in checkpoints/ (one writer per run: none is in progress)."""
    for leftover in [*root.glob(f"{STAGING}*"), *root.glob(f"{REMOVING}*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a directory's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _state_digest(state: dict) -> str:
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(jsonio.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def _write_state(staging: Path, state: dict) -> None:
    """Record every file's size and sha256 in the state, write it, fsync everything written."""
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    state["files"] = {p.relative_to(staging).as_posix(): {"size": p.stat().st_size, "sha256": sha256(p)} for p in files}
    state["state_sha256"] = _state_digest(state)
    (staging / STATE_FILE).write_text(jsonio.dumps(state, indent=1), encoding="utf-8")
    for p in [*files, staging / STATE_FILE, *{p.parent for p in files}, staging]:
        _fsync(p)


def verify(path: str | os.PathLike) -> dict:
    """The checkpoint's state after checking it whole; CheckpointError naming the first bad file.

    Checks: the state file parses and matches its ``state_sha256``; each file in ``files`` exists
    with the recorded size and sha256; the optimizer file and adapter directory exist."""
    path = Path(path)
    state_file = path / STATE_FILE
    for required in (state_file, path / OPTIMIZER_FILE, path / ADAPTER_DIR):
        if not required.exists():
            raise CheckpointError(f"{path}: incomplete checkpoint, {required.name} is missing")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{state_file}: corrupt checkpoint file, not JSON ({err})") from None
    version = state.get("format_version", 1) if isinstance(state, dict) else None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{state_file}: checkpoint format {version!r}, this qformer-lora reads formats up to "
            f"{FORMAT_VERSION}; a newer release wrote it: upgrade to load it"
        )
    if "state_sha256" in state and state["state_sha256"] != _state_digest(state):
        raise CheckpointError(f"{state_file}: corrupt checkpoint file, its content does not match its sha256")
    for name, expected in state.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing checkpoint file")
        size = file.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(f"{file}: corrupt checkpoint file, {size} bytes, expected {expected['size']}")
        if sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: corrupt checkpoint file, sha256 differs from the recorded one")
    return state


def load_state(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The verified state (:func:`verify`) and the optimizer tensors of checkpoint ``path``."""
    state = verify(path)
    for numeric in ("optimizer", "scheduler", "scaler"):  # numbers only: "NaN" there was a float (jsonio)
        if state.get(numeric) is not None:
            state[numeric] = jsonio.revive(state[numeric])
    return state, load_file(str(Path(path) / OPTIMIZER_FILE))


def restore(path, *, model, optimizer, scheduler, scaler) -> dict:
    """Load adapter weights and trainer state from ``path`` into live objects; returns the state."""
    from peft import set_peft_model_state_dict

    state, optimizer_tensors = load_state(path)
    adapter_file = Path(path) / ADAPTER_DIR / "adapter_model.safetensors"
    set_peft_model_state_dict(model, load_file(str(adapter_file)))
    _restore_optimizer(optimizer, optimizer_tensors, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state
