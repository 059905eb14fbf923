"""One writer per run directory (training/run_lock.py): refused while the holder lives, stale locks taken over."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from qformer_lora.training import run_lock, train

from .test_train import _few, quiet


def write_lock(directory, pid: int, host: str | None = None, start_time: str | None = "same") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if start_time == "same":
        start_time = run_lock._start_time(pid)
    record = {"pid": pid, "host": host or socket.gethostname(), "start_time": start_time}
    (directory / run_lock.LOCK_FILE).write_text(json.dumps(record))


@pytest.fixture
def live_process():
    """Another process that lives for the test (a sleeping Python)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def test_a_second_writer_is_refused_naming_the_lock_pid_and_host(tmp_path, live_process):
    run = tmp_path / "run"
    write_lock(run, live_process.pid)
    message = rf"{re.escape(str(run))} is in use by pid {live_process.pid} on host {re.escape(socket.gethostname())}"
    with pytest.raises(run_lock.RunLockedError, match=message + r" \(lock .*run\.lock\)"):
        train.train(quiet(output_dir=str(run), **_few(tmp_path)))
    assert sorted(p.name for p in run.iterdir()) == [run_lock.LOCK_FILE], "a refused run wrote into the directory"
    # the same within one process: two RunLocks on one directory
    other = tmp_path / "other"
    with run_lock.RunLock(other):
        with pytest.raises(run_lock.RunLockedError, match=f"pid {os.getpid()}"):
            run_lock.RunLock(other).acquire()
    assert not other.exists(), "the lock's own directory was not removed with the lock"


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid no longer exists (barring reuse within the test, which the start time catches)
    cases = {
        "dead pid": dict(pid=dead.pid, start_time=None),
        # pids are reused: our own pid with another start time was written by another process
        "reused pid": dict(pid=os.getpid(), start_time="1"),
    }
    for name, holder in cases.items():
        directory = tmp_path / name.replace(" ", "-")
        write_lock(directory, **holder)
        with pytest.warns(UserWarning, match=rf"stale lock of pid {holder['pid']}"):
            lock = run_lock.RunLock(directory).acquire()
        assert json.loads(lock.path.read_text())["pid"] == os.getpid(), name
        lock.release()
        assert not lock.path.exists()


def test_locks_it_cannot_check_are_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    write_lock(elsewhere, 1, host="another-host", start_time=None)
    with pytest.raises(
        run_lock.RunLockedError, match=r"pid 1 on host another-host .* delete the lock if that run is dead"
    ):
        run_lock.RunLock(elsewhere).acquire()
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / run_lock.LOCK_FILE).write_text("{not json")
    with pytest.raises(run_lock.RunLockedError, match=r"garbage/run\.lock: not a run lock \(JSONDecodeError"):
        run_lock.RunLock(garbage).acquire()


def test_the_lock_is_released_at_the_end_and_on_errors(tmp_path):
    run = tmp_path / "run"
    options = dict(output_dir=str(run), epochs=1, **_few(tmp_path))
    train.train(quiet(**options))
    assert (run / "metrics.jsonl").exists() and not (run / run_lock.LOCK_FILE).exists()
    with pytest.raises(ValueError):  # a bad sample found while training: the lock goes with the error
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"image": "images/none.png", "instruction": "q?", "answer": "red"}\n')
        train.train(quiet(**options | {"train_manifest": str(bad), "overwrite": True}))
    assert not (run / run_lock.LOCK_FILE).exists()
