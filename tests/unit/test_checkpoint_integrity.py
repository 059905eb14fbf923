"""Checkpoint durability and integrity: fsync around the rename, sizes and sha256s verified on resume, no pickle."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import pytest
import torch

from qformer_lora import checkpoint
from qformer_lora.training import train

from .test_train import _few, quiet

SRC = Path(__file__).resolve().parents[2] / "src" / "qformer_lora"


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("integrity")
    options = dict(output_dir=str(tmp / "run"), epochs=3, save_every=1, keep_last=0, **_few(tmp))
    train.train(quiet(**options, stop_after_epochs=2))
    return tmp / "run", options


@pytest.fixture
def two_epochs(trained_once, tmp_path) -> tuple[Path, dict]:
    """A run with checkpoints epoch-0001 and epoch-0002 of a 3-epoch schedule (8 samples), a copy per test."""
    original, options = trained_once
    run = tmp_path / "run"
    shutil.copytree(original, run)
    return run, options | {"output_dir": str(run)}


def flip_byte(path: Path, offset: int = -20) -> None:
    """Same size, one byte changed: only the hash can tell."""
    content = bytearray(path.read_bytes())
    content[offset] ^= 0xFF
    path.write_bytes(bytes(content))


def test_every_file_and_directory_is_fsynced_and_the_rename_after(tmp_path, monkeypatch):
    events = []
    real_replace = os.replace
    monkeypatch.setattr(checkpoint, "_fsync", lambda path: events.append(("fsync", Path(path))))
    monkeypatch.setattr(checkpoint.os, "replace", lambda a, b: (events.append(("rename", Path(b))), real_replace(a, b)))
    run = tmp_path / "run"
    train.train(quiet(output_dir=str(run), epochs=1, **_few(tmp_path)))
    final = checkpoint.checkpoint_dir(run, 1)
    [rename] = [i for i, e in enumerate(events) if e[0] == "rename" and e[1] == final]
    before = [p for kind, p in events[:rename] if kind == "fsync"]
    [staging] = {p for p in before if p.name.startswith(".tmp-epoch-0001-")}  # the staging directory itself
    synced = {p.relative_to(staging) for p in before if p.is_relative_to(staging)}
    # every file and directory now in the checkpoint, and the staging directory itself (".") was
    # fsynced in staging before the rename
    assert {p.relative_to(final) for p in final.rglob("*")} | {Path(".")} == synced
    assert ("fsync", final.parent) in events[rename + 1 :], "checkpoints/ was not fsynced after the rename"


def test_the_state_records_each_file_and_resume_verifies_it(two_epochs):
    run, options = two_epochs
    path = checkpoint.checkpoint_dir(run, 2)
    state = json.loads((path / checkpoint.STATE_FILE).read_text())
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {checkpoint.STATE_FILE}
    assert set(state["files"]) == on_disk
    for name, entry in state["files"].items():
        assert entry == {"size": (path / name).stat().st_size, "sha256": checkpoint.sha256(path / name)}
    adapter = path / "adapter" / "adapter_model.safetensors"
    cases = [
        (lambda: flip_byte(adapter), r"adapter_model\.safetensors: corrupt checkpoint file, sha256 differs"),
        (
            lambda: adapter.write_bytes(adapter.read_bytes()[:-7]),
            r"adapter_model\.safetensors: corrupt .*bytes, expected",
        ),
        (
            lambda: (path / checkpoint.OPTIMIZER_FILE).unlink(),
            r"incomplete checkpoint, optimizer\.safetensors is missing",
        ),
        # a changed number in the state (here the global step) is caught by its own sha256
        (
            lambda: (path / checkpoint.STATE_FILE).write_text(
                (path / checkpoint.STATE_FILE).read_text().replace('"global_step": ', '"global_step": 1')
            ),
            r"trainer_state\.json: corrupt checkpoint file, its content does not match",
        ),
        (
            lambda: (path / checkpoint.STATE_FILE).write_text('{"epoch": 2, "glo'),
            r"trainer_state\.json: corrupt .*not JSON",
        ),
    ]
    backup = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    for corrupt, message in cases:
        corrupt()
        with pytest.raises(checkpoint.CheckpointError, match=message):
            train.train(quiet(**options), resume=path)
        for p, content in backup.items():
            p.write_bytes(content)
    checkpoint.verify(path)  # restored whole: the cases above were the only faults


def test_resume_latest_falls_back_to_the_newest_complete_checkpoint(two_epochs, tmp_path):
    run, options = two_epochs
    straight = tmp_path / "straight"
    train.train(quiet(**options | {"output_dir": str(straight)}))
    flip_byte(checkpoint.checkpoint_dir(run, 2) / checkpoint.OPTIMIZER_FILE)
    with pytest.warns(UserWarning, match=r"skipping epoch-0002: .*optimizer\.safetensors: corrupt checkpoint file"):
        train.train(quiet(**options), resume="latest")
    # resumed from epoch 1, it replays epochs 2 and 3 exactly as the uninterrupted run did
    a = checkpoint.load_state(checkpoint.checkpoint_dir(run, 3))[1]
    b = checkpoint.load_state(checkpoint.checkpoint_dir(straight, 3))[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nothing_is_ever_unpickled(two_epochs, monkeypatch):
    """A resume reads every checkpoint file; with pickle and a pickling torch.load made to fail, it still runs."""
    run, options = two_epochs

    def refuse(*_args, **_kwargs):
        raise AssertionError("unpickling attempted")

    real_load = torch.load
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", lambda *a, **k: real_load(*a, **k) if k.get("weights_only") else refuse())
    train.train(quiet(**options), resume="latest")
    assert checkpoint.latest_checkpoint(run).name == "epoch-0003"
    # and in the source: torch.load only with weights_only=True, no pickle module loads
    for source in SRC.rglob("*.py"):
        text = source.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{source}: {call}"
        assert not re.search(r"\bpickle\.(load|loads|Unpickler)\b", text), source


def test_a_checkpoint_of_a_newer_format_is_refused(two_epochs):
    """A newer release's checkpoint may mean something else by the same fields: refused, naming the file."""
    run, options = two_epochs
    path = checkpoint.checkpoint_dir(run, 2)
    state = json.loads((path / checkpoint.STATE_FILE).read_text())
    assert state["format_version"] == checkpoint.FORMAT_VERSION
    state["format_version"] = checkpoint.FORMAT_VERSION + 1
    state["state_sha256"] = checkpoint._state_digest(state)  # consistent: only the version is new
    (path / checkpoint.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(
        checkpoint.CheckpointError,
        match=rf"epoch-0002/trainer_state\.json: checkpoint format {checkpoint.FORMAT_VERSION + 1}, .*upgrade",
    ):
        train.train(quiet(**options), resume=path)


def test_latest_checkpoint_is_none_until_a_complete_one_exists(tmp_path):
    """No checkpoints directory, then one holding only a half-written epoch (no state file): nothing to resume.
    Once step 6 is saved mid-epoch and epoch 1 ends at that same step 6, the epoch's is the latest
    (validation ran after the step's save)."""
    assert checkpoint.latest_checkpoint(tmp_path) is None
    checkpoint.checkpoint_dir(tmp_path, 1).mkdir(parents=True)  # killed before trainer_state.json was written
    assert checkpoint.latest_checkpoint(tmp_path) is None, "a checkpoint without its state file was offered"
    for path in (checkpoint.step_checkpoint_dir(tmp_path, 6), checkpoint.checkpoint_dir(tmp_path, 1)):
        path.mkdir(parents=True, exist_ok=True)
        (path / checkpoint.STATE_FILE).write_text(json.dumps({"global_step": 6}))
    assert checkpoint.latest_checkpoint(tmp_path) == checkpoint.checkpoint_dir(tmp_path, 1)


# ----------------------------------------------------------------------------- the parts, without a training run


def test_rng_state_survives_json_and_replays_python_and_torch_draws():
    """The saved generator states, written to JSON and read back, replay the same draws from Python's
    ``random`` and torch's CPU generator: what a resumed run needs to draw as the first run did."""
    saved = json.loads(json.dumps(checkpoint.rng_state()))
    first = (random.random(), torch.rand(3))
    checkpoint.set_rng_state(saved)
    second = (random.random(), torch.rand(3))
    assert first[0] == second[0] and torch.equal(first[1], second[1]), (first, second)


def test_optimizer_state_round_trips_tensors_scalars_and_param_groups():
    """SGD with momentum after one step holds a momentum tensor; a plain number is added to the state (as some
    optimizers keep, e.g. LBFGS' n_iter) to go the JSON way. Restored into a fresh optimizer, the state dict is
    the same: tensors, numbers and the param groups' lr and momentum."""
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.5, momentum=0.9)
    weight.sum().backward()
    optimizer.step()
    optimizer.state[weight]["n_iter"] = 7
    tensors, meta = checkpoint._optimizer_tensors(optimizer)
    assert sorted(tensors) == ["state.0.momentum_buffer"] and meta["scalars"] == {"state.0.n_iter": 7}, meta
    fresh = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.0)
    checkpoint._restore_optimizer(fresh, tensors, json.loads(json.dumps(meta)))
    restored, original = fresh.state_dict(), optimizer.state_dict()
    assert torch.equal(restored["state"][0]["momentum_buffer"], original["state"][0]["momentum_buffer"])
    assert restored["state"][0]["n_iter"] == 7
    assert (restored["param_groups"][0]["lr"], restored["param_groups"][0]["momentum"]) == (0.5, 0.9)


def bare_checkpoint(root: Path, state) -> Path:
    """A checkpoint directory with the three parts verify requires and ``state`` as its state file."""
    root.mkdir()
    (root / checkpoint.STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
    (root / checkpoint.OPTIMIZER_FILE).write_bytes(b"")
    (root / checkpoint.ADAPTER_DIR).mkdir()
    return root


def test_verify_reads_a_state_without_format_or_files_as_format_1(tmp_path):
    """A format-1 state (before "format_version" and "files" existed) verifies as it is."""
    assert checkpoint.verify(bare_checkpoint(tmp_path / "old", {"global_step": 3})) == {"global_step": 3}


def test_verify_refuses_a_state_that_is_not_an_object(tmp_path):
    path = bare_checkpoint(tmp_path / "list", [1, 2])
    with pytest.raises(checkpoint.CheckpointError) as caught:
        checkpoint.verify(path)
    assert str(caught.value).startswith(f"{path / checkpoint.STATE_FILE}: checkpoint format None,"), caught.value


def test_verify_names_a_recorded_file_that_is_missing(tmp_path):
    path = bare_checkpoint(tmp_path / "torn", {"format_version": 2, "files": {"adapter/x.bin": {"size": 1}}})
    with pytest.raises(checkpoint.CheckpointError) as caught:
        checkpoint.verify(path)
    assert str(caught.value) == f"{path / 'adapter/x.bin'}: missing checkpoint file"


class _OneLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.query = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.query(x)


def _trainer_parts(seed: int, steps: int = 1):
    """A LoRA r=2 adapter on one 3x3 layer, AdamW and a LambdaLR (lr 0.1 / (step + 1)) after ``steps`` steps."""
    import peft

    torch.manual_seed(seed)
    model = peft.get_peft_model(_OneLayer(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    for _ in range(steps):
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


def _adapter(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


@pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT: a custom module has no config to save
def test_save_then_restore_gives_back_the_adapter_optimizer_schedule_and_draws(tmp_path):
    """Save epoch 2 at global step 5, then restore into parts built from another seed and stepped twice:
    the adapter, AdamW's moments and step, the schedule's position and the next random draws are the saved
    ones. The state records what the loop reads back, under these names."""
    model, optimizer, scheduler = _trainer_parts(seed=0)
    saved_adapter, saved_optimizer = _adapter(model), optimizer.state_dict()
    path = checkpoint.save(
        tmp_path, 2, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None, global_step=5,
        config={"lr": 0.1}, guard={"rollbacks": 1, "skipped": 0},
    )  # fmt: skip
    assert path == tmp_path / "checkpoints" / f"{checkpoint.PREFIX}0002"
    draws = (random.random(), torch.rand(2))
    other, other_optimizer, other_scheduler = _trainer_parts(seed=1, steps=2)
    state = checkpoint.restore(path, model=other, optimizer=other_optimizer, scheduler=other_scheduler, scaler=None)
    again = (random.random(), torch.rand(2))
    assert again[0] == draws[0] and torch.equal(again[1], draws[1]), (again, draws)
    assert {k: torch.equal(v, saved_adapter[k]) for k, v in _adapter(other).items()} == dict.fromkeys(
        saved_adapter, True
    )
    restored = other_optimizer.state_dict()
    for index, entries in saved_optimizer["state"].items():
        assert {k: torch.equal(v, restored["state"][index][k]) for k, v in entries.items()} == dict.fromkeys(
            entries, True
        )
    # one step of the schedule: lr 0.1 / (1 + 1) = 0.05 (the other parts stood at 0.1 / 3 after two)
    assert other_scheduler.state_dict()["last_epoch"] == 1 and other_optimizer.param_groups[0]["lr"] == 0.05
    picked = {k: state[k] for k in ("format_version", "epoch", "global_step", "config", "metrics", "guard", "scaler")}
    assert picked == {
        "format_version": checkpoint.FORMAT_VERSION,
        "epoch": 2,
        "global_step": 5,
        "config": {"lr": 0.1},
        "metrics": {},
        "guard": {"rollbacks": 1, "skipped": 0},
        "scaler": None,
    }, picked
    assert "position" not in state


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_keep_last_prunes_the_oldest_in_training_order_but_spares_the_best(tmp_path):
    """Epoch 1 (step 2), a step checkpoint at step 3 inside epoch 2, epoch 2 (step 4), epoch 3 (step 6),
    keep_last=2 and keep=1 (the best epoch): the step checkpoint goes, epoch 1 stays as the best, and the
    two newest stay; nothing staged or half-deleted is left."""
    model, optimizer, scheduler = _trainer_parts(seed=0)
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": None, "config": {}}
    checkpoint.save(tmp_path, 1, global_step=2, **parts)
    step = checkpoint.save(tmp_path, 2, global_step=3, position={"batches": 1, "loss_sum": 0.5, "tokens": 4}, **parts)
    assert checkpoint.load_state(step)[0]["position"] == {"batches": 1, "loss_sum": 0.5, "tokens": 4}
    checkpoint.save(tmp_path, 2, global_step=4, **parts)
    checkpoint.save(tmp_path, 3, global_step=6, keep_last=2, keep=1, **parts)
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert names == [f"{checkpoint.PREFIX}0001", f"{checkpoint.PREFIX}0002", f"{checkpoint.PREFIX}0003"], names
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == names
