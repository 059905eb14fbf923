"""Trial runs: a few optimizer steps through the one training step, on in-memory batches.

They show a precision finding happen (the seed's NaN) and test the guard policies:
:func:`run_steps` takes ``steps`` steps with ``training.step.training_step`` (the step
``qformer-lora train`` takes: autocast, GradScaler for fp16-amp, clipping, warm-up schedule,
finite check) and returns a JSON-ready trace; :func:`reproduce` builds a preset the way
training does and runs it on synthetic batches (the stability tests on tiny presets,
tests/gpu/test_gpu_nan.py on full-size ones).

Without a guard policy the trial behaves like the seed's own loop (:class:`SeedLoop`), so the
trace shows every later step of a failing run.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch

from .. import synthetic
from ..diagnostics.numerics import localise
from ..training import run_config, train
from ..training.step import linear_warmup_decay, make_step, training_step


class SeedLoop:
    """The seed's loop as a guard policy: skip a batch whose output is NaN ("Forward pass returned
    None"), take every other step whatever the gradient norm, and let GradScaler handle an fp16
    overflow. The first failure is localised and kept in ``diagnosis``; nothing is raised."""

    def __init__(self, model, run_forward=None):
        self.model, self.run_forward = model, run_forward
        self.diagnosis = None
        self.events: list[dict] = []

    def inputs_ok(self, batches: list[dict], step: int) -> bool:
        return True  # the seed checked no inputs

    def healthy(self) -> None:
        pass

    def non_finite(self, step: int, batches: list[dict], losses, grad_norm, scaler_enabled: bool = False) -> str:
        loss_finite = all(math.isfinite(v) for v in losses)
        if scaler_enabled and loss_finite:
            return "scaler"  # a gradient overflow: GradScaler skips the step and lowers its scale
        if self.diagnosis is None:
            self.diagnosis = asdict(
                localise(self.model, batches, step, self.run_forward, losses=losses, grad_norm=grad_norm)
            )
        return "step" if loss_finite else "skip"


def run_steps(
    model,
    batches: list[dict],
    *,
    precision: str,
    steps: int,
    lr: float = 1e-4,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    warmup_steps: int = 0,
    total_steps: int = 100,
    fused: bool | None = None,
    optimizer=None,
    guard: str | None = None,
    max_rollbacks: int = 3,
    rollback_lr_factor: float = 0.5,
) -> dict:
    """``steps`` optimizer steps of ``training_step``, cycling through ``batches`` (one per step).

    ``guard`` is a policy name (numerics.POLICIES) or None for the seed's loop (:class:`SeedLoop`).
    ``optimizer``: an AdamW over the adapter parameters to use (tests inspect its state); by
    default torch's own AdamW (``fused`` as given), as the seed used it.
    Returns a JSON-ready trace (the Guard's events under "guard_events").
    """
    device = next(p for p in model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(params, lr=lr, eps=eps, weight_decay=weight_decay, fused=fused)
    scheduler = linear_warmup_decay(optimizer, warmup_steps, total_steps)
    seed_loop = SeedLoop(model) if guard is None else None
    parts = make_step(
        model,
        optimizer,
        scheduler,
        precision_name=precision,
        device=device,
        guard=seed_loop or guard,
        max_grad_norm=max_grad_norm,
        max_rollbacks=max_rollbacks,
        rollback_lr_factor=rollback_lr_factor,
    )
    if seed_loop is not None:
        seed_loop.run_forward = parts.run_forward  # it localises with the step's own forward
    trace = {"precision": precision, "lr": lr, "eps": eps, "max_grad_norm": max_grad_norm}
    trace |= {"warmup_steps": warmup_steps, "fused": fused, "losses": [], "grad_norms": [], "optimizer_steps": 0}
    trace |= {"scaler_skipped": 0, "adapter_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in params})}
    _take_steps(parts, batches, steps, trace)
    trace["diagnosis"] = getattr(parts.guard, "diagnosis", None)
    trace["guard_events"] = parts.guard.events
    return trace


def _take_steps(parts, batches: list[dict], steps: int, trace: dict) -> None:
    """``steps`` calls of the training step, one batch each; what each did goes into ``trace``."""
    for step in range(steps):
        result = training_step(parts, [batches[step % len(batches)]], step)
        if result.action == "inputs":
            continue
        trace["losses"].append(result.loss)
        trace["grad_norms"].append(float(result.grad_norm))
        if result.stepped:
            trace["scaler_skipped"] += result.scaler_skipped
            trace["optimizer_steps"] += not result.scaler_skipped
    trace["finite"] = [math.isfinite(v) for v in trace["losses"]]


def reproduce(
    preset: str,
    precision: str,
    *,
    steps: int = 4,
    device: str = "cpu",
    batch_size: int = 2,
    r: int = 4,
    seed: int = 0,
    **kwargs,
) -> dict:
    """Build ``preset`` (random init) with ``train.build_adapter_model`` for ``precision`` directly
    on ``device``, and run :func:`run_steps` on synthetic batches: the CPU tests on tiny presets
    and tests/gpu/test_gpu_nan.py on full-size ones. Defaults: the seed's r=4, alpha=8."""
    config = run_config.TrainConfig(
        preset=preset,
        base_checkpoint=None,
        precision=precision,
        lora_r=r,
        lora_dropout=0.0,
        seed=seed,
    )
    model, _ = train.build_adapter_model(config, device=device)
    batches = [
        synthetic.random_batch(model, batch_size=batch_size, prompt_len=8, answer_len=4, seed=seed + i, device=device)
        for i in range(2)
    ]
    return {"preset": preset, "device": str(device), "batch_size": batch_size, "r": r} | run_steps(
        model, batches, precision=precision, steps=steps, **kwargs
    )
