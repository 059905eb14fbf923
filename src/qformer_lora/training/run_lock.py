"""One writer per run directory: ``<run>/run.lock`` names the process that trains there.

Two ``train`` processes on one output directory would interleave their log lines and prune
each other's checkpoints. :class:`RunLock` creates ``run.lock`` (JSON: pid, host, the
process's start time) atomically: the record is written to a private temporary file and
hard-linked to the lock's name, which fails if the name exists, so no reader ever sees a
half-written lock and exactly one of two racing processes wins.

A lock whose process is gone is stale: on the same host, a pid that no longer exists, or
one that now belongs to another process (its start time in ``/proc/<pid>/stat`` differs;
pids are reused), is taken over with a warning. A lock from another host cannot be checked
from here and is refused; the message says which file to delete if that run is known dead.
Under ``torchrun`` rank 0 alone holds the lock (the other ranks write nothing in the run
directory). The lock is released when the run ends, by success or by error; a SIGKILLed
run leaves it behind, stale, for the next one to take over.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import warnings
from pathlib import Path

from .. import jsonio, writes
from .run_config import ConfigError

LOCK_FILE = "run.lock"


class RunLockedError(ConfigError):
    """Another live process trains in this run directory (the message names the lock, pid and host)."""


def _start_time(pid: int) -> str | None:
    """Field 22 of ``/proc/<pid>/stat`` (clock ticks since boot at which ``pid`` started); None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # the fields after the command name, which may hold spaces


def _alive(pid: int, start_time: str | None) -> bool:
    """Whether ``pid`` still runs the process that wrote the lock (a reused pid is not it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    now = _start_time(pid)
    return start_time is None or now is None or now == start_time


class RunLock:
    """The lock on run directory ``directory``; :meth:`acquire` takes it, :meth:`release` gives it back.

    Errors: :class:`RunLockedError` while a live process holds it, or when the lock file is not
    a lock record (both name the path)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.held = False
        self.created_directory = False

    def record(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "start_time": _start_time(os.getpid())}

    def acquire(self) -> RunLock:
        self.created_directory = not self.directory.exists()
        with writes.writing(self.path, "the run lock"):
            return self._acquire()

    def _acquire(self) -> RunLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{LOCK_FILE}-", dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(jsonio.dumps(self.record()))
            for _ in range(2):  # a second try after removing a stale lock
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return self
                except FileExistsError:
                    self._check_holder()
                    self.path.unlink(missing_ok=True)
            raise RunLockedError(f"{self.path}: another process took the lock while a stale one was replaced")
        finally:
            os.unlink(tmp)

    def _check_holder(self) -> None:
        """Raise unless the existing lock is stale; warn when it is (the caller then removes it)."""
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
            pid, host = int(holder["pid"]), str(holder["host"])
        except FileNotFoundError:
            return  # released meanwhile
        except (ValueError, KeyError, TypeError) as err:
            raise RunLockedError(
                f"{self.path}: not a run lock ({type(err).__name__}: {err}); "
                f"delete it if no run is using this directory"
            ) from None
        if host != socket.gethostname():
            raise RunLockedError(
                f"{self.directory} is in use by pid {pid} on host {host} (lock {self.path}); it cannot be "
                f"checked from {socket.gethostname()}: delete the lock if that run is dead"
            )
        if _alive(pid, holder.get("start_time")):
            raise RunLockedError(
                f"{self.directory} is in use by pid {pid} on host {host} (lock {self.path}); "
                f"wait for it to end, or choose another --output-dir"
            )
        warnings.warn(f"{self.path}: taking over a stale lock of pid {pid} on {host} (no longer running)", stacklevel=3)

    def release(self) -> None:
        if not self.held:
            return
        self.path.unlink(missing_ok=True)
        self.held = False
        if self.created_directory:  # a run refused before writing anything leaves no directory behind
            try:
                self.directory.rmdir()
            except OSError:  # not empty: the run wrote there
                pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *_exc) -> None:
        self.release()
