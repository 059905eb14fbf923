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
