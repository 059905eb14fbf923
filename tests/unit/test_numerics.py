"""Unit tests of diagnostics/numerics.py (diagnosis, checks, guard state) and diagnostics/doctor.py (findings, CLI)."""

from __future__ import annotations

import inspect
import json
import math
import os
import types
import warnings
from dataclasses import asdict

import pytest
import torch

from qformer_lora import cli, compat, lora, precision
from qformer_lora.diagnostics import doctor, numerics
from qformer_lora.training import train

# ----------------------------------------------------------------------------- fp16 facts


def test_rounds_to_zero():
    assert numerics.rounds_to_zero(1e-8, torch.float16)  # AdamW's default eps
    assert not numerics.rounds_to_zero(2.0**-24, torch.float16)  # smallest fp16 subnormal
    assert not numerics.rounds_to_zero(1e-8, torch.float32) and not numerics.rounds_to_zero(1e-8, torch.bfloat16)
    assert not numerics.rounds_to_zero(0.0, torch.float16)


# ----------------------------------------------------------------------------- diagnosis and checks


def test_diagnosis_message_names_everything():
    d = numerics.Diagnosis(
        3,
        "parameter",
        first_module="m",
        first_parameter="p.weight",
        first_gradient="g",
        sample_ids=["a", "b"],
        loss=math.nan,
        grad_norm=math.inf,
    )
    for part in ("step 3", "parameter", "module output: m", "parameter: p.weight", "gradient: g", "samples: a, b"):
        assert part in d.message, (part, d.message)
    with pytest.raises(ValueError, match="unknown diagnosis kind"):
        numerics.Diagnosis(0, "weights")


@pytest.mark.parametrize("ids", [None, ["x", "y", "z"]])
def test_check_inputs_names_the_bad_rows(ids):
    batch = {"pixel_values": torch.zeros(3, 3, 4, 4)}
    if ids:
        batch["ids"] = ids
    assert numerics.check_inputs(batch, 0) is None
    batch["pixel_values"][2, 1, 0, 3] = math.inf
    batch["pixel_values"][0, 0, 0, 0] = math.nan
    d = numerics.check_inputs(batch, 7)
    assert (d.kind, d.step, d.first_module) == ("input", 7, "pixel_values")
    assert d.sample_ids == (["x", "z"] if ids else ["row 0", "row 2"]), d.sample_ids


def test_first_non_finite_in_named_parameters_order():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert numerics.first_non_finite_parameter(model) is None
    model[1].bias.data[0] = math.nan
    model[0].weight.data[1, 1] = -math.inf
    assert numerics.first_non_finite_parameter(model) == "0.weight"
    model[0].weight.grad = torch.zeros(2, 2)
    model[1].weight.grad = torch.full((2, 2), math.nan)
    assert numerics.first_non_finite_gradient(model) == "1.weight"


def test_clip_gradients_keeps_non_finite_gradients_in_place():
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
    params[0].grad, params[1].grad, params[2].grad = torch.ones(3), torch.tensor([1.0, math.nan, 1.0]), torch.ones(3)
    norm = numerics.clip_gradients(params, 0.1)
    assert math.isnan(float(norm))
    # torch's own clip would multiply every gradient by 0.1 / nan
    assert torch.equal(params[0].grad, torch.ones(3)) and torch.equal(params[2].grad, torch.ones(3))
    params[1].grad = torch.ones(3)
    norm = numerics.clip_gradients(params, 0.1)
    assert float(norm) == pytest.approx(3.0) and float(params[0].grad[0]) == pytest.approx(0.1 / 3, rel=1e-4)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the guard announces each rollback
def test_guard_snapshot_and_restore():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    guard = numerics.Guard("rollback", model, optimizer, scheduler, rollback_lr_factor=0.5)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    guard.healthy()  # state after one step
    after_one = [p.detach().clone() for p in model.parameters()]
    state_one = {k: v.clone() for k, v in optimizer.state[model.weight].items()}
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    model.weight.data.fill_(math.nan)
    action = guard.handle(numerics.Diagnosis(2, "parameter", first_parameter="weight"))
    assert action == "skip" and guard.rollbacks == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), after_one))
    assert all(torch.equal(optimizer.state[model.weight][k], v) for k, v in state_one.items())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05) and scheduler.base_lrs == [pytest.approx(0.05)]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_guard_rollback_to_the_initial_state_clears_adamw():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    guard = numerics.Guard("rollback", model, optimizer)  # snapshot of the initial adapter
    initial = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    assert guard.handle(numerics.Diagnosis(1, "loss")) == "skip"
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), initial))
    assert not any(optimizer.state.get(p) for p in model.parameters()), "AdamW moments survived the rollback"
    guard.max_rollbacks = 1
    with pytest.raises(numerics.NonFiniteError, match=r"gave up after 1 rollback"):
        guard.handle(numerics.Diagnosis(2, "loss"))


def test_guard_rejects_unknown_policy():
    model = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="unknown guard policy"):
        numerics.Guard("ignore", model, torch.optim.AdamW(model.parameters()))


def handled(guard, diagnosis):
    """guard.handle(diagnosis), the warnings it issued (every one kept: "always") and the line that called it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 2
        # stacklevel=3: warn in _record (1), _record's call in handle (2), this call of handle (3)
        action = guard.handle(diagnosis)
    return action, caught, (__file__, line)


def assert_one_warning(caught, text: str, call_site: tuple[str, int]):
    assert [w.category for w in caught] == [RuntimeWarning], [(w.category, str(w.message)) for w in caught]
    assert str(caught[0].message) == text, str(caught[0].message)
    # the user is pointed at the code that called handle (the training loop), not at numerics.py. Not
    # under mutmut: its trampolines add frames between handle and its caller, so the stacklevel line is
    # left out of the mutation run ("# pragma: no mutate" in numerics.Guard._record)
    at = (caught[0].filename, caught[0].lineno)
    if "MUTANT_UNDER_TEST" not in os.environ:
        assert at == call_site, f"warning attributed to {at}, not to the call of handle at {call_site}"


def test_guard_skip_counts_records_and_warns_each_skip():
    """Two skipped failures: skipped == 2 (one per skip), each recorded with lr and rollbacks unchanged."""
    model = torch.nn.Linear(3, 2)
    guard = numerics.Guard("skip", model, torch.optim.AdamW(model.parameters(), lr=0.1))
    first, second = numerics.Diagnosis(4, "loss", first_module="fc"), numerics.Diagnosis(5, "gradient")
    action, caught, call_site = handled(guard, first)
    assert action == "skip"
    # Diagnosis.describe: "non-finite <kind> at optimizer step <step>" then "; first non-finite module output: fc";
    # _record appends "; guard=<policy>: <action>" and, for a skip, nothing more
    assert_one_warning(
        caught, "non-finite loss at optimizer step 4; first non-finite module output: fc; guard=skip: skip", call_site
    )
    assert guard.events == [
        {"type": "guard", "action": "skip", "step": 4, "lr": 0.1, "rollbacks": 0, "diagnosis": asdict(first)}
    ], guard.events
    assert handled(guard, second)[0] == "skip"
    assert guard.skipped == 2 and guard.rollbacks == 0, (guard.skipped, guard.rollbacks)


def test_guard_rollback_is_recorded_with_the_new_lr_and_not_counted_as_a_skip():
    """lr 0.1 * rollback_lr_factor 0.5 = 0.05, shown as "lr now 0.05" (3 significant digits), rollback 1 of 3."""
    model = torch.nn.Linear(3, 2)
    guard = numerics.Guard("rollback", model, torch.optim.AdamW(model.parameters(), lr=0.1), rollback_lr_factor=0.5)
    diagnosis = numerics.Diagnosis(2, "loss")
    action, caught, call_site = handled(guard, diagnosis)
    assert action == "skip"
    assert_one_warning(
        caught, "non-finite loss at optimizer step 2; guard=rollback: rollback (lr now 0.05, rollback 1/3)", call_site
    )
    assert guard.events == [
        {"type": "guard", "action": "rollback", "step": 2, "lr": 0.05, "rollbacks": 1, "diagnosis": asdict(diagnosis)}
    ], guard.events
    assert guard.skipped == 0 and guard.rollbacks == 1, (guard.skipped, guard.rollbacks)


def test_guard_rollback_skips_bad_inputs_without_rolling_back():
    """Bad data breaks nothing in the model: the batch is skipped, lr (0.1) and the adapter stay as they are."""
    model = torch.nn.Linear(3, 2)
    guard = numerics.Guard("rollback", model, torch.optim.AdamW(model.parameters(), lr=0.1))
    before = [p.detach().clone() for p in model.parameters()]
    action, caught, call_site = handled(guard, numerics.Diagnosis(3, "input", sample_ids=["q7"]))
    assert action == "skip"
    assert_one_warning(caught, "non-finite input at optimizer step 3; samples: q7; guard=rollback: skip", call_site)
    assert (guard.skipped, guard.rollbacks, guard.optimizer.param_groups[0]["lr"]) == (1, 0, 0.1), guard.events
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("kind", ["loss", "input"])
def test_guard_raise_raises_with_the_diagnosis_own_message(kind):
    """policy "raise" neither skips (even bad inputs) nor adds a note: the message is the diagnosis' alone."""
    model = torch.nn.Linear(3, 2)
    guard = numerics.Guard("raise", model, torch.optim.AdamW(model.parameters(), lr=0.1))
    with pytest.raises(numerics.NonFiniteError) as caught:
        guard.handle(numerics.Diagnosis(1, kind))
    assert str(caught.value) == f"non-finite {kind} at optimizer step 1", str(caught.value)
    assert guard.events == [] and guard.skipped == 0


@pytest.mark.parametrize(
    ("parameter", "note"),
    [
        (
            "0.weight",
            "guard=skip cannot continue: a frozen base-model parameter is non-finite, no policy can repair it",
        ),
        (
            "1.weight",
            "guard=skip cannot continue: the parameters themselves are non-finite, every later step would fail",
        ),
    ],
)
def test_guard_skip_refuses_non_finite_parameters_and_says_why(parameter, note):
    """Layer 0 is frozen (not in the optimizer), layer 1 is trained: skipping repairs neither."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    guard = numerics.Guard("skip", model, torch.optim.AdamW(model[1].parameters(), lr=0.1))
    with pytest.raises(numerics.NonFiniteError) as caught:
        guard.handle(numerics.Diagnosis(2, "parameter", first_parameter=parameter))
    # NonFiniteError: the diagnosis' message, then " (<note>)"
    expected = f"non-finite parameter at optimizer step 2; first non-finite parameter: {parameter} ({note})"
    assert str(caught.value) == expected, str(caught.value)


def sparse_model():
    return torch.nn.Embedding(4, 2, sparse=True)


@pytest.mark.parametrize(
    ("build", "optimizer_class"),
    [(lambda: torch.nn.Linear(3, 2), torch.optim.AdamW), (sparse_model, torch.optim.SparseAdam)],
    ids=["adamw", "sparse_adam"],
)
def test_guard_restores_the_same_snapshot_twice(build, optimizer_class):
    """A restore copies the snapshot's optimizer state: the next step's in-place moment updates must not
    reach the snapshot, so a second restore gives the snapshot's values again. SparseAdam keeps its step
    as a Python int (AdamW: a tensor), which the restore passes on as it is."""
    model = build()
    optimizer = optimizer_class(model.parameters(), lr=0.1)
    guard = numerics.Guard("rollback", model, optimizer)
    weight = next(model.parameters())

    def train_step():
        out = model(torch.tensor([0, 2])) if isinstance(model, torch.nn.Embedding) else model(torch.ones(1, 3))
        out.sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    train_step()
    guard.healthy()
    saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[weight].items()}
    for attempt in ("first", "second"):
        guard.restore()
        state = optimizer.state[weight]
        assert state.keys() == saved.keys(), (attempt, state.keys())
        for key, value in saved.items():
            same = torch.equal(state[key], value) if torch.is_tensor(value) else state[key] == value
            assert same, f"{attempt} restore: optimizer state {key!r} is {state[key]}, the snapshot held {value}"
        train_step()  # updates the restored moments in place
        assert not torch.equal(optimizer.state[weight]["exp_avg"], saved["exp_avg"]), "the step changed nothing"


# ----------------------------------------------------------------------------- doctor


def codes(findings):
    return {f.code: f.severity for f in findings}


def test_doctor_flags_the_seed_configuration():
    found = codes(doctor.check_config("fp16-pure", lr=5e-6, adam_eps=1e-8, text_model_type="t5"))
    assert found == {"adapters-fp16": "fatal", "eps-underflow": "fatal", "t5-fp16": "warning"}, found


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_doctor_is_quiet_on_recommended_settings(precision):
    assert doctor.check_config(precision, lr=1e-4, adam_eps=1e-8, weight_decay=0.01, text_model_type="t5") == []


def test_doctor_optimizer_settings_in_fp16():
    found = codes(doctor.check_config("fp16-pure", lr=1e-8, adam_eps=1e-4, weight_decay=0.01))
    assert "eps-underflow" not in found and found["lr-underflow"] == "warning"
    assert found["weight-decay-lost"] == "warning", found


def test_doctor_fp16_amp_t5_is_a_warning_only():
    assert codes(doctor.check_config("fp16-amp", lr=1e-4, adam_eps=1e-8, text_model_type="t5")) == {
        "t5-fp16": "warning"
    }
    assert doctor.check_config("fp16-amp", lr=1e-4, adam_eps=1e-8, text_model_type="opt") == []


def test_doctor_bf16_without_hardware_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    found = doctor.check_config("bf16", lr=1e-4, adam_eps=1e-8, device="cuda")
    assert codes(found) == {"bf16-unsupported": "fatal"} and "V100" in found[0].message


def test_doctor_check_model_sees_real_dtypes():
    model = torch.nn.Linear(4, 4).half()
    optimizer = torch.optim.AdamW(model.parameters(), eps=1e-8, weight_decay=0.0)
    assert codes(doctor.check_model(model, optimizer)) == {"adapters-fp16": "fatal", "eps-underflow": "fatal"}
    fused = torch.optim.AdamW(model.parameters(), eps=1e-8, weight_decay=0.0, fused=True)  # fp32 opmath keeps eps
    assert "eps-underflow" not in codes(doctor.check_model(model, fused))


@pytest.mark.parametrize("name", precision.NAMES)
def test_precision_table_matches_build_adapter_model(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = train.build_adapter_model(train.TrainConfig(base_checkpoint=None, precision=name))
    row = precision.get(name)
    base_dtype, adapter_dtype = row.weights, row.adapters
    assert {p.dtype for p in lora.adapter_parameters(model)} == {adapter_dtype}
    frozen = {p.dtype for n, p in model.named_parameters() if not p.requires_grad and "query_tokens" not in n}
    assert frozen == {base_dtype}, (name, frozen)


def test_enforce_refuses_fatal_unless_allowed():
    findings = doctor.check_config("fp16-pure", lr=1e-4, adam_eps=1e-8)
    with pytest.raises(doctor.UnsafePrecisionError, match="adapters-fp16"):
        doctor.enforce(findings)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        doctor.enforce(findings, allow_unsafe=True)  # allowed: every finding still announced
    assert {f.code for f in findings} == {
        code for f in findings for w in caught if f.code in str(w.message) for code in [f.code]
    }, [str(w.message) for w in caught]


def test_cli_doctor(capsys):
    assert cli.main(["doctor", "--precision", "fp16-pure"]) == 1
    out = capsys.readouterr().out
    assert "[fatal] eps-underflow" in out and "fix:" in out
    assert cli.main(["doctor", "--precision", "bf16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fatal"] == 0 and report["findings"] == [], report


def test_peft_default_adapter_dtype_is_what_peft_does():
    """compat's table agrees with the installed peft (the switch between NaN and no NaN)."""
    from qformer_lora import presets

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lora.apply_lora(presets.build_model("tiny-blip2-opt", dtype=torch.float16), lora.LoraSpec(r=2))
    assert {p.dtype for p in lora.adapter_parameters(model)} == {compat.peft_default_adapter_dtype(torch.float16)}


# ----------------------------------------------------------------------------- the localiser, by hand


def test_all_finite_looks_inside_dicts_and_tuples():
    """A module output is a tensor, a tuple/list or a dict (ModelOutput); one NaN anywhere inside is non-finite."""
    nan = torch.tensor([1.0, float("nan")])
    assert not numerics.all_finite({"logits": nan}) and not numerics.all_finite((torch.ones(2), nan))
    assert numerics.all_finite({"logits": torch.ones(2), "ids": torch.tensor([1, 2])})


class _ScaledLoss:
    """run_forward for a Linear: loss = sum(linear(x)) * scale; a non-finite scale poisons the loss only
    after every module has returned finite outputs (so no module is to blame). Records the batches run."""

    def __init__(self, model):
        self.model, self.ran = model, []

    def __call__(self, batch):
        self.ran.append(batch["ids"][0])
        return types.SimpleNamespace(loss=self.model(batch["x"]).sum() * batch["scale"])


def _batch(name: str, scale: float = 1.0, pixel: float = 0.0) -> dict:
    return {"ids": [name], "x": torch.ones(1, 2), "scale": scale, "pixel_values": torch.full((1, 3), pixel)}


def test_localise_reruns_the_non_finite_batch_first_and_names_it():
    """losses [1.0, inf]: the re-run starts with batch "b" (non-finite loss first) and stops there, since its
    loss is non-finite again; no module output is, so the kind is "loss" (the summed loss is inf), not "gradient"."""
    model = torch.nn.Linear(2, 2)
    run = _ScaledLoss(model)
    batches = [_batch("a"), _batch("b", scale=float("inf"))]
    found = numerics.localise(model, batches, 7, run, losses=[1.0, float("inf")], grad_norm=torch.tensor(3.0))
    assert run.ran == ["b"], f"re-ran {run.ran}: the batch with the non-finite loss goes first, and alone"
    assert (found.step, found.kind, found.sample_ids, found.first_module) == (7, "loss", ["b"], None), found
    assert (found.loss, found.grad_norm) == (float("inf"), 3.0), found


def test_localise_without_losses_reruns_in_order_until_a_batch_fails():
    """No losses given (every entry None): the batches re-run in their order; "a" is finite, "b" is not, so
    "b" is named. The summed loss is unknown (None), and with nothing non-finite but the re-run the kind
    is "gradient"."""
    model = torch.nn.Linear(2, 2)
    run = _ScaledLoss(model)
    found = numerics.localise(model, [_batch("a"), _batch("b", scale=float("nan"))], 2, run)
    assert run.ran == ["a", "b"] and found.sample_ids == ["b"], (run.ran, found)
    assert (found.kind, found.loss) == ("gradient", None), found


def test_localise_names_non_finite_pixels_before_anything_else():
    """A NaN pixel in the second batch: the diagnosis is that batch's input, at this step, and nothing re-runs."""
    model = torch.nn.Linear(2, 2)
    run = _ScaledLoss(model)
    found = numerics.localise(model, [_batch("a"), _batch("b", pixel=float("nan"))], 5, run, losses=[1.0, 1.0])
    assert (found.step, found.kind, found.sample_ids, found.first_module) == (5, "input", ["b"], "pixel_values")
    assert run.ran == [], f"re-ran {run.ran} although an input was already non-finite"


def _two_layer_guard(policy: str):
    """Linear(2, 2) -> Linear(2, 2) with the first layer frozen, as the base model around an adapter is."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)
    optimizer = torch.optim.SGD(model[1].parameters(), lr=0.1)
    return model, numerics.Guard(policy, model, optimizer, run_forward=_ScaledLoss(model))


def test_fp16_scaler_overflow_ignores_frozen_weights_but_not_trainable_ones():
    """scaler_enabled with finite losses: GradScaler owns the step ("scaler") unless a *trainable* parameter is
    non-finite. A NaN in the frozen layer is not one (trainable_only=True), so "scaler" comes back; a NaN in the
    trainable layer is, and the step is localised: a non-finite parameter ends a skip run with NonFiniteError."""
    model, guard = _two_layer_guard("skip")
    model[0].weight.data[0, 0] = math.nan  # after Guard's own check of the weights at construction
    assert guard.non_finite(3, [_batch("a")], [1.0], torch.tensor(math.inf), scaler_enabled=True) == "scaler"
    model, guard = _two_layer_guard("skip")
    model[1].weight.data[0, 0] = math.nan
    with pytest.raises(numerics.NonFiniteError) as caught:
        guard.non_finite(3, [_batch("a")], [1.0], torch.tensor(math.inf), scaler_enabled=True)
    assert (caught.value.diagnosis.kind, caught.value.diagnosis.first_parameter) == ("parameter", "1.weight")


def test_non_finite_without_a_scaler_localises_and_records_the_step_figures():
    """scaler_enabled defaults to False: with every parameter finite the step is localised (not left to a
    scaler), and the loss and gradient norm the loop saw reach the recorded diagnosis: losses [1.0, 2.0] sum
    to 3.0, grad norm inf. Nothing is non-finite on re-run, so the kind is "gradient" and the message says
    that the gradients are finite and their norm overflowed."""
    model, guard = _two_layer_guard("skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the skip announces itself
        action = guard.non_finite(4, [_batch("a"), _batch("b")], [1.0, 2.0], torch.tensor(math.inf))
    assert action == "skip" and len(guard.events) == 1, guard.events
    recorded = guard.events[0]["diagnosis"]
    assert (recorded["step"], recorded["kind"], recorded["loss"], recorded["grad_norm"]) == (
        4,
        "gradient",
        3.0,
        math.inf,
    )
    assert recorded["message"] == (
        "non-finite gradient at optimizer step 4; loss 3.0; gradient norm inf; every gradient is finite: "
        "their norm overflowed the gradient dtype (use fp32 adapters)"
    ), recorded["message"]


def test_non_finite_error_adds_a_note_in_parentheses_and_nothing_without_one():
    """NonFiniteError(diagnosis) is the diagnosis' message alone; a note is appended as " (note)"."""
    diagnosis = numerics.Diagnosis(2, "loss")
    assert str(numerics.NonFiniteError(diagnosis)) == "non-finite loss at optimizer step 2"
    noted = numerics.NonFiniteError(diagnosis, "why")
    assert str(noted) == "non-finite loss at optimizer step 2 (why)" and noted.diagnosis is diagnosis


def test_rollback_without_a_snapshot_refuses_with_the_diagnosis():
    """A rollback guard whose snapshot is gone (none taken yet) cannot roll back: it raises with the
    diagnosis attached and says why, instead of restoring nothing."""
    model, guard = _two_layer_guard("rollback")
    guard._snapshot = None
    diagnosis = numerics.Diagnosis(6, "loss")
    with pytest.raises(numerics.NonFiniteError) as caught:
        guard.handle(diagnosis)
    assert caught.value.diagnosis is diagnosis
    assert str(caught.value) == "non-finite loss at optimizer step 6 (guard=rollback has no finite state to return to)"


def test_check_parameters_before_a_save_looks_at_the_trainable_weights_only():
    """Before evaluation and checkpoints: a NaN in a frozen weight is not the adapter's (no error; the
    frozen model was checked at construction), a NaN in a trainable one is named, at the step given."""
    model, guard = _two_layer_guard("raise")
    model[0].weight.data[0, 0] = math.nan
    guard.check_parameters(9)  # nothing raised: only trainable parameters are checked here
    model, guard = _two_layer_guard("raise")
    model[1].bias.data[1] = math.nan
    with pytest.raises(numerics.NonFiniteError) as caught:
        guard.check_parameters(9)
    assert str(caught.value) == "non-finite parameter at optimizer step 9; first non-finite parameter: 1.bias"


def test_inputs_ok_skips_or_raises_on_non_finite_pixels_and_passes_finite_ones():
    """One NaN pixel in the second of two batches at step 4: "skip" records one skip naming that batch's
    sample and tells the loop not to step (False); "raise" raises with the same diagnosis and no note.
    Finite batches pass (True) and record nothing."""
    good, bad = _batch("a"), _batch("b", pixel=math.nan)
    model, guard = _two_layer_guard("skip")
    assert guard.inputs_ok([good], 4) is True and guard.events == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the skip announces itself
        assert guard.inputs_ok([good, bad], 4) is False
    [event] = guard.events
    assert (event["action"], event["step"], guard.skipped) == ("skip", 4, 1), event
    assert (event["diagnosis"]["kind"], event["diagnosis"]["sample_ids"]) == ("input", ["b"]), event
    model, guard = _two_layer_guard("raise")
    with pytest.raises(numerics.NonFiniteError) as caught:
        guard.inputs_ok([good, bad], 4)
    assert (
        str(caught.value)
        == "non-finite input at optimizer step 4; first non-finite module output: pixel_values; samples: b"
    )
    assert guard.events == []


def test_rollback_snapshot_reuses_its_buffers_and_holds_the_latest_state():
    """healthy() after every finite step copies into the buffers of the previous snapshot (no new
    allocation per step) once AdamW has state: the same tensor objects, holding the newest values."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    guard = numerics.Guard("rollback", model, optimizer)

    def step_and_snapshot():
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        guard.healthy()
        return {p: (copy, dict(state)) for p, (copy, state) in guard._snapshot.items()}

    first, second = step_and_snapshot(), step_and_snapshot()
    for p, (copy, state) in second.items():
        assert copy is first[p][0] and torch.equal(copy, p), "parameter snapshot not reused or not updated"
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert state[key] is first[p][1][key], f"{key}: a new buffer instead of the previous snapshot's"
            assert torch.equal(state[key], optimizer.state[p][key]), f"{key}: the snapshot is not the latest state"


def test_a_loss_diagnosis_gets_no_overflow_note():
    """The overflow note is for a "gradient" diagnosis with every gradient finite; a non-finite loss
    (no gradient computed yet: all None) is described as it is."""
    model = torch.nn.Linear(2, 2)
    found = numerics.localise(model, [_batch("a", scale=math.inf)], 3, _ScaledLoss(model), losses=[math.inf])
    assert found.message == "non-finite loss at optimizer step 3; loss inf; samples: a", found.message


def test_clip_gradients_passes_on_a_runtime_error_that_is_not_about_the_norm(monkeypatch):
    """clip_grad_norm_ raises RuntimeError for a non-finite norm (error_if_nonfinite) and for other faults
    (a foreach kernel, mixed devices): with finite gradients the error is not the norm's and is raised as is."""
    weight = torch.nn.Parameter(torch.ones(2))
    weight.grad = torch.full((2,), 3.0)

    def broken(*args, **kwargs):
        raise RuntimeError("foreach kernel failed")

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", broken)
    with pytest.raises(RuntimeError, match="foreach kernel failed"):
        numerics.clip_gradients([weight], 1.0)
    weight.grad = torch.tensor([3.0, math.inf])
    assert float(numerics.clip_gradients([weight], 1.0)) == math.inf  # the norm's own error: the norm comes back


def test_guard_refuses_a_model_with_non_finite_weights_before_the_first_step():
    """Whatever the policy: NonFiniteError at step 0 naming the parameter, and why no step was taken."""
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.bias[1] = math.nan
    with pytest.raises(numerics.NonFiniteError) as caught:
        numerics.Guard("skip", model, torch.optim.SGD(model.parameters(), lr=0.1))
    diagnosis = caught.value.diagnosis
    assert (diagnosis.step, diagnosis.kind, diagnosis.first_parameter) == (0, "parameter", "bias"), diagnosis
    assert str(caught.value).endswith(
        " (before the first step: the model was built or loaded with non-finite weights)"
    ), caught.value


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_guard_rollback_built_over_a_resumed_optimizer_returns_to_its_state():
    """A resumed run builds the guard after restoring AdamW's moments: the first snapshot holds them (no
    earlier snapshot to reuse buffers from), and a rollback returns to them, with lr x 0.5 (the default
    rollback_lr_factor) on the optimizer and the scheduler's base."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    resumed = {k: v.clone() for k, v in optimizer.state[model.weight].items()}
    weights = [p.detach().clone() for p in model.parameters()]
    guard = numerics.Guard("rollback", model, optimizer, scheduler)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    assert guard.handle(numerics.Diagnosis(2, "loss")) == "skip"
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), weights))
    assert all(torch.equal(optimizer.state[model.weight][k], v) for k, v in resumed.items())
    assert (optimizer.param_groups[0]["lr"], scheduler.base_lrs) == (0.05, [0.05])
