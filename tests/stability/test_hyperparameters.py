"""The seed's conclusion, as a property: no hyperparameter in its search space fixes fp16-pure,
and none breaks the recommended precisions (fp32 adapters and AdamW state)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qformer_lora.repro import trials

from .helpers import adapter_model, batches

pytestmark = pytest.mark.stability

hyperparameters = dict(
    lr=st.floats(min_value=5e-6, max_value=1e-4),
    r=st.sampled_from([4, 8, 16]),
    max_grad_norm=st.sampled_from([None, 1.0, 0.1]),
    warmup_steps=st.sampled_from([0, 50]),
)


@settings(max_examples=15)
@given(**hyperparameters)
def test_fp16_pure_fails_whatever_the_hyperparameters(lr, r, max_grad_norm, warmup_steps):
    model = adapter_model("fp16-pure", r=r)
    trace = trials.run_steps(
        model,
        batches(model),
        precision="fp16-pure",
        steps=2,
        lr=lr,
        max_grad_norm=max_grad_norm,
        warmup_steps=warmup_steps,
    )
    assert trace["finite"] == [True, False], (
        f"lr={lr:g} r={r} clip={max_grad_norm} warmup={warmup_steps}: losses {trace['losses']}"
    )


@settings(max_examples=15)
@given(precision=st.sampled_from(["fp16-amp", "bf16", "fp32"]), **hyperparameters)
def test_recommended_precisions_never_fail(precision, lr, r, max_grad_norm, warmup_steps):
    model = adapter_model(precision, r=r)
    trace = trials.run_steps(
        model,
        batches(model),
        precision=precision,
        steps=3,
        lr=lr,
        max_grad_norm=max_grad_norm,
        warmup_steps=warmup_steps,
    )
    assert all(trace["finite"]) and trace["diagnosis"] is None, (
        f"{precision} lr={lr:g} r={r} clip={max_grad_norm} warmup={warmup_steps}: losses {trace['losses']}"
    )
