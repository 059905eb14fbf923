"""Deferred host reads (``sync_every``, training/step.py): no host read inside the step, the same
training where every step is finite, and a non-finite step skipped on the device, exactly."""

from __future__ import annotations

import collections
import contextlib
import math
import types
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qformer_lora import compat, lora, synthetic
from qformer_lora.diagnostics import numerics
from qformer_lora.training import distributed, run_config, train
from qformer_lora.training.step import (
    PendingStep,
    check_deferred,
    linear_warmup_decay,
    make_step,
    read_steps,
    training_step,
)

from .test_step_options import adapter_model
from .test_step_resume import Interrupted, interrupt_at, log_records
from .test_train import quiet, small_data

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the guard warns on each skip

STEPS = 6
ACCUM = 2  # micro-batches per step: losses of several micro-batches are read back in order

# aten ops that make the host wait for the device on a GPU: a scalar read (.item(), float(),
# bool(), int() all dispatch _local_scalar_dense) and ops whose output size depends on values
_SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten.is_nonzero")


class HostReads(TorchDispatchMode):
    """Counts the syncing aten ops above (the autograd engine runs CPU backward ops under the
    mode too); Tensor.tolist, which reads a CPU tensor without dispatching, is patched to count."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if any(name == s or name.startswith(s + ".") for s in _SYNCING):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads(monkeypatch):
    counter = HostReads()
    real_tolist = torch.Tensor.tolist

    def counted_tolist(tensor):
        counter.counts["Tensor.tolist"] += 1
        return real_tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    with counter:
        yield counter.counts
    monkeypatch.setattr(torch.Tensor, "tolist", real_tolist)


def parts_for(deferred: bool, guard: str = "skip", model=None, max_grad_norm: float | None = 0.5, **options):
    model = model or adapter_model()
    optimizer = torch.optim.AdamW(lora.adapter_parameters(model), lr=1e-2, fused=True)
    scheduler = linear_warmup_decay(optimizer, 2, 20)
    return make_step(
        model, optimizer, scheduler, precision_name="fp32", device="cpu", guard=guard, max_grad_norm=max_grad_norm,
        deferred=deferred, **options,
    )  # fmt: skip


def groups(model) -> list[list[dict]]:
    return [[synthetic.random_batch(model, batch_size=2, seed=10 * s + i) for i in range(ACCUM)] for s in range(STEPS)]


def adapter_and_state(parts) -> dict[str, torch.Tensor]:
    """Every adapter tensor and every AdamW state tensor (exp_avg, exp_avg_sq, step), by name."""
    names = {id(p): n for n, p in parts.model.named_parameters()}
    out = {names[id(p)]: p.detach().clone() for p in parts.params}
    for p in parts.params:
        for key, value in parts.optimizer.state.get(p, {}).items():
            out[f"{names[id(p)]}/{key}"] = value.clone()
    return out


def take_steps(parts, step_groups, deferred: bool):
    """(StepResults, learning rates): the deferred ones read once, after the last step."""
    if not deferred:
        results = []
        for i, group in enumerate(step_groups):
            results.append(training_step(parts, group, i))
            results[-1].lr = parts.scheduler.get_last_lr()[0]
        return results, [r.lr for r in results]
    pending = [training_step(parts, group, i) for i, group in enumerate(step_groups)]
    return read_steps(parts, pending), [p.lr for p in pending]


def test_finite_steps_are_bitwise_those_of_the_default_step():
    """Same forward, backward, clipping (max norm 0.5 clips here) and fused AdamW update: the
    parameters, AdamW state, per-micro-batch losses, gradient norms and lr match as floats."""
    default, deferred = parts_for(False), parts_for(True)
    step_groups = groups(default.model)
    a, lr_a = take_steps(default, step_groups, False)
    b, lr_b = take_steps(deferred, step_groups, True)
    assert [r.action for r in b] == ["step"] * STEPS
    assert [r.batch_losses for r in b] == [r.batch_losses for r in a]
    assert [r.loss for r in b] == [r.loss for r in a] and [r.tokens for r in b] == [r.tokens for r in a]
    assert [r.grad_norm for r in b] == [float(r.grad_norm) for r in a] and lr_b == lr_a
    assert any(float(r.grad_norm) > 0.5 for r in a), "no step was clipped: the test would miss the clip"
    x, y = adapter_and_state(default), adapter_and_state(deferred)
    assert x.keys() == y.keys() and not [k for k in x if not torch.equal(x[k], y[k])]


def test_without_clipping_the_deferred_step_still_reports_the_norm_and_drops_the_gradients():
    """max_grad_norm None: nothing is clipped, but the deferred step reports the same gradient norm as the
    default step (clip_grad_norm_ with an infinite maximum measures it), takes the same update, and leaves
    every gradient None afterwards (set_to_none), as the default step does."""
    default, deferred = parts_for(False, max_grad_norm=None), parts_for(True, max_grad_norm=None)
    step_groups = groups(default.model)[:2]
    a, _ = take_steps(default, step_groups, False)
    b, _ = take_steps(deferred, step_groups, True)
    assert [r.grad_norm for r in b] == [float(r.grad_norm) for r in a] and all(r.grad_norm > 0 for r in b)
    x, y = adapter_and_state(default), adapter_and_state(deferred)
    assert not [k for k in x if not torch.equal(x[k], y[k])]
    assert [p.grad for p in deferred.params] == [None] * len(deferred.params)


def test_the_deferred_step_reads_nothing_on_the_host(monkeypatch):
    """The deferred step adds no host read to those of the model's own forward and backward
    (transformers' masking_utils reads ``padding_mask.all()`` to pick an SDPA path: 4 per T5
    micro-batch here, counted in ``model``). The default step adds per micro-batch the pixel
    check, the token count and float(loss) (3 x ACCUM), and per step at least the two finite
    checks of the gradient norm (clip_grad_norm_'s and the step's); read_steps reads a whole
    interval in exactly one tolist()."""
    default, deferred = parts_for(False), parts_for(True)
    step_groups = groups(default.model)[:3]
    with host_reads(monkeypatch) as model:
        for group in step_groups:
            for batch in group:
                default.run_forward(batch).loss.backward()
    default.optimizer.zero_grad(set_to_none=True)
    with host_reads(monkeypatch) as counts:
        for i, group in enumerate(step_groups):
            training_step(default, group, i)
    own = sum(counts.values()) - sum(model.values())
    assert own >= len(step_groups) * (3 * ACCUM + 2), (counts, model)  # the counter sees the step's reads
    with host_reads(monkeypatch) as counts:
        pending = [training_step(deferred, group, i) for i, group in enumerate(step_groups)]
    assert counts == model, f"host reads inside the deferred step: {dict(counts - model)}"
    with host_reads(monkeypatch) as counts:
        read_steps(deferred, pending)
    assert dict(counts) == {"Tensor.tolist": 1}


def nan_gradient_at(parts, step: int):
    """A hook that makes the first adapter parameter's gradient NaN during optimizer step ``step``
    (its micro-batches are calls ACCUM * step .. ACCUM * step + ACCUM - 1 of the hook)."""
    calls = {"n": 0}

    def hook(grad):
        calls["n"] += 1
        return grad * math.nan if (calls["n"] - 1) // ACCUM == step else grad

    return parts.params[0].register_hook(hook)


@pytest.mark.parametrize("plant", ["gradient", "pixels"])
def test_a_non_finite_step_changes_nothing_under_skip(plant):
    """Step 2 of 6 non-finite (a NaN gradient, or NaN pixels in one micro-batch): after step 2 the
    adapter and AdamW's exp_avg, exp_avg_sq and step are bitwise as after step 1, and the later
    steps are taken (AdamW's step count is 5 = 6 attempted - 1 skipped). The schedule counts
    attempted steps: the learning rates are those of 6 scheduler steps on a fresh optimizer."""
    bad = 2
    parts = parts_for(True, guard="skip")
    step_groups = groups(parts.model)
    if plant == "gradient":
        nan_gradient_at(parts, bad)
    else:
        step_groups[bad][1]["pixel_values"][0, 0, 0, 0] = math.nan
    pending, states = [], []
    for i, group in enumerate(step_groups):
        pending.append(training_step(parts, group, i))
        states.append(adapter_and_state(parts))
    before, after = states[bad - 1], states[bad]
    assert not [k for k in before if not torch.equal(before[k], after[k])], "the skipped step changed state"
    assert {int(v) for k, v in states[-1].items() if k.endswith("/step")} == {STEPS - 1}
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    schedule = linear_warmup_decay(fresh, 2, 20)
    attempted = [(fresh.step(), schedule.step(), schedule.get_last_lr()[0])[2] for _ in range(STEPS)]
    assert [p.lr for p in pending] == attempted
    results = read_steps(parts, pending)
    expected = "skip" if plant == "gradient" else "inputs"
    assert [r.action for r in results] == ["step"] * bad + [expected] + ["step"] * (STEPS - bad - 1)
    assert [e["step"] for e in parts.guard.events] == [bad] and parts.guard.skipped == 1
    kind = "gradient" if plant == "gradient" else "input"
    assert parts.guard.events[0]["diagnosis"]["kind"] == kind


def test_raise_names_the_first_non_finite_step_at_the_read():
    """NaN gradients at steps 3 and 4 of 6: nothing raises inside the steps; the read raises for step 3."""
    parts = parts_for(True, guard="raise")
    nan_gradient_at(parts, 3)
    nan_gradient_at(parts, 4)
    pending = [training_step(parts, group, i) for i, group in enumerate(groups(parts.model))]
    with pytest.raises(numerics.NonFiniteError, match="non-finite gradient at optimizer step 3;") as caught:
        read_steps(parts, pending)
    assert caught.value.diagnosis.step == 3 and "after optimizer step 5" in str(caught.value)


def test_what_cannot_be_exact_is_refused():
    with pytest.raises(ValueError, match="guard=rollback .* use guard=skip .* or guard=raise"):
        parts_for(True, guard="rollback")
    model = adapter_model()
    optimizer = torch.optim.AdamW(lora.adapter_parameters(model), lr=1e-2)  # torch's for-loop AdamW
    with pytest.raises(ValueError, match="not fused"):
        make_step(model, optimizer, linear_warmup_decay(optimizer, 0, 5), precision_name="fp32", device="cpu",
                  deferred=True)  # fmt: skip
    with pytest.raises(run_config.ConfigError, match="'sync_every' is 4.*'rollback'.*fused_optimizer to true"):
        train.TrainConfig(sync_every=4, guard="rollback")
    with pytest.raises(run_config.ConfigError, match="fp16-amp"):
        train.TrainConfig(sync_every=4, fused_optimizer=True, precision="fp16-amp")
    with pytest.raises(run_config.ConfigError, match="at least 0"):
        run_config.load_run_config(None, {"sync_every": -1})


def test_a_deferred_run_logs_and_resumes_as_the_default_run(tmp_path, monkeypatch):
    """train.train with sync_every=3 (a read every 3 steps; 32 samples / batch 4 = 8 steps an
    epoch, so each epoch ends mid-interval) and a step checkpoint every 2 steps (a read before each
    save): the same log, step for step, as the default step with fused AdamW; killed before step 7
    and resumed from the step-6 checkpoint, the same log again."""
    common = dict(epochs=2, batch_size=4, save_every=1, keep_last=0, save_steps=2, fused_optimizer=True)
    common |= small_data(tmp_path)
    default, deferred, resumed = (tmp_path / n for n in ("default", "deferred", "resumed"))
    train.train(quiet(output_dir=str(default), **common))
    train.train(quiet(output_dir=str(deferred), sync_every=3, **common))
    assert log_records(deferred) == log_records(default)
    interrupt_at(monkeypatch, 7)
    with pytest.raises(Interrupted):
        train.train(quiet(output_dir=str(resumed), sync_every=3, **common))
    monkeypatch.undo()
    train.train(quiet(output_dir=str(resumed), sync_every=3, **common), resume="latest")
    assert log_records(resumed) == log_records(default)


@pytest.mark.parametrize("deferred", [False, True])
def test_cudagraph_steps_mark_their_start_and_others_do_not(monkeypatch, deferred):
    """With CUDA graphs (compile_mode reduce-overhead) every step, deferred or not, tells the graph trees a new
    step starts, once; without them no step does (the mark is a CUDA-graph notion). Here in the step's
    mutation selection, so that the cudagraphs branch of training_step is checked both ways."""
    marks = []
    monkeypatch.setattr(compat, "cudagraph_mark_step_begin", lambda: marks.append(1))
    model = adapter_model()
    parts = parts_for(deferred, model=model)
    [group, second, *_] = groups(model)
    take_steps(parts, [group], deferred)
    assert marks == [], "a step without CUDA graphs marked a graph step"
    parts.cudagraphs = True
    take_steps(parts, [second], deferred)
    assert marks == [1], marks


# ----------------------------------------------------------------------------- the read and the refusals, by hand

AFTER = "; found by the deferred host read after optimizer step 6: fused AdamW skipped step {} on the device "
AFTER += "(parameters and optimizer state unchanged)"


def hand_read(policy: str, nan_weight: bool = False):
    """read_steps over four pending steps written by hand ([inputs finite, tokens, grad norm, *losses]):
    3 finite; 4 with an infinite gradient norm; 5 with a NaN loss; 6 with non-finite pixels. The guard
    guards a Linear(2, 2) (its weight NaN when ``nan_weight``)."""
    model = torch.nn.Linear(2, 2)
    guard = numerics.Guard(policy, model, torch.optim.SGD(model.parameters(), lr=0.1))
    if nan_weight:
        model.weight.data[0, 0] = math.nan
    pending = [
        PendingStep(3, 4, 0.1, torch.tensor([1, 10, 0.5, 1.25, 2.5], dtype=torch.float64)),
        PendingStep(4, 4, 0.1, torch.tensor([1, 12, math.inf, 1.0, 2.0], dtype=torch.float64)),
        PendingStep(5, 2, 0.1, torch.tensor([1, 6, 0.7, math.nan, 1.0], dtype=torch.float64)),
        PendingStep(6, 2, 0.1, torch.tensor([0, 6, math.nan, math.nan], dtype=torch.float64)),
    ]
    parts = types.SimpleNamespace(model=model, guard=guard)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # each skip announces itself
        return guard, read_steps(parts, pending)


def test_read_steps_unpacks_each_step_and_diagnoses_the_non_finite_ones_from_the_read():
    """Step 3: 10 tokens, 4 samples, losses 1.25 + 2.5 = 3.75, norm 0.5, stepped. Step 4: a finite loss (3.0)
    with an infinite norm is a "gradient" failure; step 5's NaN loss a "loss" one (norm 0.7 kept); step 6's
    pixels an "input" one (its loss is not reported: nothing meaningful ran), whose action is "inputs"."""
    guard, results = hand_read("skip")
    first = results[0]
    assert (first.action, first.tokens, first.samples, first.loss_sum) == ("step", 10, 4, 3.75), first
    assert (first.batch_losses, first.grad_norm) == ([1.25, 2.5], 0.5), first
    assert [r.action for r in results] == ["step", "skip", "skip", "inputs"]
    diagnoses = [event["diagnosis"] for event in guard.events]
    picked = [(d["step"], d["kind"], d["loss"], d["grad_norm"]) for d in diagnoses]
    assert picked[0] == (4, "gradient", 3.0, math.inf) and picked[1][:2] == (5, "loss"), picked
    assert math.isnan(picked[1][2]) and picked[1][3] == 0.7, picked
    assert picked[2][:3] == (6, "input", None) and math.isnan(picked[2][3]), picked
    assert diagnoses[0][
        "message"
    ] == "non-finite gradient at optimizer step 4; loss 3.0; gradient norm inf" + AFTER.format(4)


def test_read_steps_names_a_non_finite_weight_before_the_step_figures():
    """A NaN weight outranks the read figures: the first bad step (4) is diagnosed "parameter", naming the
    weight, and no policy goes on (skip cannot repair weights)."""
    with pytest.raises(numerics.NonFiniteError) as caught:
        hand_read("skip", nan_weight=True)
    diagnosis = caught.value.diagnosis
    assert (diagnosis.step, diagnosis.kind, diagnosis.first_parameter) == (4, "parameter", "weight"), diagnosis
    assert (
        diagnosis.message
        == "non-finite parameter at optimizer step 4; first non-finite parameter: weight" + AFTER.format(4)
    )


def refusal(monkeypatch, *, policy="skip", fused=True, scaler=False, processes=1) -> str:
    """check_deferred's message for parts described by hand ('' when accepted)."""
    monkeypatch.setattr(distributed, "world_size", lambda: processes)
    guard = types.SimpleNamespace() if policy is None else types.SimpleNamespace(policy=policy)
    parts = types.SimpleNamespace(
        guard=guard,
        optimizer=types.SimpleNamespace(param_groups=[{"fused": True}, {"fused": fused}]),
        scaler=types.SimpleNamespace(is_enabled=lambda: scaler),
    )
    try:
        check_deferred(parts)
    except ValueError as err:
        return str(err)
    return ""


def test_check_deferred_names_every_reason_at_once(monkeypatch):
    """Each reason is one sentence, all joined by "; " after one prefix; one process, fused AdamW in every
    group, no GradScaler and guard skip or raise are accepted. Two processes are already refused."""
    prefix = "deferred host reads (sync_every > 0) refused: "
    rollback = (
        "guard=rollback decides on the host before every step whether to restore the last finite state; "
        "use guard=skip (skipped on the device, exact) or guard=raise (raises at the next read, naming the step)"
    )
    not_fused = (
        "the non-finite step is skipped on the device by fused AdamW's found_inf; this optimizer is not "
        "fused (fused_optimizer=true, on a device torch has a fused AdamW kernel for)"
    )
    scaler = (
        "fp16-amp's GradScaler skips gradient overflows itself and the guard tells them from bad data "
        "on the host; use bf16 or fp32"
    )
    processes = "the token and loss totals over processes are all-reduced on the host; run one process"
    everything = refusal(monkeypatch, policy="rollback", fused=False, scaler=True, processes=2)
    assert everything == prefix + "; ".join([rollback, not_fused, scaler, processes]), everything
    assert refusal(monkeypatch, policy=None) == prefix + rollback  # a guard object without a policy
    assert refusal(monkeypatch, processes=2) == prefix + processes
    assert [refusal(monkeypatch, policy=p) for p in ("skip", "raise")] == ["", ""]
