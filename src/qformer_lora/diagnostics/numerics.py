"""Numerics: why the seed's training went NaN, where a non-finite value first appears, what to do.

Root cause of the seed's problem 3 (loss finite at step 0, NaN at every later step,
whatever the learning rate, rank, clipping or warm-up). Each link is checked by
``tests/stability/test_seed_nan.py`` on a tiny preset:

1. PEFT initialises ``lora_B`` to zero, so the adapter's output ``B @ A @ x`` is zero and
   ``d loss / d lora_A = B^T (...) = 0`` *exactly* at step 0 (``lora_B`` gets a non-zero gradient).
2. AdamW's moments for every ``lora_A`` after step 0 are therefore ``exp_avg = 0`` and
   ``exp_avg_sq = 0``; the update is ``exp_avg / (sqrt(exp_avg_sq) / bc2 + eps)``.
3. With the adapters (and so the optimizer state) in fp16, ``eps = 1e-8`` is below fp16's
   smallest subnormal (2**-24 ~ 5.96e-8) and rounds to 0: ``torch.tensor(1e-8,
   dtype=torch.float16) == 0``. The update is ``0 / (0 + 0) = NaN``; every ``lora_A`` becomes
   NaN after the first ``optimizer.step()``, and every later forward is NaN. The learning
   rate multiplies NaN (``lr * NaN = NaN``, also ``0 * NaN`` during warm-up), clipping
   rescales a gradient that is already zero, and the rank only changes how many NaNs.
4. The same optimizer step also breaks ``lora_B``: ``exp_avg_sq = (1 - beta2) g**2 = 1e-3 g**2``
   underflows to 0 in fp16 for ``|g| < ~5.5e-3`` while ``exp_avg = 0.1 g`` mostly does not, so
   those entries get ``m / 0 = inf`` (``0 / 0 = NaN`` where ``0.1 g`` underflows too); clipping
   to 0.1 makes more gradients that small.

Which set-ups have fp16 adapters + fp16 AdamW state (FINDINGS.md (d), ``compat.peft_default_adapter_dtype``):
an fp16 base wrapped by peft 0.7-0.11 (LoRA layers created in the base dtype); any peft when
``model.half()`` is called after ``get_peft_model`` (a common recipe) or with
``autocast_adapter_dtype=False``; peft 0.5/0.6 and >= 0.12 upcast adapters to fp32 by default.
The optimizer implementation matters too: torch's for-loop (the CPU default) and foreach
(the CUDA default) AdamW compute in the parameter dtype and produce the NaN; ``fused=True``
computes in fp32 and keeps eps, so it stays finite (its fp16 ``exp_avg_sq`` still underflows,
which turns small-gradient updates into ``m / eps``: finite but meaningless).

The fix is not a hyperparameter: keep adapters and optimizer state in fp32 (``fp16-amp``,
``bf16`` or ``fp32`` here); :mod:`qformer_lora.diagnostics.doctor` refuses the broken combination.

This module also holds the tools that found it: ``Diagnosis`` (what went non-finite first),
``localise`` (re-runs a failing batch with forward hooks; costs nothing while training is
healthy) and ``Guard`` (the ``raise | skip | rollback`` policies of ``train.train``).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import asdict, dataclass, field

import torch

from .. import compat

FP16_SMALLEST_SUBNORMAL = 2.0**-24  # every positive value below half of this rounds to 0 in fp16
KINDS = ("input", "parameter", "loss", "gradient")
POLICIES = ("raise", "skip", "rollback")


def rounds_to_zero(value: float, dtype: torch.dtype) -> bool:
    """True when a non-zero ``value`` becomes 0 once stored in ``dtype`` (1e-8 in fp16: True)."""
    return value != 0 and float(torch.tensor(value, dtype=dtype)) == 0.0


# ----------------------------------------------------------------------------- the diagnosis


@dataclass
class Diagnosis:
    """The first non-finite value of a failing step, in the order a reader would look for it."""

    step: int
    kind: str  # input | parameter | loss | gradient (see KINDS)
    first_module: str | None = None  # first module, in execution order, with a non-finite output
    first_parameter: str | None = None  # first non-finite parameter in named_parameters order
    first_gradient: str | None = None  # first non-finite gradient in named_parameters order
    sample_ids: list[str] = field(default_factory=list)
    loss: float | None = None
    grad_norm: float | None = None
    message: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown diagnosis kind {self.kind!r}; expected one of {KINDS}")
        if not self.message:
            self.message = self.describe()

    def describe(self) -> str:
        parts = [f"non-finite {self.kind} at optimizer step {self.step}"]
        for label, value in (("loss", self.loss), ("gradient norm", self.grad_norm)):
            if value is not None:
                parts.append(f"{label} {value}")
        for label, value in (
            ("first non-finite module output", self.first_module),
            ("first non-finite parameter", self.first_parameter),
            ("first non-finite gradient", self.first_gradient),
        ):
            if value is not None:
                parts.append(f"{label}: {value}")
        if self.sample_ids:
            parts.append(f"samples: {', '.join(self.sample_ids)}")
        return "; ".join(parts)


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite input, loss, gradient or parameter; ``.diagnosis`` says where."""

    def __init__(self, diagnosis: Diagnosis, note: str = ""):
        super().__init__(diagnosis.message + (f" ({note})" if note else ""))
        self.diagnosis = diagnosis


class ZeroGradientError(RuntimeError):
    """An optimizer step whose trainable parameters all got exactly zero gradient (or none): finite, so no
    NonFiniteError, but the step cannot move the adapter and a run of them trains nothing while exiting 0."""

    def __init__(self, step: int, tensors: int, note: str = ""):
        super().__init__(
            f"zero gradient at optimizer step {step}: every trainable adapter parameter ({tensors} tensors) got "
            f"exactly zero gradient (norm 0.0), so the step cannot change the adapter"
            + (f" ({note})" if note else "")
            + ". Likely causes: a frozen path between the adapters and the loss that cuts the graph (a quantized "
            "language-model kernel without a backward: quantization.probe_kernels; a detach or no_grad around the "
            "Q-Former's output), or labels that leave no answer token reaching the adapters"
        )
        self.step = step


# ----------------------------------------------------------------------------- finite checks


def _floating_tensors(value):
    """Floating-point tensors inside a module output (tensor, tuple, list, dict, ModelOutput)."""
    if torch.is_tensor(value):
        if value.is_floating_point() or value.is_complex():
            yield value
    elif isinstance(value, dict):  # transformers' ModelOutput is an OrderedDict
        for item in value.values():
            yield from _floating_tensors(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _floating_tensors(item)


def all_finite(value) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _floating_tensors(value))


def batch_ids(batch: dict, rows=None) -> list[str]:
    """Sample ids of ``rows`` (all rows by default); synthetic batches without ids get 'row i'."""
    size = batch["pixel_values"].shape[0]
    rows = range(size) if rows is None else rows
    ids = batch.get("ids")
    return [str(ids[i]) if ids is not None else f"row {i}" for i in rows]


def check_inputs(batch: dict, step: int) -> Diagnosis | None:
    """One isfinite().all() on pixel_values; a Diagnosis naming the bad samples, else None."""
    pixels = batch["pixel_values"]
    if bool(torch.isfinite(pixels).all()):
        return None
    bad = (~torch.isfinite(pixels)).flatten(1).any(dim=1).nonzero().flatten().tolist()
    return Diagnosis(step, "input", first_module="pixel_values", sample_ids=batch_ids(batch, bad))


def first_non_finite_parameter(model, trainable_only: bool = False) -> str | None:
    for name, param in model.named_parameters():
        if (param.requires_grad or not trainable_only) and not bool(torch.isfinite(param).all()):
            return name
    return None


def first_non_finite_gradient(model) -> str | None:
    for name, param in model.named_parameters():
        if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
            return name
    return None


def clip_gradients(params, max_norm: float | None) -> torch.Tensor:
    """``clip_grad_norm_`` that leaves the gradients untouched when their norm is non-finite.

    torch's version multiplies every gradient by ``max_norm / norm``: one NaN gradient makes
    them all NaN and hides which one it was. Same cost while healthy (one call).
    """
    params = list(params)
    try:
        return torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"), error_if_nonfinite=True)
    except RuntimeError:
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g).to(grads[0].device) for g in grads]))
        if bool(torch.isfinite(norm)):
            raise  # not the non-finite-norm error
        return norm


@contextlib.contextmanager
def watch_outputs(model):
    """Record the first module (execution order) whose output, or the LM's inputs_embeds, is non-finite.

    Forward hooks fire when a module finishes, so the first hit is the innermost module
    that produced the value (``...query.lora_A.default`` rather than the whole Q-Former).
    """
    found: dict[str, str] = {}
    handles = []

    def output_hook(name):
        def hook(module, args, output):
            if not found and not all_finite(output):
                found["module"] = name

        return hook

    def embeds_hook(module, args, kwargs):
        # inputs_embeds is built by torch.cat in forward.embed_inputs, not by a module
        if not found and not all_finite(kwargs.get("inputs_embeds")):
            found["module"] = "language_model input inputs_embeds (query projection + text embeddings)"

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_hook(output_hook(name or "<model>")))
        language_model = getattr(compat.unwrap(model), "language_model", None)
        if language_model is not None:
            handles.append(language_model.register_forward_pre_hook(embeds_hook, with_kwargs=True))
        yield found
    finally:
        for handle in handles:
            handle.remove()


def localise(model, batches: list[dict], step: int, run_forward, *, losses=None, grad_norm=None) -> Diagnosis:
    """Diagnose a failing step: inputs, then parameters and gradients, then a hooked re-run.

    ``run_forward(batch)`` repeats the training forward (same autocast); it runs under
    no_grad, batches with a non-finite loss first. Only called once a cheap check fired.
    """
    losses = list(losses) if losses is not None else [None] * len(batches)
    for batch in batches:
        diagnosis = check_inputs(batch, step)
        if diagnosis is not None:
            return diagnosis
    first_parameter = first_non_finite_parameter(model)
    first_gradient = first_non_finite_gradient(model)
    order = sorted(range(len(batches)), key=lambda i: losses[i] is None or math.isfinite(losses[i]))
    first_module, ids = None, []
    for i in order:
        with torch.no_grad(), watch_outputs(model) as found:
            rerun_loss = run_forward(batches[i]).loss
        if found or not bool(torch.isfinite(rerun_loss)):
            first_module, ids = found.get("module"), batch_ids(batches[i])
            break
    loss = sum(v for v in losses if v is not None) if any(v is not None for v in losses) else None
    loss_bad = loss is not None and not math.isfinite(loss)
    kind = "parameter" if first_parameter else "loss" if (loss_bad or first_module) else "gradient"
    norm = None if grad_norm is None else float(grad_norm)
    diagnosis = Diagnosis(step, kind, first_module, first_parameter, first_gradient, ids, loss, norm)
    if kind == "gradient" and first_gradient is None:
        diagnosis.message += "; every gradient is finite: their norm overflowed the gradient dtype (use fp32 adapters)"
    return diagnosis


# ----------------------------------------------------------------------------- guard policies


class Guard:
    """What the training loop does when a cheap finite check fires: raise, skip or roll back.

    The loop calls ``inputs_ok`` per accumulation group (one isfinite per batch), ``healthy``
    after a finite step and before ``optimizer.step`` (the rollback snapshot: the state
    just verified finite), and ``non_finite`` when the loss or gradient norm is not
    finite; it returns "skip" (drop this group's gradients) or "scaler" (fp16-amp
    gradient overflow with finite loss and parameters: let GradScaler skip the step
    and lower its scale, as it was built to). Everything else ends in NonFiniteError.
    """

    def __init__(
        self,
        policy: str,
        model,
        optimizer,
        scheduler=None,
        *,
        run_forward=None,
        max_rollbacks: int = 3,
        rollback_lr_factor: float = 0.5,
        on_event=None,
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown guard policy {policy!r}; expected one of {POLICIES}")
        self.policy, self.model, self.optimizer, self.scheduler = policy, model, optimizer, scheduler
        self.run_forward = run_forward
        self.max_rollbacks, self.rollback_lr_factor = max_rollbacks, rollback_lr_factor
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.rollbacks, self.skipped = 0, 0
        self.events: list[dict] = []  # one per intervention; on_event(record) also gets each (metrics.jsonl)
        self.on_event = on_event
        self._snapshot: dict | None = None
        # once, before the first step (one pass over the weights): no policy can train a model
        # built or loaded with non-finite weights, and the loop's cheap checks assume it is finite
        parameter = first_non_finite_parameter(model)
        if parameter is not None:
            raise NonFiniteError(
                Diagnosis(0, "parameter", first_parameter=parameter),
                "before the first step: the model was built or loaded with non-finite weights",
            )
        if policy == "rollback":
            self.healthy()  # the initial adapter is a state to return to

    # -- cheap checks, called every step
    def inputs_ok(self, batches: list[dict], step: int) -> bool:
        for batch in batches:
            diagnosis = check_inputs(batch, step)
            if diagnosis is not None:
                if self.policy == "raise":
                    raise NonFiniteError(diagnosis)
                # bad data: nothing in the model is broken, so skip it (rollback would undo good steps)
                self._record("skip", diagnosis)
                return False
        return True

    def healthy(self) -> None:
        """Snapshot adapter parameters and optimizer state (rollback only), reusing buffers."""
        if self.policy != "rollback":
            return
        old = self._snapshot or {}
        snapshot = {}
        for p in self.params:
            entry = old.get(p)
            param_copy = entry[0].copy_(p.detach()) if entry else p.detach().clone()
            state = {}
            for key, value in self.optimizer.state.get(p, {}).items():
                previous = entry[1].get(key) if entry else None
                if torch.is_tensor(value):
                    same = previous is not None and previous.shape == value.shape and previous.dtype == value.dtype
                    state[key] = previous.copy_(value) if same else value.detach().clone()
                else:
                    state[key] = value
            snapshot[p] = (param_copy, state)
        self._snapshot = snapshot

    # -- called only when the cheap check fired
    def non_finite(self, step: int, batches: list[dict], losses, grad_norm, scaler_enabled: bool = False) -> str:
        loss_finite = all(math.isfinite(v) for v in losses)
        if scaler_enabled and loss_finite:
            parameter = first_non_finite_parameter(self.model, trainable_only=True)
            if parameter is None:
                return "scaler"  # an fp16 gradient overflow: GradScaler's own business
        diagnosis = localise(self.model, batches, step, self.run_forward, losses=losses, grad_norm=grad_norm)
        return self.handle(diagnosis)

    def handle(self, diagnosis: Diagnosis) -> str:
        """Apply the policy to a diagnosis; returns "skip" or raises NonFiniteError."""
        if self.policy == "raise":
            raise NonFiniteError(diagnosis)
        if diagnosis.kind == "parameter" and diagnosis.first_parameter not in self._trainable_names():
            raise NonFiniteError(
                diagnosis,
                f"guard={self.policy} cannot continue: a frozen base-model "
                f"parameter is non-finite, no policy can repair it",
            )
        if self.policy == "skip":
            if diagnosis.kind == "parameter":
                # skipping cannot repair the weights: every later batch would be skipped too
                raise NonFiniteError(
                    diagnosis,
                    "guard=skip cannot continue: the parameters themselves are non-finite, every later step would fail",
                )
            self._record("skip", diagnosis)
            return "skip"
        if diagnosis.kind == "input":
            self._record("skip", diagnosis)
            return "skip"
        if self._snapshot is None:
            raise NonFiniteError(diagnosis, "guard=rollback has no finite state to return to")
        if self.rollbacks >= self.max_rollbacks:
            raise NonFiniteError(
                diagnosis,
                f"guard=rollback gave up after {self.rollbacks} rollback(s) (max_rollbacks={self.max_rollbacks})",
            )
        self.restore()
        self.rollbacks += 1
        self._scale_lr(self.rollback_lr_factor)
        self._record("rollback", diagnosis)
        return "skip"

    def check_parameters(self, step: int) -> None:
        """Before evaluation and checkpoints: never save or evaluate non-finite adapters."""
        parameter = first_non_finite_parameter(self.model, trainable_only=True)
        if parameter is not None:
            self.handle(Diagnosis(step, "parameter", first_parameter=parameter))

    def restore(self) -> None:
        for p, (param_copy, state) in self._snapshot.items():
            p.data.copy_(param_copy)
            p.grad = None
            if state:
                self.optimizer.state[p] = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
            else:  # snapshot taken before the first step: AdamW starts its moments afresh
                self.optimizer.state.pop(p, None)

    def _trainable_names(self) -> set[str]:
        ids = {id(p) for p in self.params}
        return {name for name, p in self.model.named_parameters() if id(p) in ids}

    def _scale_lr(self, factor: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
        if self.scheduler is not None:  # LambdaLR recomputes lr from base_lrs at every step
            self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]

    def _record(self, action: str, diagnosis: Diagnosis) -> None:
        self.skipped += action == "skip"
        lr = self.optimizer.param_groups[0]["lr"]
        self.events.append(
            {
                "type": "guard",
                "action": action,
                "step": diagnosis.step,
                "lr": lr,
                "rollbacks": self.rollbacks,
                "diagnosis": asdict(diagnosis),
            }
        )
        if self.on_event is not None:
            self.on_event(self.events[-1])
        warnings.warn(
            f"{diagnosis.message}; guard={self.policy}: {action}"
            + (f" (lr now {lr:.3g}, rollback {self.rollbacks}/{self.max_rollbacks})" if action == "rollback" else ""),
            RuntimeWarning,
            stacklevel=3,  # pragma: no mutate (mutmut's trampolines add frames: tests/unit/test_numerics.py)
        )
