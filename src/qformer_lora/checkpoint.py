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
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import jsonio

ADAPTER_DIR = "adapter"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
PREFIX = "epoch-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or incomplete (the message names the path)."""


def should_save(epoch: int, num_epochs: int, every: int) -> bool:
    """Every ``every`` epochs and always after the last (epochs count from 1), as in the seed."""
    return epoch % every == 0 or epoch == num_epochs


def checkpoint_dir(run_dir: str | os.PathLike, epoch: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{epoch:04d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir() and (p / STATE_FILE).is_file())


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
) -> Path:
    """Write checkpoint ``epoch`` atomically; then prune to the ``keep_last`` newest, sparing
    epoch ``keep`` (the best epoch by --best-metric)."""
    final = checkpoint_dir(run_dir, epoch)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        model.save_pretrained(str(staging / ADAPTER_DIR), safe_serialization=True)
        tensors, optimizer_meta = _optimizer_tensors(optimizer)
        save_file(tensors, str(staging / OPTIMIZER_FILE))
        state = {
            "epoch": epoch,
            "global_step": global_step,
            "optimizer": optimizer_meta,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            "rng": rng_state(),
            "config": config,
            "metrics": metrics or {},
        }
        (staging / STATE_FILE).write_text(jsonio.dumps(state, indent=1), encoding="utf-8")
        if final.exists():  # re-saving the same epoch (e.g. after a rollback) replaces it whole
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if keep_last:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            if keep is None or old != checkpoint_dir(run_dir, keep):
                shutil.rmtree(old)
    return final


def load_state(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(path)
    state_file, optimizer_file = path / STATE_FILE, path / OPTIMIZER_FILE
    for required in (state_file, optimizer_file, path / ADAPTER_DIR):
        if not required.exists():
            raise CheckpointError(f"{path}: incomplete checkpoint, {required.name} is missing")
    state = json.loads(state_file.read_text(encoding="utf-8"))
    for numeric in ("optimizer", "scheduler", "scaler"):  # numbers only: "NaN" there was a float
        if numeric in state:
            state[numeric] = jsonio.revive(state[numeric])
    return state, load_file(str(optimizer_file))


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
