"""Write failures named by the path: a full disk, a read-only directory or a missing permission.

Every place a run writes (checkpoints, metrics.jsonl, the run lock, the feature cache) goes
through :func:`writing`, which turns the failure into :class:`WriteError` naming the path and
the cause, so ``qformer-lora train`` stops with one line (the CLI prints OSErrors) rather
than a traceback from deep inside safetensors or PEFT. safetensors reports I/O failures as
its own ``SafetensorError`` (not an OSError); those are converted too. What was there before
the failed write stays as it was: each writer stages its output and renames it into place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from safetensors import SafetensorError


class WriteError(OSError):
    """Writing ``path`` failed (ENOSPC, EROFS, EACCES, ...); the message names the path and the cause."""


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str):
    """Run the block; an OSError or SafetensorError in it becomes WriteError naming ``path`` and ``what``."""
    try:
        yield
    except WriteError:
        raise
    except OSError as err:
        cause = err.strerror or str(err)
        detail = f" ({err.filename})" if err.filename and str(err.filename) != str(path) else ""
        raise _error(err.errno, f"{path}: cannot write {what}: {cause}{detail}") from err
    except SafetensorError as err:
        raise _error(errno.EIO, f"{path}: cannot write {what}: {err}") from err


def _error(code: int | None, message: str) -> WriteError:
    error = WriteError(message)  # one argument: str() is the message alone, without "[Errno n]"
    error.errno = code
    return error


def atomic(path: str | os.PathLike, data: bytes | str, what: str) -> Path:
    """Write ``data`` (str: UTF-8) to ``path`` all or nothing: a temporary file beside it, then
    ``os.replace``, so a reader or a killed process never sees half a file and a failed write leaves
    the previous file as it was. WriteError naming ``path`` and ``what`` on ENOSPC, EROFS, EACCES, ..."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with writing(path, what):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path
