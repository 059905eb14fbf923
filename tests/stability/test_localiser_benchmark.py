"""What the guard costs while training is healthy: one training step without it, with
guard=raise (input check + clip that keeps non-finite gradients) and with guard=rollback
(plus a snapshot of adapter and AdamW state every step). The localiser itself costs
nothing here: it only runs once a check has fired.

    pytest -m stability tests/stability/test_localiser_benchmark.py --benchmark-columns=median,iqr,rounds
"""

from __future__ import annotations

import math

import pytest
import torch

from qformer_lora import forward, lora
from qformer_lora.diagnostics import numerics

from ..timing import interleaved_medians
from .helpers import adapter_model, batches

# benchmarks, not correctness checks: in `pytest -m stability` and `pytest -m long` (.ci/run), not the default run
pytestmark = [pytest.mark.stability, pytest.mark.long]

VARIANTS = ["none", "raise", "rollback"]
ROUNDS = 40


def make_step(variant: str):
    model = adapter_model("fp32")
    batch = batches(model, n=1)[0]
    params = lora.adapter_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    tokens = forward.target_count(batch)
    guard = None if variant == "none" else numerics.Guard(variant, model, optimizer, run_forward=None)

    def step():
        if guard is not None and not guard.inputs_ok([batch], 0):
            raise AssertionError("healthy batch rejected")
        out = forward.custom_forward(model, batch, reduction="sum")
        (out.loss / tokens).backward()
        if guard is None:  # the loop before the guard existed
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        else:
            grad_norm = numerics.clip_gradients(params, 1.0)
        assert math.isfinite(float(out.loss.detach())) and bool(torch.isfinite(grad_norm))
        if guard is not None:
            guard.healthy()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


@pytest.mark.parametrize("variant", VARIANTS)
def test_healthy_step(benchmark, variant):
    """The table pytest-benchmark prints (one variant after the other)."""
    benchmark.group = "healthy training step, tiny-instructblip-flan-t5, batch 2"
    benchmark.pedantic(make_step(variant), rounds=ROUNDS, iterations=1, warmup_rounds=3)


def test_guard_overhead_is_small():
    """The ratio, measured interleaved (none, raise, rollback, none, ...) so that drift in the
    machine's load hits every variant alike; sequential benchmarks on a shared machine do not."""
    steps = {variant: make_step(variant) for variant in VARIANTS}
    medians = interleaved_medians(steps, rounds=ROUNDS, warmup=3)
    ratios = {variant: medians[variant] / medians["none"] for variant in ("raise", "rollback")}
    print(
        f"\nguard overhead on a healthy step (interleaved medians, {ROUNDS} rounds): "
        + ", ".join(f"{v} {r:.3f}x" for v, r in ratios.items())
        + f"; no guard {medians['none'] * 1e3:.1f} ms"
    )
    # generous bounds for a noisy shared machine; measured: about 1.00x and 1.02x
    assert ratios["raise"] < 1.15, f"guard=raise costs {ratios['raise']:.2f}x a healthy step"
    assert ratios["rollback"] < 1.3, f"guard=rollback costs {ratios['rollback']:.2f}x a healthy step"
