"""The small rules training is made of, against values derived by hand.

Each rule is one line of arithmetic that the integration tests pass through without pinning it
(mutation testing found each of them unpinned: changing the line left every test green).
"""

from __future__ import annotations

import pytest
import torch

from qformer_lora import checkpoint, lora, precision
from qformer_lora.training import step


def lr_factors(warmup_steps: int, total_steps: int, steps: int) -> list[float]:
    """The learning-rate factor the schedule applies at optimizer steps 0 .. steps-1 (base lr 1)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = step.linear_warmup_decay(optimizer, warmup_steps, total_steps)
    factors = []
    for _ in range(steps):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return factors


def test_warmup_rises_linearly_then_decays_to_zero_and_stays():
    """warmup 2, total 6: warm-up (step+1)/(warmup+1) = 1/3, 2/3; then (6-step)/(6-2) = 1, 3/4, 1/2, 1/4, 0;
    past the end max(0, negative) = 0."""
    assert lr_factors(2, 6, 8) == pytest.approx([1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0])


def test_schedule_without_warmup_and_a_one_step_decay():
    """warmup 0, total 1: the decay divides by max(1, 1 - 0) = 1: factors 1, then 0, 0."""
    assert lr_factors(0, 1, 3) == pytest.approx([1.0, 0.0, 0.0])


def test_schedule_whose_warmup_fills_the_run_never_divides_by_zero():
    """warmup 3, total 3: 1/4, 2/4, 3/4, then (3-3)/max(1, 0) = 0."""
    assert lr_factors(3, 3, 4) == pytest.approx([0.25, 0.5, 0.75, 0.0])


@pytest.mark.parametrize(
    ("num_epochs", "every", "saved"),
    [
        (7, 2, [2, 4, 6, 7]),  # the seed's cadence: every 2 epochs and the last
        (6, 2, [2, 4, 6]),  # the last is a multiple: saved once
        (3, 5, [3]),  # a cadence longer than the run: the last only
        (4, 1, [1, 2, 3, 4]),
        (9, 3, [3, 6, 9]),
    ],
)
def test_checkpoint_cadence(num_epochs, every, saved):
    assert [e for e in range(1, num_epochs + 1) if checkpoint.should_save(e, num_epochs, every)] == saved


@pytest.mark.parametrize("r", [1, 2, 4, 8, 64])
def test_lora_alpha_defaults_to_twice_the_rank(r):
    """alpha = 2r, the reference Q-Former LoRA recipe (Kim et al., Findings of EMNLP 2024)."""
    assert lora.default_alpha(r) == 2 * r
    assert lora.LoraSpec(r=r).alpha == 2 * r
    assert lora.LoraSpec(r=r, alpha=3).alpha == 3  # a given alpha is kept


@pytest.mark.parametrize(
    ("name", "component"),
    [
        ("base_model.model.qformer.encoder.layer.0.attention.attention.query.lora_A.default.weight", "qformer"),
        ("qformer.encoder.layer.0.attention.attention.query.weight", "qformer"),
        ("base_model.model.language_model.encoder.block.0.layer.0.SelfAttention.q.weight", "language_model"),
        ("query_tokens", "query_tokens"),
        ("base_model.model.language_projection.weight", "language_projection"),
        # not a component of the model: the whole name comes back, so a report shows it as it is
        ("base_model.model.extra_head.weight", "extra_head.weight"),
        ("lm_head.weight", "lm_head.weight"),
    ],
)
def test_component_of_a_parameter_name(name, component):
    assert lora.component_of(name) == component


def test_unknown_precision_is_refused_naming_every_known_one():
    with pytest.raises(ValueError) as refused:
        precision.get("fp8")
    assert str(refused.value) == "unknown precision 'fp8'; expected one of fp32, bf16, fp16-amp, fp16-pure"


def test_majority_baseline_is_the_commonest_answers_share():
    """Answers compared stripped and case-folded: 'Red', ' red ', 'RED', 'blue', 'green' -> red 3 of 5 = 0.6."""
    from types import SimpleNamespace

    from qformer_lora.training import validation

    samples = [SimpleNamespace(answer=a) for a in ("Red", " red ", "RED", "blue", "green")]
    assert validation.majority_baseline(samples) == pytest.approx(0.6)
    # str.lower, not upper: 'straße'.upper() is 'STRASSE', which would merge it with 'strasse' (3 of 3)
    samples = [SimpleNamespace(answer=a) for a in ("straße", "Strasse", "STRASSE")]
    assert validation.majority_baseline(samples) == pytest.approx(2 / 3)


@pytest.mark.parametrize(("name", "state"), [("fp16-amp", "autocast-torch.float16"), ("fp32", "no-autocast")])
def test_autocast_computes_in_the_precisions_dtype(name, state):
    """fp16-amp autocasts to fp16 on every device (the CPU's own autocast default is bf16); fp32 does not autocast."""
    from qformer_lora import compat

    with precision.autocast(name, "cpu"):
        assert compat.autocast_state("cpu") == state
