"""The one training step: what ``qformer-lora train``, the trial runs and the benchmark all take.

Read :func:`training_step` top to bottom; it is one optimizer step over an accumulation
group of micro-batches:

1. inputs: one ``isfinite`` per micro-batch on ``pixel_values`` (the guard raises or skips);
2. totals over processes in one all-reduce: bad-input flags, answer tokens, samples;
3. per micro-batch: forward (loss summed over answer tokens), that loss divided by the
   group's token count (times the process count: DDP averages over processes), backward;
4. unscale (GradScaler, fp16-amp only), clip the adapter gradients (a non-finite norm is
   left as it is so the localiser can name the first bad gradient);
5. finite check on the group loss and the gradient norm; on a failure the guard decides
   (skip the group, let GradScaler skip the step, or raise with a diagnosis);
6. optimizer step, scaler update, scheduler step, zero_grad.

Dividing by the group's token count (not averaging per micro-batch) makes batch 8 x 1 and
batch 2 x 4 follow one loss curve. :func:`make_step` builds the pieces the same way for
every caller; :func:`linear_warmup_decay` is the schedule training uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import forward, precision
from ..diagnostics import numerics
from . import distributed, feature_cache


def linear_warmup_decay(optimizer, warmup_steps: int, total_steps: int):
    """LambdaLR: linear warm-up over ``warmup_steps`` optimizer steps, then linear decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class StepParts:
    """Everything one step uses, built once (:func:`make_step`)."""

    model: torch.nn.Module  # the PeftModel: its adapter parameters are stepped
    run_forward: Callable[[dict], object]  # batch -> output whose .loss is summed over answer tokens
    optimizer: torch.optim.Optimizer
    scheduler: object  # an LRScheduler, stepped after every optimizer step
    scaler: torch.amp.GradScaler  # enabled for fp16-amp only (precision.py)
    guard: object  # numerics.Guard, or any object with inputs_ok / healthy / non_finite
    device: torch.device
    max_grad_norm: float | None = None
    trainer: torch.nn.Module | None = None  # DDP wrapper: all-reduce after the group's last micro-batch
    params: list = field(default_factory=list)

    def __post_init__(self):
        if not self.params:
            self.params = [p for group in self.optimizer.param_groups for p in group["params"]]


@dataclass
class StepResult:
    """What one call did. ``action``: "step" (the optimizer stepped), "scaler" (GradScaler handled an
    fp16 overflow; it skipped or took the step), "skip" (the group's gradients were dropped) or
    "inputs" (non-finite inputs: nothing ran). Losses are summed over answer tokens and processes."""

    action: str
    tokens: int
    samples: int
    loss_sum: float = math.nan
    batch_losses: list[float] = field(default_factory=list)
    grad_norm: torch.Tensor | None = None
    scaler_skipped: bool = False  # GradScaler skipped the optimizer step (and halved its scale)

    @property
    def stepped(self) -> bool:
        """The schedule advanced (the loop counts this as an optimizer step)."""
        return self.action in ("step", "scaler")

    @property
    def loss(self) -> float:
        """Mean loss per answer token over the group."""
        return self.loss_sum / self.tokens if self.tokens else math.nan


def make_step(
    model,
    optimizer,
    scheduler,
    *,
    precision_name: str,
    device,
    guard="raise",
    max_grad_norm: float | None = None,
    cache=None,
    scaler=None,
    run_forward=None,
    on_event=None,
    max_rollbacks: int = 3,
    rollback_lr_factor: float = 0.5,
) -> StepParts:
    """The step's pieces. The forward is the custom forward (in DDP under torchrun) inside the
    precision's autocast, with cached vision features when ``cache`` is given; ``run_forward``
    replaces it (the benchmark's native baseline). ``guard``: a policy name (numerics.POLICIES)
    or a ready policy object. ``scaler``: a restored GradScaler (default: a new one for the precision)."""
    device = torch.device(device)
    trainer = None
    if run_forward is None:
        trainer = distributed.wrap(model, device)  # custom_forward as a module; DDP under torchrun

        def run_forward(batch):  # the localiser re-runs a failing batch exactly like the step does
            with precision.autocast(precision_name, device):  # cached features: same autocast as the forward
                batch = feature_cache.attach_cached_features(model, batch, cache)
                return trainer(batch, reduction="sum")

    if isinstance(guard, str):
        guard = numerics.Guard(
            guard,
            model,
            optimizer,
            scheduler,
            run_forward=run_forward,
            max_rollbacks=max_rollbacks,
            rollback_lr_factor=rollback_lr_factor,
            on_event=on_event,
        )
    scaler = scaler if scaler is not None else precision.grad_scaler(precision_name, device)
    return StepParts(model, run_forward, optimizer, scheduler, scaler, guard, device, max_grad_norm, trainer)


def training_step(parts: StepParts, group: list[dict], index: int) -> StepResult:
    """One optimizer step over ``group`` (micro-batches already on the device); ``index``: the
    optimizer step it would be, for diagnoses. Raises numerics.NonFiniteError per the guard."""
    inputs_ok = parts.guard.inputs_ok(group, index)
    # totals over all processes under torchrun (one all-reduce): every rank skips the same
    # groups, and the loss is normalised by the global target count
    bad_inputs, tokens, samples = distributed.all_sum(
        [
            int(not inputs_ok),
            sum(forward.target_count(b) for b in group),
            sum(distributed.sample_count(b) for b in group),
        ],
        parts.device,
    )
    result = StepResult("inputs", tokens, samples)
    if bad_inputs:
        return result
    for i, batch in enumerate(group):
        with distributed.accumulating(parts.trainer, last=i == len(group) - 1):
            out = parts.run_forward(batch)
            # x processes: DDP averages the ranks' gradients, this makes the average their sum
            loss = out.loss / tokens * distributed.world_size()
            parts.scaler.scale(loss).backward()
        result.batch_losses.append(float(out.loss.detach()))
    (result.loss_sum,) = distributed.all_sum([sum(result.batch_losses)], parts.device)
    parts.scaler.unscale_(parts.optimizer)
    # leaves non-finite gradients as they are, so the localiser can name the first one
    result.grad_norm = numerics.clip_gradients(parts.params, parts.max_grad_norm)
    result.action = "step"
    if not (math.isfinite(result.loss_sum) and bool(torch.isfinite(result.grad_norm))):
        result.action = parts.guard.non_finite(
            index, group, result.batch_losses, result.grad_norm, parts.scaler.is_enabled()
        )
        if result.action == "skip":
            parts.optimizer.zero_grad(set_to_none=True)
            return result
    else:
        parts.guard.healthy()  # rollback's snapshot: the state this finite step was computed from
    scale = parts.scaler.get_scale() if parts.scaler.is_enabled() else None
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    result.scaler_skipped = scale is not None and parts.scaler.get_scale() < scale  # a skip halves the scale
    return result
