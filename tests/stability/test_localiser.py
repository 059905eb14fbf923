"""Injected NaN/Inf anywhere is detected, attributed to the right place, and never stepped on.

Four hypothesis properties (210 generated cases) inject a non-finite value into the input
pixels, a random module's output, a random gradient or a random parameter of one shared
tiny model, run one guarded training step (trials.run_steps, the train loop's pieces) under
a random guard policy, and check: detected every time the value reaches the loss or a
gradient, the right module / parameter / gradient / sample named, no optimizer step on
non-finite values. NaN always reaches them. +-inf can be absorbed legitimately: torch's
attention maps a row of -inf scores to zero weights, sigmoid(-inf) = 0; then the step is
healthy and is taken. The shared model's adapter is restored after every case.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from qformer_lora import forward, lora
from qformer_lora.diagnostics import numerics
from qformer_lora.repro import trials

from .helpers import batches, shared_adapter_model

# the guard's warnings ("...; guard=skip: skip") are expected here, hundreds of them
pytestmark = [pytest.mark.stability, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

VALUES = st.sampled_from([math.nan, math.inf, -math.inf])
POLICIES = st.sampled_from(["raise", "skip", "rollback"])


@functools.cache
def setup():
    """(model, batch, modules whose output reaches the loss, {parameter: its elements that do})."""
    model = shared_adapter_model("fp32")
    batch = batches(model, n=1, batch_size=2)[0]
    # What the loss depends on, from one forward/backward on a copy in which every parameter
    # requires grad (so the frozen vision encoder keeps autograd too), lora_B is not zero (a
    # zero lora_B zeroes every gradient upstream of it, though a NaN still passes: 0 * NaN) and
    # every tensor output gets "+ probe": an output or parameter element with a non-zero
    # gradient reaches the loss. Zero everywhere means discarded (e.g. the last Q-Former
    # layer's text branch, or embedding rows of tokens absent from the batch).
    probe_model = copy.deepcopy(model)
    for name, param in probe_model.named_parameters():
        param.requires_grad_(True)
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    probes: dict[str, list[torch.Tensor]] = {}

    def add_probe(name):
        def hook(module, args, output):
            if torch.is_tensor(output) and output.is_floating_point():
                probe = torch.zeros_like(output, requires_grad=True)
                probes.setdefault(name, []).append(probe)
                return output + probe

        return hook

    handles = [m.register_forward_hook(add_probe(n)) for n, m in probe_model.named_modules() if n]
    forward.custom_forward(probe_model, batch).loss.backward()
    for handle in handles:
        handle.remove()
    modules = [
        name for name, calls in probes.items() if any(p.grad is not None and bool((p.grad != 0).any()) for p in calls)
    ]
    elements = {
        name: (p.grad.flatten() != 0).nonzero().flatten()
        for name, p in probe_model.named_parameters()
        if p.grad is not None and bool((p.grad != 0).any())
    }
    assert len(modules) > 100 and len(elements) > 100, (len(modules), len(elements))
    return model, batch, modules, elements


def run_guarded(model, batch, policy):
    """One guarded step: (NonFiniteError or None, trace or None, optimizer, first non-finite parameter
    after the step). The adapter is put back afterwards, also when an absorbed +-inf let the step
    go ahead, so the shared model stays as built."""
    optimizer = torch.optim.AdamW(lora.adapter_parameters(model), lr=1e-3)
    saved = [p.detach().clone() for p in lora.adapter_parameters(model)]
    error = trace = None
    try:
        trace = trials.run_steps(model, [batch], precision="fp32", steps=1, guard=policy, optimizer=optimizer)
    except numerics.NonFiniteError as raised:
        error = raised
    try:
        return error, trace, optimizer, numerics.first_non_finite_parameter(model)
    finally:
        for param, value in zip(lora.adapter_parameters(model), saved):
            param.data.copy_(value)
            param.grad = None


def detected(value, error, trace) -> bool:
    """Whether the guard fired; NaN must always be detected."""
    fired = error is not None or bool(trace["guard_events"])
    if not fired:
        assert not math.isnan(value), f"NaN went unnoticed: {trace}"
        assert trace["diagnosis"] is None and trace["optimizer_steps"] == 1, trace
        event(f"{value} absorbed")
    return fired


def caught(policy, error, trace) -> numerics.Diagnosis:
    """The diagnosis the guard acted on, checking the policy did what it promises."""
    if policy == "raise" or error is not None:
        assert error is not None, f"guard={policy} did not raise: {trace}"
        return error.diagnosis
    events = trace["guard_events"]
    assert [e["action"] for e in events] == [{"skip": "skip", "rollback": "rollback"}[policy]], events
    assert trace["optimizer_steps"] == 0, trace
    if policy == "rollback":
        assert events[0]["lr"] == pytest.approx(0.5e-3), f"lr after one rollback: {events[0]['lr']}"
    return numerics.Diagnosis(**events[0]["diagnosis"])


def assert_no_step(optimizer):
    stepped = [i for i, p in enumerate(optimizer.param_groups[0]["params"]) if optimizer.state.get(p)]
    assert not stepped, f"AdamW state exists for {len(stepped)} parameter(s): an optimizer step was taken"


@settings(max_examples=60)
@given(
    rows=st.sets(st.integers(0, 1), min_size=1),
    value=VALUES,
    where=st.integers(0, 10**6),
    with_ids=st.booleans(),
    policy=POLICIES,
)
def test_input_pixels(rows, value, where, with_ids, policy):
    model, batch, _, _ = setup()
    batch = dict(batch, pixel_values=batch["pixel_values"].clone())
    if not with_ids:
        del batch["ids"]  # synthetic batches have none
    per_row = batch["pixel_values"][0].numel()
    for row in rows:
        batch["pixel_values"][row].view(-1)[where % per_row] = value
    error, trace, optimizer, _ = run_guarded(model, batch, policy)
    if policy == "rollback":  # bad data, healthy model: skipped, not rolled back
        policy = "skip"
    diagnosis = caught(policy, error, trace)
    expected_ids = [batch["ids"][r] if with_ids else f"row {r}" for r in sorted(rows)]
    assert (diagnosis.kind, diagnosis.first_module, diagnosis.sample_ids) == ("input", "pixel_values", expected_ids), (
        diagnosis.message
    )
    assert_no_step(optimizer)


@settings(max_examples=70)
@given(index=st.integers(0, 10**6), value=VALUES, policy=POLICIES)
def test_module_output(index, value, policy):
    model, batch, modules, _ = setup()
    name = modules[index % len(modules)]
    module = dict(model.named_modules())[name]
    # output * 0 + value keeps the autograd graph (the loss must still have a grad_fn)
    handle = module.register_forward_hook(lambda m, args, output: output * 0 + value)
    try:
        error, trace, optimizer, _ = run_guarded(model, batch, policy)
    finally:
        handle.remove()
    if not detected(value, error, trace):
        return
    diagnosis = caught(policy, error, trace)
    assert diagnosis.kind == "loss" and diagnosis.first_module == name, (
        f"injected {value} into {name}: {diagnosis.message}"
    )
    assert diagnosis.sample_ids == batch["ids"] and diagnosis.first_parameter is None, diagnosis.message
    assert_no_step(optimizer)


@settings(max_examples=40)
@given(index=st.integers(0, 10**6), where=st.integers(0, 10**6), value=VALUES, policy=POLICIES)
def test_gradient(index, where, value, policy):
    model, batch, _, _ = setup()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    name, param = trainable[index % len(trainable)]

    def poison(grad):
        grad = grad.clone()
        grad.view(-1)[where % grad.numel()] = value
        return grad

    handle = param.register_hook(poison)
    try:
        error, trace, optimizer, _ = run_guarded(model, batch, policy)
    finally:
        handle.remove()
    diagnosis = caught(policy, error, trace)
    assert (diagnosis.kind, diagnosis.first_gradient, diagnosis.first_module) == ("gradient", name, None), (
        f"injected {value} into the gradient of {name}: {diagnosis.message}"
    )
    assert_no_step(optimizer)


@settings(max_examples=40)
@given(index=st.integers(0, 10**6), where=st.integers(0, 10**6), value=VALUES, policy=POLICIES)
def test_parameter(index, where, value, policy):
    """A weight going non-finite mid-run (right after the guard's start-up scan, which refuses
    non-finite weights before the first step): raise and skip stop, rollback restores an adapter
    weight from its snapshot and stops on a frozen one."""
    model, batch, _, elements = setup()
    name = sorted(elements)[index % len(elements)]
    flat = dict(model.named_parameters())[name].data.view(-1)
    position = int(elements[name][where % len(elements[name])])
    original = flat[position].item()

    class CorruptAfterScan(numerics.Guard):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            flat[position] = value

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(numerics, "Guard", CorruptAfterScan)  # the Guard that the step builds
            error, trace, optimizer, still_bad = run_guarded(model, batch, policy)
    finally:
        flat[position] = original
    if not detected(value, error, trace):
        assert still_bad == name, f"scan of an absorbed {value} in {name} found {still_bad}"
        return
    if policy == "rollback" and dict(model.named_parameters())[name].requires_grad:
        diagnosis = caught(policy, error, trace)  # an adapter weight: the snapshot repairs it
        assert still_bad is None, f"rollback left {still_bad} non-finite"
    else:  # skip cannot repair weights, nor rollback a frozen one
        assert error is not None, f"guard={policy} went on with non-finite {name}: {trace}"
        diagnosis = error.diagnosis
    assert (diagnosis.kind, diagnosis.first_parameter) == ("parameter", name), (
        f"injected {value} into {name}: {diagnosis.message}"
    )
    assert diagnosis.first_module is not None, diagnosis.message
    assert_no_step(optimizer)


def test_parameter_non_finite_before_training_is_refused():
    model, batch, _, _ = setup()
    name, param = next((n, p) for n, p in model.named_parameters() if n.endswith("language_projection.weight"))
    original = param.data[0, 0].item()
    param.data[0, 0] = math.inf
    try:
        error, _, optimizer, _ = run_guarded(model, batch, "skip")
    finally:
        param.data[0, 0] = original
    assert error is not None and error.diagnosis.first_parameter == name, error
    assert "before the first step" in str(error)
    assert_no_step(optimizer)


def test_inputs_embeds_caught_by_the_rerun():
    """A NaN made outside any module (the torch.cat that builds inputs_embeds) is still placed."""
    model, batch, _, _ = setup()

    def poison(module, args, kwargs):
        kwargs["inputs_embeds"] = kwargs["inputs_embeds"].clone().fill_(math.nan)
        return args, kwargs

    handle = forward.compat.unwrap(model).language_model.register_forward_pre_hook(poison, with_kwargs=True)
    try:
        error, _, optimizer, _ = run_guarded(model, batch, "raise")
    finally:
        handle.remove()
    assert error is not None and error.diagnosis.first_module.startswith("language_model input inputs_embeds"), (
        error and error.diagnosis.message
    )
    assert_no_step(optimizer)


def test_model_left_untouched():
    """The shared model is what the properties above assume: finite and never stepped on."""
    model, _, _, _ = setup()
    assert numerics.first_non_finite_parameter(model) is None
    assert all(float(p.detach().abs().sum()) == 0 for n, p in model.named_parameters() if "lora_B" in n), (
        "lora_B moved away from its zero init: some optimizer step was taken"
    )
