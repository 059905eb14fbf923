"""Eager against SDPA attention, pinned per release (issue 20, item 4; transformers#40952).

Which implementation the vision tower, Q-Former and language model run (by default, from_pretrained's
default, and with attn_implementation="eager" / "sdpa") is pinned exactly per release in
resources/expectations/attention.json, refusals with their exact message. The loss and LoRA-gradient
differences between eager and SDPA are bounded by probes.ATTENTION_RELATIVE_BOUND (1e-5 relative; its
comment derives it from fp32 rounding).
"""

from __future__ import annotations

import functools

import pytest
import torch

from qformer_lora import forward, presets, synthetic
from qformer_lora.repro import probes

from ..conftest import TINY_PRESETS, check_against_release


@functools.cache
def observed(preset: str) -> dict:
    return probes.attention(preset)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_attention_implementations_pinned_per_release(preset):
    check_against_release("attention", preset, probes.attention_row(observed(preset)))


@pytest.mark.parametrize("other", ["sdpa", "default"])
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_eager_and_the_other_builds_agree_to_fp32_rounding(preset, other):
    """attn_implementation="sdpa", and the release's default (no attn_implementation, transformers#40952's
    comparison), against "eager": same weights, adapters and batch, so only rounding may differ."""
    o = observed(preset)
    if other not in o["differences"]:  # a refusal is pinned exactly by the test above
        refused = {i: o[i]["message"] for i in probes.ATTENTION_IMPLEMENTATIONS if o[i]["status"] != "ok"}
        pytest.skip(f"this release does not build both: {refused}")
    difference = o["differences"][other]
    assert difference["loss_relative_difference"] <= probes.ATTENTION_RELATIVE_BOUND, difference
    assert difference["grad_relative_difference"] <= probes.ATTENTION_RELATIVE_BOUND, difference


def test_sdpa_calls_are_counted_in_the_component_that_makes_them():
    """One extra scaled_dot_product_attention call made at the start of the Q-Former's forward (a pre-hook
    registered after the counter's own) adds exactly 1 to the Q-Former's count and nothing elsewhere;
    the original function is back afterwards."""
    model = presets.build_model("tiny-blip2-opt", seed=0)
    batch = synthetic.random_batch(model, seed=0)
    original = torch.nn.functional.scaled_dot_product_attention
    q = torch.zeros(1, 1, 2, 4)
    with torch.no_grad(), probes.counting_sdpa_calls(model) as base:
        forward.custom_forward(model, batch)

    def one_more_call(module, args) -> None:  # None: a pre-hook's return value would replace the inputs
        torch.nn.functional.scaled_dot_product_attention(q, q, q)

    with torch.no_grad(), probes.counting_sdpa_calls(model) as counts:
        hook = model.qformer.register_forward_pre_hook(one_more_call)
        try:
            forward.custom_forward(model, batch)
        finally:
            hook.remove()
    assert counts == base | {"qformer": base["qformer"] + 1}
    assert torch.nn.functional.scaled_dot_product_attention is original
