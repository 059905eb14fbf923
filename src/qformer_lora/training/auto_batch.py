"""``--batch-size auto``: the largest micro-batch whose training step fits the device's memory.

Read :func:`resolve` (the hook train.setup calls once the model and data are built), then
:func:`choose` (the decision, pure: it only calls the ``peak_of`` it is given):

1. two probe steps at PROBE_BATCHES: real training steps (training/step.py, the run's own
   precision, checkpointing, optimizer and guard) on the run's first training samples, padded to
   the run's token budgets (the widest batch the run can meet), each measuring the CUDA
   allocator's peak;
2. the line through the two peaks, ``peak = a + b * batch`` in bytes (the memory model
   bench/capacity.py fits over a sweep), solved for MARGIN x the budget: what the card has free
   when the run starts (plus what this process's allocator already holds), or
   ``--memory-budget-gib``; never more than the training set holds (per process);
3. one confirming step at that batch. If it runs out of memory or peaks above the margined
   budget, bisection between the largest batch seen to fit and it, one step each, and the log
   says so.

The probes leave the run as they found it (adapter weights restored, random state forked, a
throwaway optimizer): a run with ``auto`` trains exactly as one given the batch it chose. Auto
picks the micro-batch; ``--grad-accum`` multiplies it as it does a given batch, and gradients
accumulate into the same buffers, so one micro-batch's step is the memory to measure.

Refused, with the reason: on a CPU (torch measures no per-step peak of host memory, which the
process shares with everything else), under torchrun (each process would probe alone and could
choose another batch). A resumed run keeps its checkpoint's batch size, so it replays the same
batches. :func:`is_oom` is also the benchmark's out-of-memory test (bench/device.py).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import torch

from .. import checkpoint, inputs, lora
from . import distributed, step_options
from .run_config import AUTO_BATCH, ConfigError, TrainConfig
from .step import linear_warmup_decay, make_step, training_step

GIB = 1024**3
# Small enough that both fit a 24 GiB card with full-size InstructBLIP-FlanT5-XL in fp32 weights
# (19 fit, reports/gpu/README.md), 4x apart for the slope: on the H200 the line through batches
# 1-16 predicted batch 64's peak within 1.7 %.
PROBE_BATCHES = (2, 8)
# The margined budget the predicted and the confirmed peak must stay within. 0.9: the linear
# model predicted a max batch 2.1 % too high on the H200 (49 where 48 ran under a 24 GiB cap),
# and the allocator reserves more than the allocated peak it fits (fragmentation, cuBLAS
# workspaces); 10 % covers both with room, and costs at most a tenth of the batch.
MARGIN = Fraction(9, 10)


def _gib(n_bytes) -> str:
    return f"{float(n_bytes) / GIB:.2f} GiB"


@dataclass
class AutoBatch:
    """What --batch-size auto chose and why; :meth:`record` is its log record (bytes throughout)."""

    batch_size: int
    budget_bytes: int
    budget_from: str  # "free memory on cuda:0" or "--memory-budget-gib"
    margin: float
    probes: list = field(default_factory=list)  # [batch, peak bytes or None (out of memory)]
    fit: dict | None = None  # {"a_bytes", "b_bytes_per_sample"}; None when a probe did not fit
    predicted: int | None = None  # the largest batch the fit allows, before the data's limit
    limit: int | None = None  # the training samples per process: no micro-batch is larger
    confirmations: list = field(default_factory=list)  # [batch, peak bytes or None], in order
    backed_off: bool = False  # the first confirmed batch (or a probe) did not fit

    def describe(self) -> str:
        """One line: the chosen batch, the fit, the margined budget and how it was confirmed."""
        target = float(Fraction(str(self.margin)) * self.budget_bytes)
        budget = f"{self.margin:g} x {_gib(self.budget_bytes)} ({self.budget_from}) = {_gib(target)}"
        sizes = " and ".join(str(n) for n, _ in self.probes)
        if self.fit:
            a, b = self.fit["a_bytes"], self.fit["b_bytes_per_sample"]
            how = f"peak = {_gib(a)} + {_gib(b)} x batch from probe steps at {sizes}; predicted {self.predicted}"
        else:
            how = f"probe steps at {sizes} did not both fit, no fit"
        if self.limit is not None and (self.predicted is None or self.predicted > self.limit):
            how += f", capped at the {self.limit} training samples"
        first, peak = self.confirmations[0] if self.confirmations else (None, None)
        if not self.backed_off:
            checked = f"confirmed by a step at {first} peaking at {_gib(peak)}"
        else:
            failed = [n for n, p in self.confirmations + self.probes if p is None or p > target]
            checked = (
                f"batch {min(failed)} did not fit, backed off by bisection to {self.batch_size} "
                f"({len(self.confirmations)} confirming steps)"
            )
        return f"--batch-size auto chose {self.batch_size}: {how}; budget {budget}; {checked}"

    def record(self) -> dict:
        return {"type": "auto_batch", **asdict(self), "why": self.describe()}


def choose(
    peak_of: Callable[[int], int | None],
    budget_bytes: int,
    *,
    margin=MARGIN,
    probe_batches: tuple[int, int] = PROBE_BATCHES,
    limit: int | None = None,
    budget_from: str = "",
) -> AutoBatch:
    """The largest batch whose step peaks within ``margin`` x ``budget_bytes``, as the module docstring says.

    ``peak_of(n)``: the peak device memory of one training step at batch ``n`` in bytes, None
    when it ran out of memory (one real step per call). ``limit``: no batch above it (the
    training samples per process). Raises ConfigError when batch 1 does not fit, or when memory
    does not grow from one probe to the other (no line to extrapolate)."""
    target = Fraction(str(margin)) * budget_bytes
    chosen = AutoBatch(0, budget_bytes, budget_from, float(margin), limit=limit)

    def ok(peak) -> bool:
        return peak is not None and peak <= target

    for n in probe_batches:
        if limit is not None and n >= limit:
            break  # the limit itself is confirmed below
        chosen.probes.append([n, peak_of(n)])
        if not ok(chosen.probes[-1][1]):
            break  # a larger probe would not fit either
    fitting = [n for n, peak in chosen.probes if ok(peak)]
    lo, hi = max(fitting, default=0), None
    if len(fitting) < len(chosen.probes):  # a probe failed: bisect below it
        hi, chosen.backed_off = chosen.probes[-1][0], True
    else:
        candidate = limit
        if len(fitting) == len(probe_batches):
            chosen.fit, chosen.predicted = _fit(chosen.probes, target)
            candidate = chosen.predicted if limit is None else min(chosen.predicted, limit)
        chosen.confirmations.append([candidate, peak_of(candidate)])
        if not ok(chosen.confirmations[-1][1]):
            hi, chosen.backed_off = candidate, True
    while hi is not None and hi - lo > 1:  # lo fits (0: nothing seen to), hi does not
        mid = (lo + hi) // 2
        chosen.confirmations.append([mid, peak_of(mid)])
        lo, hi = (mid, hi) if ok(chosen.confirmations[-1][1]) else (lo, mid)
    chosen.batch_size = lo if hi is not None else chosen.confirmations[-1][0]
    if chosen.batch_size < 1:
        peaks = ", ".join(f"batch {n}: {'out of memory' if p is None else _gib(p)}" for n, p in chosen.probes)
        raise ConfigError(
            f"--batch-size auto: not even batch 1 fits in {float(margin):g} x {_gib(budget_bytes)} "
            f"({budget_from}) ({peaks or 'batch 1: out of memory'}); free memory on the device, or lower it "
            "with --lm-checkpointing true, --precision bf16 or shorter --max-prompt-tokens"
        )
    return chosen


def _fit(probes: list, target: Fraction) -> tuple[dict, int]:
    """The line through the two probes' peaks and the largest batch it puts within ``target`` (exact)."""
    (n1, p1), (n2, p2) = probes
    b = Fraction(p2 - p1, n2 - n1)
    a = p1 - b * n1
    if b <= 0:
        raise ConfigError(
            f"--batch-size auto: the peak memory did not grow from batch {n1} ({_gib(p1)}) to {n2} "
            f"({_gib(p2)}), so there is no line to extrapolate; give --batch-size a number"
        )
    return {"a_bytes": float(a), "b_bytes_per_sample": float(b)}, math.floor((target - a) / b)


# ----------------------------------------------------------------------------- the device


def is_oom(err: BaseException) -> bool:
    # cuBLAS / cuDNN report a failed workspace allocation as their own status, not as an OOM
    message = str(err)
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and ("out of memory" in message.lower() or "_STATUS_ALLOC_FAILED" in message)
    )


class CudaMemory:
    """The CUDA allocator as --batch-size auto reads it: the budget, and the peak of one step."""

    def __init__(self, device: torch.device, budget_gib: float | None = None):
        self.device, self.budget_gib = device, budget_gib

    def release(self) -> None:
        gc.collect()  # an out-of-memory traceback holds the step's tensors
        torch.cuda.empty_cache()

    def budget(self) -> tuple[int, str]:
        """(bytes, where from): what the card has free plus what this process's allocator holds
        (the model's weights are in both that and every measured peak), or --memory-budget-gib."""
        self.release()
        free, _total = torch.cuda.mem_get_info(self.device)
        usable = free + torch.cuda.memory_reserved(self.device)
        if self.budget_gib is None:
            return usable, f"free memory on {self.device}"
        if self.budget_gib * GIB > usable:
            raise ConfigError(
                f"--memory-budget-gib {self.budget_gib:g} is more than the {_gib(usable)} this process can "
                f"use on {self.device} now"
            )
        return int(self.budget_gib * GIB), "--memory-budget-gib"

    def peak_of_step(self, run_step: Callable[[], object]) -> int | None:
        """Peak allocated bytes while ``run_step()`` runs (from what is allocated now); None: out of memory."""
        self.release()
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            run_step()
            torch.cuda.synchronize(self.device)
        except RuntimeError as err:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if not is_oom(err):
                raise
            return None
        return torch.cuda.max_memory_allocated(self.device)


def device_memory(device: torch.device, config: TrainConfig) -> CudaMemory:
    """The memory reader for ``device``; ConfigError where --batch-size auto cannot measure."""
    if device.type != "cuda":
        raise ConfigError(
            f"--batch-size auto needs a CUDA device (this run is on {device.type}): it measures the peak "
            "memory of probe steps with the CUDA allocator and the free memory with the driver, and on a CPU "
            "torch measures neither (host memory is shared with every other process); give --batch-size a number"
        )
    return CudaMemory(device, config.memory_budget_gib)


@contextlib.contextmanager
def throwaway_steps(config: TrainConfig, model, collator, train_set, device: torch.device):
    """Yields ``prepare(n)`` -> a callable running one training step at batch ``n`` (the first ``n``
    training samples, repeated if fewer, every text padded to its token budget) with a throwaway
    optimizer. On exit the adapter weights, their gradients and the random state are as before."""
    params = lora.adapter_parameters(model)
    saved = [p.detach().clone() for p in params]
    widest = copy.copy(collator)
    widest.static_shapes = True  # the run's token budgets: no batch of the run is wider
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        optimizer, _ = step_options.make_optimizer(
            params, lr=config.lr, eps=config.adam_eps, weight_decay=config.weight_decay, fused=config.fused_optimizer
        )
        parts = make_step(
            model,
            optimizer,
            linear_warmup_decay(optimizer, 0, 1),
            precision_name=config.precision,
            device=device,
            guard=config.guard,
            max_grad_norm=config.max_grad_norm,
            max_rollbacks=config.max_rollbacks,
        )

        def prepare(n: int) -> Callable[[], object]:
            batch = widest([train_set[i % len(train_set)] for i in range(n)])  # decoded before the peak is reset
            return lambda: training_step(parts, [inputs.to_device(batch, device)], 0)

        try:
            yield prepare
        finally:
            with torch.no_grad():
                for param, value in zip(params, saved):
                    param.copy_(value)
                    param.grad = None


# ----------------------------------------------------------------------------- the hook


def resolve(
    config: TrainConfig, model, collator, train_set, device: torch.device, resume_from: Path | None = None, memory=None
) -> tuple[TrainConfig, dict | None]:
    """(``config`` with batch_size a number, the ``auto_batch`` log record or None). A config
    with a numeric batch size comes back as it is. ``memory``: the reader (default
    :func:`device_memory`; tests give a fake with ``budget()`` and ``peak_of_step(run_step)``)."""
    if config.batch_size != AUTO_BATCH:
        if config.memory_budget_gib is not None:
            raise ConfigError("--memory-budget-gib is read by --batch-size auto only; leave it out or use auto")
        return config, None
    if resume_from is not None:  # the checkpoint's batches, replayed from where it stopped
        state_file = resume_from / checkpoint.STATE_FILE
        if not state_file.is_file():
            raise ConfigError(f"{resume_from}: no {checkpoint.STATE_FILE} to take --batch-size auto's batch from")
        saved = json.loads(state_file.read_text(encoding="utf-8"))["config"]
        record = {"type": "auto_batch", "batch_size": saved["batch_size"], "from_checkpoint": str(resume_from)}
        return replace(config, batch_size=saved["batch_size"]), record
    if distributed.world_size() > 1:
        raise ConfigError(
            "--batch-size auto is not available under torchrun: each process would probe alone and could "
            "choose another batch; run it on one process and pass the batch it logs"
        )
    if config.memory_budget_gib is not None and config.memory_budget_gib <= 0:
        raise ConfigError(f"--memory-budget-gib is {config.memory_budget_gib:g}; it must be positive")
    memory = memory or device_memory(device, config)
    budget, budget_from = memory.budget()
    with throwaway_steps(config, model, collator, train_set, device) as prepare:
        chosen = choose(
            lambda n: memory.peak_of_step(prepare(n)), budget, limit=len(train_set), budget_from=budget_from
        )
    if distributed.is_main():
        print(chosen.describe(), file=sys.stderr, flush=True)  # stdout is train --json's
    return replace(config, batch_size=chosen.batch_size), chosen.record()
