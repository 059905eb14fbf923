"""Checkpoint durability and integrity: fsync around the rename, sizes and sha256s verified on resume, no pickle."""

from __future__ import annotations

import json
import math
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


def test_optimizer_state_names_may_hold_dots():
    """An optimizer's state names are free-form strings; one with dots ("ema.decay", as an optimizer author may
    choose) keeps its whole name through save and restore: only the first two fields of "state.<index>.<name>"
    are split off."""
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.5)
    optimizer.state[weight].update({"ema.decay": 3, "ema.buffer.0": torch.full((2,), 4.0)})
    tensors, meta = checkpoint._optimizer_tensors(optimizer)
    assert sorted(tensors) == ["state.0.ema.buffer.0"] and meta["scalars"] == {"state.0.ema.decay": 3}, meta
    fresh = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    checkpoint._restore_optimizer(fresh, tensors, json.loads(json.dumps(meta)))
    restored = fresh.state_dict()["state"][0]
    assert sorted(restored) == ["ema.buffer.0", "ema.decay"] and restored["ema.decay"] == 3, restored
    assert torch.equal(restored["ema.buffer.0"], torch.full((2,), 4.0))


def test_load_state_revives_non_finite_numbers_in_the_numeric_parts_only(tmp_path):
    """jsonio writes a non-finite float as the string "NaN" / "Infinity" (strict JSON). ReduceLROnPlateau's
    "best" starts at inf, a GradScaler's scale can be any float: load_state turns those strings back into floats
    in the optimizer, scheduler and scaler state, and leaves the same string in the config as text (a user's
    value that means it literally)."""
    state = {
        "optimizer": {"scalars": {"state.0.best": "NaN"}, "param_groups": []},
        "scheduler": {"best": "Infinity"},
        "scaler": {"scale": "-Infinity"},
        "config": {"note": "NaN"},
    }
    path = bare_checkpoint(tmp_path / "nonfinite", state)
    checkpoint.save_file({"state.0.exp_avg": torch.ones(1)}, str(path / checkpoint.OPTIMIZER_FILE))
    loaded, tensors = checkpoint.load_state(path)
    assert math.isnan(loaded["optimizer"]["scalars"]["state.0.best"]), loaded["optimizer"]
    assert (loaded["scheduler"]["best"], loaded["scaler"]["scale"]) == (math.inf, -math.inf), loaded
    assert loaded["config"] == {"note": "NaN"} and list(tensors) == ["state.0.exp_avg"], (loaded, tensors)


def test_load_state_keeps_a_missing_scaler_state_as_none(tmp_path):
    """A run without a GradScaler (fp32, bf16) saves "scaler": null; it loads as None, not revived into anything."""
    path = bare_checkpoint(tmp_path / "noscaler", {"optimizer": None, "scheduler": {}, "scaler": None})
    checkpoint.save_file({}, str(path / checkpoint.OPTIMIZER_FILE))
    loaded, _ = checkpoint.load_state(path)
    assert (loaded["optimizer"], loaded["scheduler"], loaded["scaler"]) == (None, {}, None), loaded


def _cpu_scaler(scale: float):
    return torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=7)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_an_enabled_grad_scaler_is_saved_and_restored(tmp_path):
    """fp16 runs carry a GradScaler whose scale has moved during training (here 8.0, growth interval 7): the
    checkpoint records it and restore sets a fresh scaler (65536.0, torch's default) back to 8.0. A disabled
    scaler and no scaler record null, and restoring null leaves the live scaler as it is."""
    model, optimizer, scheduler = _trainer_parts(seed=0)
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "config": {}}
    path = checkpoint.save(tmp_path, 1, global_step=1, scaler=_cpu_scaler(8.0), **parts)
    assert checkpoint.load_state(path)[0]["scaler"]["scale"] == 8.0
    fresh = _cpu_scaler(65536.0)
    state = checkpoint.restore(path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=fresh)
    assert (fresh.get_scale(), fresh.get_growth_interval(), state["scaler"]["growth_interval"]) == (8.0, 7, 7)
    checkpoint.restore(path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None)  # fp32 resume
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    bare = checkpoint.save(tmp_path, 2, global_step=2, scaler=disabled, **parts)
    assert checkpoint.load_state(bare)[0]["scaler"] is None
    live = _cpu_scaler(16.0)
    checkpoint.restore(bare, model=model, optimizer=optimizer, scheduler=scheduler, scaler=live)
    assert live.get_scale() == 16.0


def test_gpu_generator_states_are_restored_on_a_gpu_and_ignored_without_one(monkeypatch):
    """A checkpoint written on a GPU holds one "cuda" state per device (a list of ints each, for JSON): restored
    on a machine with CUDA it goes to torch.cuda.set_rng_state_all as uint8 tensors; on a CPU-only machine, or
    from a CPU checkpoint, no CUDA call is made (torch.cuda here is replaced by a recorder: this machine may have
    no GPU)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", calls.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    saved = json.loads(json.dumps(checkpoint.rng_state()))
    assert "cuda" not in saved, saved.keys()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    two_gpus = [torch.tensor([1, 2, 255], dtype=torch.uint8), torch.tensor([7], dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: two_gpus)
    assert json.loads(json.dumps(checkpoint.rng_state()))["cuda"] == [[1, 2, 255], [7]]
    checkpoint.set_rng_state(saved)  # a CPU checkpoint on a GPU machine
    assert calls == []
    checkpoint.set_rng_state({**saved, "cuda": [[1, 2, 255], [7]]})
    assert [[(t.dtype, t.tolist()) for t in states] for states in calls] == [
        [(torch.uint8, [1, 2, 255]), (torch.uint8, [7])]
    ], calls
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    checkpoint.set_rng_state({**saved, "cuda": [[1, 2, 255]]})  # a GPU checkpoint on a CPU machine
    assert len(calls) == 1, calls


def test_removing_a_checkpoint_clears_a_half_deleted_one_of_the_same_name(tmp_path):
    """A crash mid-delete leaves checkpoints/.del-epoch-0001; when epoch-0001 is written again and deleted, the
    leftover is cleared first (os.replace cannot move a directory onto a non-empty one)."""
    path = tmp_path / "checkpoints" / f"{checkpoint.PREFIX}0001"
    leftover = path.with_name(f"{checkpoint.REMOVING}{path.name}")
    for directory in (path, leftover):
        directory.mkdir(parents=True)
        (directory / "adapter_model.safetensors").write_bytes(b"x")
    checkpoint._remove(path)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def _fail_with(error: OSError):
    def fail(*args, **kwargs):
        raise error

    return fail


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_failed_save_or_prune_names_the_path_and_what_was_written(tmp_path, monkeypatch):
    """A full disk while the optimizer file is written: WriteError "<checkpoint>: cannot write the checkpoint:
    No space left on device", nothing staged left behind. Then a prune that cannot delete (read-only):
    "<checkpoints/>: cannot write (prune) the checkpoints: ..." with the file that failed."""
    import errno

    from qformer_lora import writes

    model, optimizer, scheduler = _trainer_parts(seed=0)
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": None, "config": {}}
    checkpoint.save(tmp_path, 1, global_step=1, **parts)
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_file", _fail_with(OSError(errno.ENOSPC, "No space left on device")))
        with pytest.raises(writes.WriteError) as caught:
            checkpoint.save(tmp_path, 2, global_step=2, **parts)
    final = checkpoint.checkpoint_dir(tmp_path, 2)
    assert str(caught.value) == f"{final}: cannot write the checkpoint: No space left on device", caught.value
    doomed = checkpoint.checkpoint_dir(tmp_path, 1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [doomed.name]
    monkeypatch.setattr(checkpoint, "_remove", _fail_with(OSError(errno.EROFS, "Read-only file system", "x")))
    with pytest.raises(writes.WriteError) as caught:
        checkpoint.save(tmp_path, 2, global_step=2, keep_last=1, **parts)
    assert str(caught.value) == f"{final.parent}: cannot write (prune) the checkpoints: Read-only file system (x)"
    assert doomed.is_dir() and final.is_dir()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_save_stages_every_file_then_renames_in_the_order_the_crash_test_pauses_at(tmp_path, monkeypatch):
    """Into a run directory that does not exist yet: at "checkpoint.adapter" only the adapter is staged, in
    checkpoints/.tmp-epoch-0002-*; at "checkpoint.staged" the optimizer and state files are there too and no
    epoch-0002 exists; at "checkpoint.renamed" epoch-0002 holds them and nothing is staged; "checkpoint.pruning"
    follows each removal of an old checkpoint (keep_last=1). The names are those pause_points documents and
    tests/unit/test_crash.py stops a process at."""
    from qformer_lora import pause_points

    run = tmp_path / "new" / "run"
    root = run / "checkpoints"
    model, optimizer, scheduler = _trainer_parts(seed=0)
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": None, "config": {}}
    checkpoint.save(run, 1, global_step=1, **parts)
    seen = []

    def reached(point):
        staged = sorted(root.glob(f"{checkpoint.STAGING}epoch-0002-*"))
        content = sorted(p.name for p in staged[0].iterdir()) if staged else None
        seen.append((point, len(staged), content, sorted(p.name for p in root.glob("epoch-*"))))

    monkeypatch.setattr(checkpoint.pause_points, "reached", reached)
    checkpoint.save(run, 2, global_step=2, keep_last=1, **parts)
    files = sorted([checkpoint.ADAPTER_DIR, checkpoint.OPTIMIZER_FILE, checkpoint.STATE_FILE])
    assert seen == [
        ("checkpoint.adapter", 1, [checkpoint.ADAPTER_DIR], ["epoch-0001"]),
        ("checkpoint.staged", 1, files, ["epoch-0001"]),
        ("checkpoint.renamed", 0, None, ["epoch-0001", "epoch-0002"]),
        ("checkpoint.pruning", 0, None, ["epoch-0002"]),
    ], seen
    assert {point for point, *_ in seen} <= set(pause_points.POINTS)
    assert sorted(p.name for p in (root / "epoch-0002").iterdir()) == files


def _rmtree_on_a_failing_disk(path, ignore_errors=False):
    """shutil.rmtree where every delete fails: raises, as rmtree does, unless told to ignore errors."""
    if not ignore_errors:
        raise OSError(5, "Input/output error", str(path))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_leftovers_of_killed_saves_are_cleared_and_never_stop_a_save(tmp_path, monkeypatch):
    """A killed save leaves checkpoints/.tmp-epoch-0001-x, a killed prune .del-epoch-0000: the next save clears
    both, and a save that fails while staging removes what it staged. On a failing disk, where nothing can be
    deleted, a leftover does not stop a save, and a failed save raises its own error, not the clean-up's."""
    model, optimizer, scheduler = _trainer_parts(seed=0)
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": None, "config": {}}
    root = tmp_path / "checkpoints"
    for leftover in (f"{checkpoint.STAGING}epoch-0001-x", f"{checkpoint.REMOVING}epoch-0000"):
        (root / leftover).mkdir(parents=True)
        (root / leftover / "optimizer.safetensors").write_bytes(b"half")
    checkpoint.save(tmp_path, 1, global_step=1, **parts)
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0001"]
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_file", _fail_with(ValueError("a tensor is not contiguous")))
        with pytest.raises(ValueError, match="not contiguous"):
            checkpoint.save(tmp_path, 2, global_step=2, **parts)
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0001"]
    (root / f"{checkpoint.REMOVING}epoch-0000").mkdir()
    monkeypatch.setattr(checkpoint.shutil, "rmtree", _rmtree_on_a_failing_disk)
    checkpoint.save(tmp_path, 2, global_step=2, **parts)
    assert sorted(p.name for p in root.iterdir()) == [f"{checkpoint.REMOVING}epoch-0000", "epoch-0001", "epoch-0002"]
    monkeypatch.setattr(checkpoint, "save_file", _fail_with(ValueError("a tensor is not contiguous")))
    with pytest.raises(ValueError, match="not contiguous"):
        checkpoint.save(tmp_path, 3, global_step=3, **parts)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_state_file_rewritten_with_its_keys_in_another_order_still_verifies(tmp_path):
    """``state_sha256`` is a digest of the content, keys sorted: a state file re-serialised by a JSON tool in
    another key order (jq -S sorts them) verifies, and a changed value still does not."""
    model, optimizer, scheduler = _trainer_parts(seed=0)
    path = checkpoint.save(
        tmp_path, 1, global_step=4, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None, config={}
    )
    state_file = path / checkpoint.STATE_FILE
    state = json.loads(state_file.read_text(encoding="utf-8"))
    reordered = dict(reversed(list(state.items())))
    state_file.write_text(json.dumps(reordered, sort_keys=False), encoding="utf-8")
    assert checkpoint.verify(path)["global_step"] == state["global_step"]
    state_file.write_text(json.dumps({**reordered, "global_step": state["global_step"] + 1}), encoding="utf-8")
    with pytest.raises(checkpoint.CheckpointError, match="does not match its sha256"):
        checkpoint.verify(path)
