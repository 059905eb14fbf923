"""Loss normalisation under gradient accumulation, on answers of different token counts.

training/step.py divides each micro-batch's summed answer-token loss by the token count of the
whole accumulation group, so that batch 8 x 1 and batch 2 x 4 take the same step. The "mean of
means" (each micro-batch's own mean, averaged over micro-batches) gives the same step only when
every micro-batch holds the same number of answer tokens -- which the shapes data always does
(its answers are one-word colours and shapes), so the golden-curve test cannot tell the two
apart. transformers fixed the same fault in its Trainer in late 2024 (v4.46, "gradient
accumulation loss"). The tests here give the micro-batches 1 and 3 (or 1 and 4) answer tokens.
"""

from __future__ import annotations

import contextlib
import copy
import math
from types import SimpleNamespace

import pytest
import torch

from qformer_lora import forward, lora, synthetic
from qformer_lora.training import step

from ..stability import helpers


class _LinearLoss(torch.nn.Module):
    """A one-parameter model whose summed loss over a micro-batch is ``w * batch["c"]``."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.0))


def _micro_batch(targets: int, c: float) -> dict:
    labels = torch.full((1, 4), forward.IGNORE_INDEX)
    labels[0, :targets] = 7  # any token id: only the count of non-ignored labels matters
    return {"pixel_values": torch.zeros(1, 3, 2, 2), "input_ids": torch.zeros(1, 2, dtype=torch.long),
            "labels": labels, "c": c}  # fmt: skip


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _linear_parts(**options):
    """(_LinearLoss model, make_step parts): SGD at lr 1 under a constant schedule, fp32 on the CPU, the forward
    returning w * batch["c"]; ``options`` go to make_step (guard, scaler, max_grad_norm, ...)."""
    model = _LinearLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    parts = step.make_step(
        model, optimizer, scheduler, precision_name="fp32", device="cpu",
        run_forward=lambda b: SimpleNamespace(loss=model.w * b["c"]), **options,
    )  # fmt: skip
    return model, parts


def _hand_step(micro_batches: list[dict]):
    model, parts = _linear_parts()
    result = step.training_step(parts, micro_batches, index=0)
    return result, float(model.w.detach())


def test_accumulated_loss_is_divided_by_the_groups_token_count():
    """Micro-batches with 1 and 3 answer tokens whose summed losses are w*1 and w*6, at w = 0, SGD lr 1.

    The group's loss is (w*1 + w*6) / (1 + 3) = 1.75 w, so w moves by -1.75. The mean of the
    per-micro-batch means would be (1/1 + 6/3) / 2 = 1.5 (w -> -1.5); dividing each micro-batch by its
    own count without averaging gives 1 + 2 = 3 (w -> -3).
    """
    result, w = _hand_step([_micro_batch(1, 1.0), _micro_batch(3, 6.0)])
    assert result.action == "step" and result.tokens == 4 and result.samples == 2
    assert w == pytest.approx(-1.75, abs=1e-7), (
        f"w moved to {w}, not -1.75: the accumulated loss must be divided by the group's 4 answer tokens "
        "(-1.5 is the mean of per-micro-batch means, -3 their sum)"
    )
    assert result.batch_losses == [0.0, 0.0]  # summed losses, taken before the step, at w = 0
    assert result.loss_sum == 0.0 and result.loss == 0.0


def test_reported_loss_is_per_answer_token_over_the_group():
    """Second step from w = -1.75: summed losses -1.75 and -10.5, 4 tokens: loss per token -3.0625."""
    micro_batches = [_micro_batch(1, 1.0), _micro_batch(3, 6.0)]
    model, parts = _linear_parts()
    step.training_step(parts, micro_batches, index=0)
    result = step.training_step(parts, micro_batches, index=1)
    assert result.batch_losses == pytest.approx([-1.75, -10.5])
    assert result.loss_sum == pytest.approx(-12.25)
    assert result.loss == pytest.approx(-12.25 / 4), "StepResult.loss is the group's loss per answer token"
    assert float(result.grad_norm) == pytest.approx(1.75), "the norm of the group-normalised gradient"
    assert float(model.w.detach()) == pytest.approx(-3.5)


@pytest.mark.parametrize("preset", ["tiny-instructblip-flan-t5", "tiny-blip2-opt"])
def test_two_micro_batches_of_unequal_answers_step_like_one_batch(preset):
    """Rows with 1 and 4 answer tokens: as 2 micro-batches of 1, or as 1 micro-batch of 2, the adapter
    takes the same SGD step (same rows, same per-token loss sum, same divisor: 5 tokens). The mean of
    per-micro-batch means weighs the 1-token row 4x more; the check that it differs keeps the test able
    to fail."""
    model = helpers.adapter_model("fp32", r=2, preset=preset).eval()
    with torch.no_grad():  # non-zero lora_B: every adapter tensor gets a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(1))
    batch = synthetic.random_batch(model, batch_size=2, prompt_len=5, answer_len=4, seed=3)
    labels = batch["labels"]
    target = labels != forward.IGNORE_INDEX
    # keep the first 1 target of row 0 and all 4 answer targets of row 1 (decoder-only labels are
    # aligned with input_ids: their targets sit at the end, after the prompt)
    first_target = target.int().argmax(dim=1)
    keep = torch.zeros_like(target)
    keep[0, first_target[0]] = True
    keep[1] = target[1]
    batch["labels"] = torch.where(keep, labels, forward.IGNORE_INDEX)
    counts = (batch["labels"] != forward.IGNORE_INDEX).sum(dim=1).tolist()
    assert counts == [1, 4]
    rows = [{k: v[i : i + 1] if torch.is_tensor(v) else v for k, v in batch.items()} for i in range(2)]

    def adapter_step(group):
        m = copy.deepcopy(model)
        params = lora.adapter_parameters(m)
        before = [p.detach().clone() for p in params]
        optimizer = torch.optim.SGD(params, lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        parts = step.make_step(m, optimizer, scheduler, precision_name="fp32", device="cpu")
        result = step.training_step(parts, group, index=0)
        return result, torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params, strict=True)])

    single, update_single = adapter_step([batch])
    accumulated, update_accumulated = adapter_step(rows)
    assert single.tokens == accumulated.tokens == 5
    assert accumulated.loss == pytest.approx(single.loss, rel=1e-5)
    # relative to the whole update's norm: a padded row changes the summation order of tiny
    # elements (fp32, ~1e-7 relative of the update), not the step
    assert relative(update_accumulated, update_single) < 1e-5, (
        "2 x 1 accumulation must step like the 1 x 2 batch: relative difference "
        f"{relative(update_accumulated, update_single):.3g}"
    )
    # the mean of means would be (g0/1 + g1/4) / 2 where the right gradient is (g0 + g1) / 5
    g = [adapter_step([row])[1] for row in rows]  # each row alone: its own loss mean's gradient
    mean_of_means = (g[0] + g[1]) / 2
    assert relative(mean_of_means, update_single) > 1e-2, "the data cannot tell the two normalisations apart"


class _RecordingGuard:
    """A guard (make_step takes any object with inputs_ok / healthy / non_finite) that records its calls and
    skips every non-finite step."""

    def __init__(self):
        self.calls = []

    def inputs_ok(self, group, step):
        self.calls.append(("inputs_ok", len(group), step))
        return True

    def healthy(self):
        self.calls.append(("healthy",))

    def non_finite(self, step, batches, losses, grad_norm, scaler_enabled=False):
        self.calls.append(("non_finite", step, len(batches), losses, float(grad_norm), scaler_enabled))
        return "skip"


def test_the_guard_hears_the_step_index_and_the_non_finite_figures():
    """Step 5 finite, then step 6 with a NaN loss in its second micro-batch: the guard is asked about the inputs
    of each (with its step index), told step 5 was healthy, and handed step 6's index, its per-micro-batch
    summed losses at w = -1.75 ([-1.75, NaN]) and the NaN gradient norm; "skip" drops the gradients
    (None, as after every step: set_to_none, so a parameter without a gradient is left alone by AdamW)."""
    guard = _RecordingGuard()
    model, parts = _linear_parts(guard=guard)
    step.training_step(parts, [_micro_batch(1, 1.0), _micro_batch(3, 6.0)], index=5)
    assert model.w.grad is None and float(model.w.detach()) == pytest.approx(-1.75)
    result = step.training_step(parts, [_micro_batch(1, 1.0), _micro_batch(3, float("nan"))], index=6)
    assert result.action == "skip" and model.w.grad is None
    (_, nan_step, batches, losses, grad_norm, scaler_enabled) = guard.calls[-1]
    assert guard.calls[:3] == [("inputs_ok", 2, 5), ("healthy",), ("inputs_ok", 2, 6)], guard.calls
    assert (nan_step, batches, losses[0], scaler_enabled) == (6, 2, -1.75, False) and math.isnan(losses[1])
    assert math.isnan(grad_norm) and float(model.w.detach()) == pytest.approx(-1.75)


def test_under_torchrun_the_loss_is_summed_over_processes_and_divided_by_their_tokens(monkeypatch):
    """DDP averages the processes' gradients; the step multiplies each micro-batch's loss by the world size so
    that average becomes their sum, and divides by the token count summed over processes (distributed.all_sum).
    Two processes holding the same micro-batches (1 and 3 answer tokens, summed losses w and 6w) must then take
    the one-process step: 2 x 7/8 = 1.75, w 0 -> -1.75. The totals are reduced on the step's device (NCCL
    needs CUDA tensors), and the gradient all-reduce waits for the group's last micro-batch (no_sync before)."""
    calls = {"all_sum": [], "accumulating": []}

    def all_sum(values, device):
        calls["all_sum"].append((list(values), device))
        return [2 * v for v in values]  # the other process holds the same values

    def accumulating(trainer, last):
        calls["accumulating"].append((trainer, last))
        return contextlib.nullcontext()

    monkeypatch.setattr(step.distributed, "world_size", lambda: 2)
    monkeypatch.setattr(step.distributed, "all_sum", all_sum)
    monkeypatch.setattr(step.distributed, "accumulating", accumulating)
    model, parts = _linear_parts()
    parts.trainer = ddp = torch.nn.Identity()  # stands for the DDP wrapper accumulating() is given
    batches = [_micro_batch(1, 1.0), _micro_batch(3, 6.0), _micro_batch(0, 0.0)]
    result = step.training_step(parts, batches, index=0)
    assert float(model.w.detach()) == pytest.approx(-1.75), "the loss must be x world size / global tokens"
    assert (result.tokens, result.samples) == (8, 6)
    cpu = torch.device("cpu")
    assert calls["all_sum"] == [([0, 4, 3], cpu), ([0.0], cpu)], calls["all_sum"]
    assert calls["accumulating"] == [(ddp, False), (ddp, False), (ddp, True)], calls["accumulating"]


def _scaled_step(init_scale: float):
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)  # no growth in one step
    model, parts = _linear_parts(scaler=scaler)
    result = step.training_step(parts, [_micro_batch(1, 1.0), _micro_batch(3, 6.0)], index=0)
    return result, float(model.w.detach()), scaler.get_scale()


def test_an_fp16_overflow_is_left_to_the_grad_scaler_and_reported_as_its_skip():
    """An enabled GradScaler (fp16-amp's; on the CPU here) at scale 3e38: the scaled gradient, 3e38 x 7/4,
    overflows float32 while the loss is finite, so the guard leaves it to the scaler (action "scaler"), which
    skips the step and halves its scale: scaler_skipped, w still 0. At scale 4 the step is taken (w -> -1.75),
    the scale stays 4 and nothing is reported skipped."""
    overflow, w, scale = _scaled_step(3e38)
    halved = float(torch.tensor(3e38) / 2)  # the scale is a float32 tensor: 3e38 is not exact in float32
    assert (overflow.action, overflow.scaler_skipped, w, scale) == ("scaler", True, 0.0, halved), overflow
    finite, w, scale = _scaled_step(4.0)
    assert (finite.action, finite.scaler_skipped, scale) == ("step", False, 4.0) and w == pytest.approx(-1.75)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the guard warns at each rollback
def test_the_default_rollback_halves_the_schedule_and_gives_up_after_three():
    """make_step(guard="rollback") with its defaults: a NaN loss rolls back and halves the lr, on the optimizer
    and on the schedule's base (LambdaLR recomputes the lr from it at the next step, so a finite step keeps
    0.5); the fourth NaN group in a row is refused: "gave up after 3 rollback(s) (max_rollbacks=3)"."""
    from qformer_lora.diagnostics import numerics

    model, parts = _linear_parts(guard="rollback")
    optimizer = parts.optimizer
    finite, nan = [_micro_batch(1, 1.0), _micro_batch(3, 6.0)], [_micro_batch(1, float("nan"))]
    assert step.training_step(parts, nan, index=0).action == "skip"
    assert optimizer.param_groups[0]["lr"] == 0.5 and float(model.w.detach()) == 0.0
    step.training_step(parts, finite, index=1)
    assert optimizer.param_groups[0]["lr"] == 0.5 and float(model.w.detach()) == pytest.approx(-0.875)
    for index in (2, 3):
        step.training_step(parts, nan, index=index)
    assert optimizer.param_groups[0]["lr"] == 0.125
    with pytest.raises(numerics.NonFiniteError, match=r"gave up after 3 rollback\(s\) \(max_rollbacks=3\)"):
        step.training_step(parts, nan, index=4)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_make_step_passes_the_clipping_norm_and_the_rollback_factor_on():
    """max_grad_norm=1: the group's gradient, 1.75, is clipped to 1, so SGD at lr 1 moves w to -1 (not -1.75),
    and the reported norm is the one before clipping. rollback_lr_factor=0.25: a NaN group rolls back and the lr
    becomes 0.25 (not the default 0.5)."""
    model, parts = _linear_parts(guard="rollback", max_grad_norm=1.0, rollback_lr_factor=0.25)
    result = step.training_step(parts, [_micro_batch(1, 1.0), _micro_batch(3, 6.0)], index=0)
    assert float(result.grad_norm) == pytest.approx(1.75) and float(model.w.detach()) == pytest.approx(-1.0)
    step.training_step(parts, [_micro_batch(1, float("nan"))], index=1)
    assert parts.optimizer.param_groups[0]["lr"] == 0.25
