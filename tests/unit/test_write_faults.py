"""Faults while writing: ENOSPC, a read-only directory or a permission error at each write point.

Each case resumes a run that holds epoch-0001 and makes one write fail the way the operating
system (or safetensors, which wraps I/O errors in its own exception) reports it. The run must
stop with a WriteError naming the path it was writing and the cause, and leave epoch-0001
verified and unchanged, no staging directory behind and no lock. The tests run as root here,
so a chmod would not stop a write: the faults are injected where the write happens.
"""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
import tempfile

import pytest
from peft import PeftModel
from safetensors import SafetensorError

from qformer_lora import checkpoint, writes
from qformer_lora.training import run_lock, train

from .test_train import _few, quiet

ENOSPC = (errno.ENOSPC, "No space left on device")
EROFS = (errno.EROFS, "Read-only file system")
EACCES = (errno.EACCES, "Permission denied")


def fail(code_and_text, filename=None):
    def raiser(*_args, **_kwargs):
        raise OSError(*code_and_text, *([str(filename)] if filename else []))

    return raiser


def path_method_failing(real, name: str, code_and_text):
    """Path.<method> that fails for files called ``name`` and works for the rest."""

    def method(self, *args, **kwargs):
        if self.name == name:
            raise OSError(*code_and_text, str(self))
        return real(self, *args, **kwargs)

    return method


def safetensors_full(*_args, **_kwargs):
    # what safetensors raises when the disk fills while it writes
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


# point -> (what to patch, replacement factory, the message's path and cause)
CHECKPOINT_POINTS = {
    "staging directory": (tempfile, "mkdtemp", lambda: fail(EROFS), "Read-only file system"),
    "adapter": (PeftModel, "save_pretrained", lambda: fail(ENOSPC), "No space left on device"),
    "optimizer": (checkpoint, "save_file", lambda: safetensors_full, "os error 28"),
    "state file": (
        pathlib.Path,
        "write_text",
        lambda: path_method_failing(pathlib.Path.write_text, checkpoint.STATE_FILE, EACCES),
        "Permission denied",
    ),
    "fsync": (os, "fsync", lambda: fail(ENOSPC), "No space left on device"),
    "rename": (os, "replace", lambda: fail(EACCES), "Permission denied"),
}


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """One epoch of a 2-epoch run, trained once for the module (each test gets a copy)."""
    tmp = tmp_path_factory.mktemp("faults")
    options = dict(output_dir=str(tmp / "run"), epochs=2, save_every=1, keep_last=0, **_few(tmp))
    train.train(quiet(**options, stop_after_epochs=1))
    return tmp / "run", options


@pytest.fixture
def one_epoch(trained_once, tmp_path):
    original, options = trained_once
    run = tmp_path / "run"
    shutil.copytree(original, run)
    first = checkpoint.checkpoint_dir(run, 1)
    return run, options | {"output_dir": str(run)}, {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}


def assert_intact(run, before: dict) -> None:
    checkpoint.verify(checkpoint.checkpoint_dir(run, 1))
    assert {p: p.read_bytes() for p in before} == before, "the previous checkpoint changed"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["epoch-0001"], "a staging directory was left"
    assert not (run / run_lock.LOCK_FILE).exists(), "the lock outlived the failed run"


@pytest.mark.parametrize("point", CHECKPOINT_POINTS)
def test_a_failed_checkpoint_write_names_its_path_and_keeps_the_previous(one_epoch, monkeypatch, point):
    run, options, before = one_epoch
    target, name, replacement, cause = CHECKPOINT_POINTS[point]
    real_save = checkpoint._write

    def save_with_fault(*args, **kwargs):  # the fault during the checkpoint write only
        with monkeypatch.context() as patch:
            patch.setattr(target, name, replacement())
            return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "_write", save_with_fault)
    with pytest.raises(writes.WriteError, match=rf"checkpoints/epoch-0002: cannot write the checkpoint: .*{cause}"):
        train.train(quiet(**options), resume="latest")
    assert_intact(run, before)


def test_a_failed_log_write_names_the_log(one_epoch, monkeypatch):
    run, options, before = one_epoch
    real_open = pathlib.Path.open

    def open_full(self, mode="r", *args, **kwargs):  # appends to the log fail, reads work
        if self.name == "metrics.jsonl" and "a" in mode:
            raise OSError(*ENOSPC, str(self))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", open_full)
    with pytest.raises(writes.WriteError, match=r"run/metrics\.jsonl: cannot write the log record: No space left"):
        train.train(quiet(**options), resume="latest")
    assert_intact(run, before)
    monkeypatch.undo()  # the resume's truncation of the log: a read-only directory
    monkeypatch.setattr(pathlib.Path, "write_text", path_method_failing(pathlib.Path.write_text, "metrics.tmp", EROFS))
    with pytest.raises(writes.WriteError, match=r"run/metrics\.jsonl: cannot write the truncated log: Read-only"):
        train.train(quiet(**options), resume="latest")
    assert_intact(run, before)


def test_a_failed_lock_write_names_the_lock(one_epoch, monkeypatch):
    run, options, before = one_epoch
    monkeypatch.setattr(run_lock.tempfile, "mkstemp", fail(EACCES))
    with pytest.raises(writes.WriteError, match=r"run/run\.lock: cannot write the run lock: Permission denied"):
        train.train(quiet(**options), resume="latest")
    assert_intact(run, before)


def test_a_failed_feature_cache_write_names_the_feature_file(one_epoch, monkeypatch, tmp_path):
    run, options, before = one_epoch
    cache_dir = tmp_path / "cache"
    monkeypatch.setattr("safetensors.torch.save_file", safetensors_full)
    with pytest.raises(
        writes.WriteError, match=rf"{cache_dir}/.*\.safetensors: cannot write the cached feature: .*os error 28"
    ):
        train.train(quiet(**options, feature_cache="disk", feature_cache_dir=str(cache_dir)), resume="latest")
    assert_intact(run, before)
    assert not [p for p in cache_dir.rglob("*") if p.is_file()], "a partial feature file was left"
