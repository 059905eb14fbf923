"""compile_mode (CUDA graphs or not) and the compiled AdamW step: same losses as eager, refusals
that name the option, and a compile failure recorded as a fallback to eager."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from qformer_lora import compat, forward, lora, presets, synthetic
from qformer_lora.training import run_config, step, step_options

T5 = "tiny-instructblip-flan-t5"
# Compiled against eager: inductor (and AOTAutograd) fuse and reorder float ops, so results move
# in the last bits and the model then amplifies that over the steps; the project's tolerance for
# compiled losses (test_step_options.COMPILE_RTOL, its reasoning there). Measured here: the
# compiled optimizer's losses equal eager's to float32 rounding over three steps.
COMPILE_RTOL = 1e-4
# The first AdamW update, compiled: torch's compiled AdamW reads its step count as the float32 tensor it
# is (eager reads a Python float), so its bias corrections 1 - beta^t are float32 sums: for
# beta2 = 0.999, t = 1 that cancels to 1e-3 carrying float32(0.999)'s error (1.3e-8), 1.3e-5 of it,
# halved by the square root of the second moment's correction; beta1 = 0.9 adds 2.4e-7. Relative to
# the update (|update| <= lr = 1e-2 / 3 in warm-up step 0, Adam's first |m / sqrt(v)| <= 1), plus
# 2 ulp of the result for the reassociated sum (2 x 2^-23 of the parameter). Measured: 3e-8 at most.
_BETA_ERROR = {beta: abs(float(torch.tensor(beta)) - beta) / (1 - beta) for beta in (0.9, 0.999)}
FIRST_UPDATE_RTOL = 2 * 2**-23
FIRST_UPDATE_ATOL = (_BETA_ERROR[0.999] / 2 + _BETA_ERROR[0.9] + FIRST_UPDATE_RTOL) * 1e-2 / 3


def _needs_compile():
    reason = compat.compiled_optimizer_unavailable_reason("cpu")
    if reason is not None:
        pytest.skip(f"torch.compile cannot run here: {reason}")


@functools.cache
def _adapter_model():
    torch.manual_seed(0)
    model = lora.apply_lora(presets.build_model(T5), lora.LoraSpec(r=2, alpha=4, dropout=0.0))
    with torch.no_grad():  # non-zero lora_B: every adapter tensor gets a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    return model.eval()


def _parts(model, compile_optimizer: bool = False):
    """The trainer's step on ``model``: torch's default AdamW (fused_optimizer false), warm-up 2 of 10 steps."""
    optimizer, _ = step_options.make_optimizer(lora.adapter_parameters(model), lr=1e-2, fused=False)
    scheduler = step.linear_warmup_decay(optimizer, 2, 10)
    choice = step_options.compile_optimizer_step(optimizer, compile_optimizer)
    parts = step.make_step(model, optimizer, scheduler, precision_name="fp32", device="cpu", max_grad_norm=1.0)
    return parts, choice


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in lora.adapter_parameters(model)])


def _batches(model, count: int = 3) -> list[dict]:
    return [synthetic.random_batch(model, batch_size=2, seed=s) for s in range(count)]


# ----------------------------------------------------------------------------- the compiled AdamW step


def test_compiled_optimizer_step_follows_eager_without_recompiling_for_the_schedule():
    """Three steps; the schedule changes the learning rate every step (warm-up 1/3, 2/3, then 1 x 1e-2),
    and the tensor learning rate keeps that to one compiled graph. The first update also shows that
    the probe's step at compile time was undone: a probe that left AdamW's step count at 1 would give
    the first real update the bias correction of step 2 (a 1/(1 - 0.9^2) vs 1/(1 - 0.9) first moment:
    about half the update), far outside FIRST_UPDATE_*."""
    _needs_compile()
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager_model, compiled_model = (copy.deepcopy(_adapter_model()) for _ in range(2))
    (eager, _), (compiled, choice) = _parts(eager_model), _parts(compiled_model, True)
    assert choice == step_options.Choice("compile_optimizer", True, "compiled"), choice
    assert "step" in vars(compiled.optimizer)
    losses = {"eager": [], "compiled": []}
    for index, batch in enumerate(_batches(eager_model)):
        for name, parts in (("eager", eager), ("compiled", compiled)):
            losses[name].append(step.training_step(parts, [batch], index).loss)
        if index == 0:
            torch.testing.assert_close(
                _flat(compiled_model), _flat(eager_model), rtol=FIRST_UPDATE_RTOL, atol=FIRST_UPDATE_ATOL
            )
    lrs = [compiled.scheduler.get_last_lr()[0], eager.scheduler.get_last_lr()[0]]
    # after 3 steps LambdaLR's factor is (10 - 3) / (10 - 2); the group keeps a float between steps
    assert lrs[0] == lrs[1] == 1e-2 * ((10 - 3) / (10 - 2))
    assert isinstance(compiled.optimizer.param_groups[0]["lr"], float)
    worst = max(abs(c - e) / abs(e) for c, e in zip(losses["compiled"], losses["eager"]))
    assert worst <= COMPILE_RTOL, losses
    assert losses["eager"][-1] != losses["eager"][0], "the parameters did not move: a vacuous comparison"
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # the lr changed 3 times


def test_compiled_optimizer_falls_back_to_eager_with_the_reason(monkeypatch):
    """torch.compile's compiled function fails at its first call (the probe): the Choice says so, the
    optimizer's step is the one it had, and the probe left parameters, gradients and state as they were."""
    monkeypatch.setattr(compat, "compiled_optimizer_unavailable_reason", lambda device_type: None)

    def broken(fn, **kwargs):
        return lambda *a, **k: (_ for _ in ()).throw(RuntimeError("inductor fell over\ntraceback"))

    monkeypatch.setattr(torch, "compile", broken)
    model = copy.deepcopy(_adapter_model())
    before = _flat(model)
    optimizer, _ = step_options.make_optimizer(lora.adapter_parameters(model), lr=1e-2, fused=False)
    scheduler = step.linear_warmup_decay(optimizer, 2, 10)
    own_step = optimizer.step  # the scheduler's wrapper (an instance attribute)
    with pytest.warns(UserWarning, match="inductor fell over"):
        choice = step_options.compile_optimizer_step(optimizer, True)
    assert (choice.option, choice.used) == ("compile_optimizer", "eager")
    assert choice.reason == "torch.compile failed: RuntimeError: inductor fell over"
    assert optimizer.step is own_step and scheduler is not None
    assert torch.equal(_flat(model), before) and all(p.grad is None for p in lora.adapter_parameters(model))
    assert not optimizer.state


def test_compiled_optimizer_is_not_for_fused_adamw_and_off_is_eager():
    param = torch.nn.Parameter(torch.ones(3))
    fused = torch.optim.AdamW([param], lr=1e-2)
    fused.param_groups[0]["fused"] = True  # what AdamW(fused=True) sets, without needing its kernel here
    choice = step_options.compile_optimizer_step(fused, True)
    assert choice == step_options.Choice(
        "compile_optimizer", True, "eager", "fused AdamW is one kernel per parameter group already"
    )
    assert "step" not in vars(fused)
    assert step_options.compile_optimizer_step(fused, False) == step_options.Choice("compile_optimizer", False, "eager")


# ----------------------------------------------------------------------------- compile_mode


def test_reduce_overhead_is_cuda_graphs_on_cuda_and_default_elsewhere():
    assert step_options.compile_mode_kwargs("reduce-overhead", "cuda") == (
        {"mode": "reduce-overhead"},
        step_options.Choice("compile_mode", "reduce-overhead", "reduce-overhead"),
    )
    kwargs, choice = step_options.compile_mode_kwargs("reduce-overhead", "cpu")
    assert kwargs == {} and (choice.requested, choice.used) == ("reduce-overhead", "default")
    assert choice.reason == "CUDA graphs need a CUDA device; cpu compiles as default"
    assert step_options.compile_mode_kwargs("default", "cuda")[0] == {}
    with pytest.raises(ValueError, match="'max-autotune'"):
        step_options.compile_mode_kwargs("max-autotune", "cuda")


def test_reduce_overhead_qformer_on_cpu_gives_eager_losses():
    """compile_mode reduce-overhead with compile_qformer through the trainer's compile call, three steps.
    aot_eager (dynamo + AOTAutograd, no code generation: seconds, where inductor takes a minute here)
    captures the same forward and backward graphs; inductor's own run is test_step_options'."""
    _needs_compile()
    eager_model, compiled_model = (copy.deepcopy(_adapter_model()) for _ in range(2))
    batches = _batches(eager_model)

    def probe(_compiled):
        forward.custom_forward(compiled_model, batches[0], reduction="sum").loss.backward()
        for param in lora.adapter_parameters(compiled_model):
            param.grad = None

    choices = step_options.compile_step_modules(
        compiled_model,
        qformer=True,
        frozen=False,
        mode="reduce-overhead",
        probe=probe,
        device_type="cpu",
        backend="aot_eager",
    )
    assert [(c.option, c.used) for c in choices] == [("compile_mode", "default"), ("compile", "compiled")]
    assert "forward" in vars(compat.unwrap(compiled_model).qformer)
    (eager, _), (compiled, _) = _parts(eager_model), _parts(compiled_model)
    losses = [[step.training_step(p, [b], i).loss for i, b in enumerate(batches)] for p in (eager, compiled)]
    worst = max(abs(c - e) / abs(e) for c, e in zip(losses[1], losses[0]))
    assert worst <= COMPILE_RTOL and losses[0][-1] != losses[0][0], losses
    step_options.uncompile_step_modules(compiled_model)
    assert "forward" not in vars(compat.unwrap(compiled_model).qformer)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"compile_mode": "reduce-overhead"},
            "option 'compile_mode' is 'reduce-overhead', but nothing is compiled",
        ),
        (
            {"compile_optimizer": True, "sync_every": 5, "fused_optimizer": True},
            "option 'compile_optimizer' is true with 'sync_every' 5, refused: deferred host reads",
        ),
        (
            {"compile_optimizer": True, "fused_optimizer": None},
            "option 'compile_optimizer' is true with 'fused_optimizer' None, refused",
        ),
    ],
)
def test_compile_combinations_that_cannot_work_are_refused(options, message):
    with pytest.raises(run_config.ConfigError, match=message.replace("(", r"\(")):
        run_config.TrainConfig(**options)


def test_compile_mode_choices_and_flags():
    with pytest.raises(run_config.ConfigError, match=r"--compile-mode: option 'compile_mode' is 'fast'; expected"):
        run_config.load_run_config(None, {"compile_mode": "fast", "compile_qformer": "true"})
    config = run_config.load_run_config(None, {"compile_mode": "reduce-overhead", "compile_optimizer": "true"})
    assert (config.compile_mode, config.compile_optimizer) == ("reduce-overhead", True)
