"""Guard policies (raise | skip | rollback), the doctor's refusal, and GradScaler's own path,
through trials.run_steps and through the real entry point train.train on a tiny run."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch

from qformer_lora import checkpoint, data, lora
from qformer_lora.diagnostics import doctor, numerics
from qformer_lora.repro import trials
from qformer_lora.training import train
from qformer_lora.training.step import linear_warmup_decay

from .helpers import SEED_PRESET, adapter_model, batches

pytestmark = [pytest.mark.stability, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

POISONED = "base_model.model.qformer.encoder.layer.0.attention.output.dense"


def poison_after(model, calls: int, name: str = POISONED, once: bool = False):
    """NaN out of module ``name`` from its (calls+1)-th training forward on (only that one if ``once``);
    the localiser's no_grad re-run of a poisoned step is poisoned too."""
    state = {"calls": 0, "poisoned": False}

    def hook(module, args, output):
        if torch.is_grad_enabled():
            state["calls"] += 1
            state["poisoned"] = state["calls"] == calls + 1 if once else state["calls"] > calls
        return output * 0 + math.nan if state["poisoned"] else None

    return dict(model.named_modules())[name].register_forward_hook(hook)


def adamw_steps(optimizer) -> set[int]:
    return {int(s["step"]) for s in optimizer.state.values()}


# ----------------------------------------------------------------------------- run_steps


def test_skip_drops_a_transient_failure_and_goes_on():
    model = adapter_model("fp32")
    poison_after(model, calls=2, once=True)
    optimizer = torch.optim.AdamW(lora.adapter_parameters(model), lr=1e-3)
    trace = trials.run_steps(model, batches(model), precision="fp32", steps=4, guard="skip", optimizer=optimizer)
    assert [e["action"] for e in trace["guard_events"]] == ["skip"], trace["guard_events"]
    assert trace["guard_events"][0]["diagnosis"]["first_module"] == POISONED
    assert trace["optimizer_steps"] == 3 and adamw_steps(optimizer) == {3}, (trace, adamw_steps(optimizer))


def test_skip_aborts_when_the_parameters_are_non_finite():
    """The seed's "skip the NaN batch" would skip forever: its parameters are NaN after step 0."""
    model = adapter_model("fp16-pure", r=4)
    with pytest.raises(numerics.NonFiniteError, match="guard=skip cannot continue") as caught:
        trials.run_steps(model, batches(model), precision="fp16-pure", steps=4, lr=5e-6, guard="skip")
    diagnosis = caught.value.diagnosis
    assert (diagnosis.step, diagnosis.kind) == (1, "parameter") and "lora_A" in diagnosis.first_parameter, (
        diagnosis.message
    )


def test_rollback_restores_the_last_finite_state_and_lowers_lr():
    model = adapter_model("fp32")
    poison_after(model, calls=2, once=True)
    optimizer = torch.optim.AdamW(lora.adapter_parameters(model), lr=1e-3)
    trace = trials.run_steps(model, batches(model), precision="fp32", steps=4, guard="rollback", optimizer=optimizer)
    events = trace["guard_events"]
    assert [e["action"] for e in events] == ["rollback"], events
    # updates of steps 0 and 1 were taken; step 2 failed, so the state before step 1's update
    # (AdamW step 1) came back, and step 3 took AdamW to step 2 (skip would have reached 3)
    assert adamw_steps(optimizer) == {2}, adamw_steps(optimizer)
    assert numerics.first_non_finite_parameter(model) is None
    schedule = (100 - 2) / 100  # linear decay without warm-up at scheduler step 2 of 100
    assert events[0]["lr"] == pytest.approx(1e-3 * schedule * 0.5), events[0]


def test_rollback_gives_up_after_max_rollbacks():
    """fp16-pure fails after every update: each rollback lowers lr, and none can fix eps = 0."""
    model = adapter_model("fp16-pure", r=4)
    optimizer = torch.optim.AdamW(lora.adapter_parameters(model), lr=1e-4, eps=1e-8)
    seen = []
    guard_record = numerics.Guard._record

    def spy(self, action, diagnosis):
        guard_record(self, action, diagnosis)
        seen.append(self.events[-1])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(numerics.Guard, "_record", spy)
        with pytest.raises(numerics.NonFiniteError, match=r"gave up after 2 rollback\(s\)") as caught:
            trials.run_steps(
                model,
                batches(model),
                precision="fp16-pure",
                steps=10,
                lr=1e-4,
                guard="rollback",
                max_rollbacks=2,
                optimizer=optimizer,
            )
    assert [e["action"] for e in seen] == ["rollback", "rollback"], seen
    assert [e["step"] for e in seen] == [1, 3] and caught.value.diagnosis.step == 5, (seen, caught.value.diagnosis)
    base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    assert base_lrs == [pytest.approx(1e-4 * 0.25)], f"base lr after two rollbacks: {base_lrs}"


def test_fp16_amp_gradient_overflow_is_left_to_gradscaler():
    model = adapter_model("fp16-amp")
    name, param = next((n, p) for n, p in model.named_parameters() if "lora_B" in n)
    param.register_hook(lambda grad: grad * math.inf)  # every step: inf gradients, finite loss
    trace = trials.run_steps(model, batches(model), precision="fp16-amp", steps=3, guard="raise")
    assert trace["guard_events"] == [] and trace["scaler_skipped"] == 3 and trace["optimizer_steps"] == 0, trace
    assert all(trace["finite"]), trace["losses"]


def test_fp16_amp_still_catches_non_finite_parameters(monkeypatch):
    model = adapter_model("fp16-amp")
    name, param = next((n, p) for n, p in model.named_parameters() if "lora_A" in n)

    class CorruptAfterScan(numerics.Guard):  # mid-run, past the guard's start-up scan
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            param.data[0, 0] = math.nan

    monkeypatch.setattr(numerics, "Guard", CorruptAfterScan)
    with pytest.raises(numerics.NonFiniteError) as caught:
        trials.run_steps(model, batches(model), precision="fp16-amp", steps=2, guard="raise")
    assert (caught.value.diagnosis.kind, caught.value.diagnosis.first_parameter) == ("parameter", name)
    assert "before the first step" not in str(caught.value)


def test_non_finite_weights_are_refused_before_the_first_step():
    model = adapter_model("fp32")
    name, param = next((n, p) for n, p in model.named_parameters() if "vision_model" in n)
    param.data.view(-1)[0] = math.inf
    for policy in ("raise", "skip", "rollback"):
        with pytest.raises(numerics.NonFiniteError, match="before the first step") as caught:
            trials.run_steps(model, batches(model), precision="fp32", steps=1, guard=policy)
        assert caught.value.diagnosis.first_parameter == name, caught.value.diagnosis.message


# ----------------------------------------------------------------------------- train.train


@pytest.fixture
def tiny_run(tmp_path):
    """A TrainConfig for a ~1 s run: random tiny preset, 8 training and 4 validation samples."""
    lines = {
        split: (data.SHAPES_DIR / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        for split in ("train", "val")
    }
    (tmp_path / "train.jsonl").write_text("\n".join(lines["train"][:8]) + "\n", encoding="utf-8")
    (tmp_path / "val.jsonl").write_text("\n".join(lines["val"][:4]) + "\n", encoding="utf-8")

    def make(**overrides):
        values = dict(
            preset=SEED_PRESET,
            base_checkpoint=None,
            train_manifest=str(tmp_path / "train.jsonl"),
            val_manifest=str(tmp_path / "val.jsonl"),
            image_root=str(data.SHAPES_DIR),
            output_dir=str(tmp_path / "run"),
            epochs=3,
            batch_size=4,
            save_every=1,
            keep_last=0,
            warmup_steps=0,
            progress=False,
        )
        return train.TrainConfig(**(values | overrides))

    return make


def digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_raise_leaves_the_last_checkpoint_intact(tiny_run, monkeypatch):
    config = tiny_run(stop_after_epochs=1)
    train.train(config, device="cpu")
    saved = checkpoint.latest_checkpoint(config.output_dir)
    before = digest(saved)

    build = train.build_adapter_model

    def poisoned_build(cfg):
        model, spec = build(cfg)
        poison_after(model, calls=0)  # every training forward of the resumed run
        return model, spec

    monkeypatch.setattr(train, "build_adapter_model", poisoned_build)
    with pytest.raises(numerics.NonFiniteError) as caught:
        train.train(tiny_run(), resume="latest", device="cpu")
    diagnosis = caught.value.diagnosis
    assert (diagnosis.kind, diagnosis.first_module, diagnosis.step) == ("loss", POISONED, 2), diagnosis.message
    assert diagnosis.sample_ids and all(i.startswith("train-") for i in diagnosis.sample_ids), diagnosis.sample_ids
    assert checkpoint.list_checkpoints(config.output_dir) == [saved]
    assert digest(saved) == before, "the last good checkpoint changed"
    monkeypatch.undo()
    model, _ = train.build_adapter_model(config)
    optimizer = torch.optim.AdamW(lora.adapter_parameters(model), lr=config.lr)
    scheduler = linear_warmup_decay(optimizer, 0, 6)
    state = checkpoint.restore(saved, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None)
    assert state["global_step"] == 2 and numerics.first_non_finite_parameter(model) is None


def test_train_refuses_fp16_pure_unless_allowed(tiny_run):
    with pytest.raises(doctor.UnsafePrecisionError) as refused:
        train.train(tiny_run(precision="fp16-pure"), device="cpu")
    assert {"adapters-fp16", "eps-underflow"} <= {f.code for f in refused.value.findings}, str(refused.value)
    # allowed: the seed's failure through the real entry point, stopped at the first NaN
    with pytest.raises(numerics.NonFiniteError) as caught:
        train.train(tiny_run(precision="fp16-pure", allow_unsafe=True, lr=5e-6, max_grad_norm=0.1), device="cpu")
    diagnosis = caught.value.diagnosis
    assert (diagnosis.step, diagnosis.kind) == (1, "parameter") and "lora_A" in diagnosis.first_parameter, (
        diagnosis.message
    )


def test_train_rollback_logs_and_gives_up(tiny_run):
    config = tiny_run(precision="fp16-pure", allow_unsafe=True, guard="rollback", max_rollbacks=2, batch_size=2)
    with pytest.raises(numerics.NonFiniteError, match="gave up after 2"):
        train.train(config, device="cpu")
    records = [
        line
        for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()
        if '"type": "guard"' in line
    ]
    assert len(records) == 2, records
    # every rollback restored a finite adapter, so epoch 1 ended finite and was checkpointed
    assert checkpoint.latest_checkpoint(config.output_dir) is not None
