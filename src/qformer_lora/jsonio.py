"""Strict JSON: every JSON file and line the package writes goes through :func:`dumps`.

JSON has no NaN or infinity. Python's ``json`` writes them as the bare tokens ``NaN``,
``Infinity`` and ``-Infinity``, which Python reads back but a strict parser (JavaScript's
``JSON.parse``, Go's ``encoding/json``, most CI dashboards) rejects, so the whole file is lost
to them. The convention here, one for every writer:

    a non-finite float is written as the string "NaN", "Infinity" or "-Infinity".

These are the spellings both ``float()`` in Python and ``Number()`` in JavaScript turn back
into the number, so a reader that expects a number converts it in one call (:func:`number`),
and the value stays visible where it was (a loss of ``"NaN"`` at step 2 reads as what it is).
Everything else is written as ``json.dumps`` writes it, with ``allow_nan=False`` as the check
that nothing non-finite got past. :func:`loads_strict` is the strict reader the tests use.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

from . import writes

NON_FINITE = ("NaN", "Infinity", "-Infinity")  # how each non-finite float is written


def _spelled(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def strict(value, default: Callable | None = None):
    """``value`` with every non-finite float replaced by its string (see the module docstring).

    Dicts, lists and tuples are walked; a value of another type goes through ``default`` (as
    ``json.dumps``'s ``default``) first when one is given, so its result is walked too. Numpy
    float64 counts as a float (it subclasses float)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else _spelled(value)
    if isinstance(value, dict):
        return {key: strict(item, default) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(item, default) for item in value]
    if value is None or isinstance(value, (str, int)) or default is None:
        return value  # json.dumps raises TypeError for an unknown type without a default, as before
    return strict(default(value), None)


def dumps(
    value, *, indent: int | None = None, default: Callable | None = None, sort_keys: bool = False, compact=False
) -> str:
    """JSON text of ``value`` that any strict parser reads (non-finite floats as strings). ``compact``:
    no spaces after separators and non-ASCII kept as is (a canonical form to hash, with ``sort_keys``)."""
    extra = {"separators": (",", ":"), "ensure_ascii": False} if compact else {}
    return json.dumps(strict(value, default), indent=indent, sort_keys=sort_keys, allow_nan=False, **extra)


def write(path: str | os.PathLike, value, *, indent: int | None = 2, default: Callable | None = None) -> Path:
    """Write ``value`` as a JSON file (one trailing newline), atomically (writes.atomic): a reader or a
    killed process never sees half a file, and a failed write (writes.WriteError naming ``path``)
    leaves the previous one. Returns ``path``. A value that cannot be serialised raises before anything
    is written."""
    return writes.atomic(path, dumps(value, indent=indent, default=default) + "\n", "the JSON file")


def number(value) -> float | None:
    """A number as written by :func:`dumps` back as a float: 1.5 -> 1.5, "NaN" -> nan,
    "Infinity" -> inf; None (or a missing field) -> None. ValueError for any other string."""
    if value is None:
        return None
    if isinstance(value, str) and value not in NON_FINITE:
        raise ValueError(f"{value!r} is not a number (non-finite numbers are written {', '.join(NON_FINITE)})")
    return float(value)


def revive(value):
    """The inverse of :func:`strict` for a subtree known to hold numbers only (a scheduler's or
    GradScaler's state): every "NaN" / "Infinity" / "-Infinity" string back to its float. Do not
    use it on free text, where such a string may be meant literally."""
    if isinstance(value, str) and value in NON_FINITE:
        return float(value)
    if isinstance(value, dict):
        return {key: revive(item) for key, item in value.items()}
    if isinstance(value, list):
        return [revive(item) for item in value]
    return value


def _refuse_constant(token: str):
    raise ValueError(f"bare {token} is not JSON (a strict parser rejects the file)")


def loads_strict(text: str):
    """``json.loads`` that rejects the bare NaN / Infinity tokens, as JavaScript's JSON.parse does."""
    return json.loads(text, parse_constant=_refuse_constant)
