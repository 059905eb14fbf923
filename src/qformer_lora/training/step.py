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
   (skip the group, let GradScaler skip the step, or raise with a diagnosis); a finite norm of
   exactly 0.0 (no adapter gradient anywhere: the graph is cut) raises numerics.ZeroGradientError;
6. optimizer step, scaler update, scheduler step, zero_grad.

Each of 1, 3 and 5 reads a device value on the host, and on a GPU each read waits for the
device to finish the work queued so far (a host sync). With deferred host reads
(``make_step(sync_every=N)``, the ``sync_every`` option) the same step reads nothing:
:func:`deferred_step` keeps the micro-batch losses, the gradient norm and one finite flag
(inputs, loss and norm) on the device, and fused AdamW takes that flag as ``found_inf``, so a
non-finite step is skipped on the device, exactly (parameters and optimizer state untouched,
AdamW's step count undone: the mechanism GradScaler uses with fused optimizers). The loop
reads the steps of a logging interval at once (:func:`read_steps`: one ``.tolist()``),
and the guard acts there: ``skip`` was already exact, ``raise`` raises naming the first
non-finite step, ``rollback`` needs a host decision before every step and is refused. The
schedule counts attempted steps in that mode: the host cannot know a step was skipped
without the read that mode removes (:func:`deferred_step` says what that changes).

Dividing by the group's token count (not averaging per micro-batch) makes batch 8 x 1 and
batch 2 x 4 follow one loss curve. :func:`make_step` builds the pieces the same way for
every caller; :func:`linear_warmup_decay` is the schedule training uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import compat, forward, precision
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
    deferred: bool = False  # deferred host reads: training_step is deferred_step (check_deferred)
    cudagraphs: bool = False  # compiled with CUDA graphs (compile_mode reduce-overhead): each step marks its start

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
    grad_norm: torch.Tensor | float | None = None  # a float when read from a deferred step
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
    deferred: bool = False,
    cudagraphs: bool = False,
) -> StepParts:
    """The step's pieces. The forward is the custom forward (in DDP under torchrun) inside the
    precision's autocast, with cached vision features when ``cache`` is given; ``run_forward``
    replaces it (the benchmark's native baseline). ``guard``: a policy name (numerics.POLICIES)
    or a ready policy object. ``scaler``: a restored GradScaler (default: a new one for the precision).
    ``deferred``: deferred host reads (the module docstring); ValueError where they cannot be exact.
    ``cudagraphs``: parts of the step run as CUDA graphs (step_options.compile_mode_kwargs); every step
    then tells them a new step starts (the last step's graph outputs are no longer read)."""
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
    parts = StepParts(model, run_forward, optimizer, scheduler, scaler, guard, device, max_grad_norm, trainer)
    parts.cudagraphs = cudagraphs
    if deferred:
        check_deferred(parts)
        parts.deferred = True
    return parts


def check_deferred(parts: StepParts) -> None:
    """ValueError naming the option when deferred host reads cannot keep the guard exact here."""
    why = []
    if getattr(parts.guard, "policy", None) not in ("raise", "skip"):
        why.append(
            "guard=rollback decides on the host before every step whether to restore the last finite state; "
            "use guard=skip (skipped on the device, exact) or guard=raise (raises at the next read, naming the step)"
        )
    if not all(group.get("fused") for group in parts.optimizer.param_groups):
        why.append(
            "the non-finite step is skipped on the device by fused AdamW's found_inf; this optimizer is not "
            "fused (fused_optimizer=true, on a device torch has a fused AdamW kernel for)"
        )
    if parts.scaler.is_enabled():
        why.append(
            "fp16-amp's GradScaler skips gradient overflows itself and the guard tells them from bad data "
            "on the host; use bf16 or fp32"
        )
    if distributed.world_size() > 1:
        why.append("the token and loss totals over processes are all-reduced on the host; run one process")
    if why:
        raise ValueError("deferred host reads (sync_every > 0) refused: " + "; ".join(why))


def training_step(parts: StepParts, group: list[dict], index: int) -> StepResult | PendingStep:
    """One optimizer step over ``group`` (micro-batches already on the device); ``index``: the
    optimizer step it would be, for diagnoses. Raises numerics.NonFiniteError per the guard, and
    numerics.ZeroGradientError when the adapter gradients are all exactly zero (their norm finite and 0.0).
    With deferred host reads (``parts.deferred``) it is :func:`deferred_step`: a PendingStep."""
    if parts.cudagraphs:  # CUDA graph trees cannot tell a step's start from a second micro-batch
        compat.cudagraph_mark_step_begin()
    if parts.deferred:
        return deferred_step(parts, group, index)
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
    elif float(result.grad_norm) == 0.0:  # the finite check above already waited for the norm: no new sync
        raise numerics.ZeroGradientError(index, len(parts.params))
    else:
        parts.guard.healthy()  # rollback's snapshot: the state this finite step was computed from
    scale = parts.scaler.get_scale() if parts.scaler.is_enabled() else None
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    result.scaler_skipped = scale is not None and parts.scaler.get_scale() < scale  # a skip halves the scale
    return result


# ----------------------------------------------------------------------------- deferred host reads


@dataclass
class PendingStep:
    """A deferred step whose results are still on the device; :func:`read_steps` reads them."""

    index: int  # the optimizer step it was (the schedule counts it, skipped or not)
    samples: int
    lr: float  # the scheduler's last lr after the step (the schedule lives on the host)
    # float64, on the device: [inputs finite (1/0), answer tokens, gradient norm, loss of each micro-batch]
    values: torch.Tensor


def deferred_step(parts: StepParts, group: list[dict], index: int) -> PendingStep:
    """:func:`training_step` without a host read: the same forward, backward, clipping and AdamW
    update, so finite steps give bitwise the same parameters and losses (a test).

    Non-finite pixel_values, loss or gradient norm set ``found_inf``: fused AdamW then leaves
    parameters and moments as they were and takes back its step count increment. The scheduler
    steps anyway: knowing the step was skipped would take the read this mode removes, so the
    schedule counts attempted steps (a skipped step moves the later steps' learning rates one
    step along the schedule, and the run ends where the schedule does). Single process,
    guard raise or skip, fused AdamW, no GradScaler (:func:`check_deferred`).
    """
    # device-side totals: pixel checks and token counts as 0-dim tensors, never read here
    inputs_finite = torch.stack([torch.isfinite(b["pixel_values"]).all() for b in group]).all()
    tokens = torch.stack([(b["labels"] != forward.IGNORE_INDEX).sum() for b in group]).sum()
    losses = []
    for batch in group:
        out = parts.run_forward(batch)
        (out.loss / tokens * distributed.world_size()).backward()  # as training_step: x 1 process
        losses.append(out.loss.detach())
    # as numerics.clip_gradients while finite; a non-finite norm makes the gradients NaN, never applied
    grad_norm = torch.nn.utils.clip_grad_norm_(parts.params, parts.max_grad_norm or float("inf"))
    losses = torch.stack(losses).to(torch.float64)
    finite = inputs_finite & torch.isfinite(losses.sum()) & torch.isfinite(grad_norm)
    parts.optimizer.found_inf = (~finite).to(torch.float32)  # what fused AdamW's step() passes to its kernel
    try:
        parts.optimizer.step()
    finally:
        del parts.optimizer.found_inf
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    head = torch.stack([inputs_finite.to(torch.float64), tokens.to(torch.float64), grad_norm.to(torch.float64)])
    samples = sum(distributed.sample_count(b) for b in group)
    return PendingStep(index, samples, parts.scheduler.get_last_lr()[0], torch.cat([head, losses]))


def read_steps(parts: StepParts, pending: list[PendingStep]) -> list[StepResult]:
    """The pending steps' results, read in one ``.tolist()``; the guard acts on the non-finite ones,
    in order: "raise" raises numerics.NonFiniteError naming the first, "skip" records each
    (action "inputs" for non-finite pixel_values, "skip" otherwise). Either raises when the
    parameters are non-finite (no step repairs that). A finite step whose gradient norm is exactly 0.0
    raises numerics.ZeroGradientError naming it (AdamW has already taken it and the steps up to the read)."""
    if not pending:
        return []
    flat = torch.cat([p.values for p in pending]).tolist()
    results, at = [], 0
    for step in pending:
        size = step.values.shape[0]
        finite_inputs, tokens, grad_norm, *losses = flat[at : at + size]
        at += size
        result = StepResult("step", int(tokens), step.samples, sum(losses), losses, grad_norm)
        if not (finite_inputs and math.isfinite(result.loss_sum) and math.isfinite(grad_norm)):
            result.action = _deferred_non_finite(parts, step, result, bool(finite_inputs), pending[-1].index)
        elif grad_norm == 0.0:  # AdamW already took the step (a zero gradient still decays the moments)
            note = f"found by the deferred host read after optimizer step {pending[-1].index}"
            raise numerics.ZeroGradientError(step.index, len(parts.params), note)
        results.append(result)
    return results


def _deferred_non_finite(parts: StepParts, step: PendingStep, result: StepResult, inputs_ok: bool, last: int):
    """The guard's verdict on a deferred step found non-finite at the read after step ``last``:
    diagnosed from what was read (the batches are gone, so no localising re-run)."""
    parameter = numerics.first_non_finite_parameter(parts.model)
    if parameter is not None:
        diagnosis = numerics.Diagnosis(step.index, "parameter", first_parameter=parameter)
    else:
        kind = "gradient" if inputs_ok and math.isfinite(result.loss_sum) else "loss" if inputs_ok else "input"
        loss = result.loss_sum if kind != "input" else None
        diagnosis = numerics.Diagnosis(step.index, kind, loss=loss, grad_norm=result.grad_norm)
    diagnosis.message += (
        f"; found by the deferred host read after optimizer step {last}: fused AdamW skipped step "
        f"{step.index} on the device (parameters and optimizer state unchanged)"
    )
    parts.guard.handle(diagnosis)  # raises, or records the skip
    return "skip" if inputs_ok else "inputs"
