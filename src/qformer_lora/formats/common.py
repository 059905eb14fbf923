"""What every format reader shares: its error, JSON loading, field checks, image paths and splits.

Every message names the file, the record (an index, an id, or both) and the field, in the form
``<file>: <record>: field '<field>': <problem>``, so one bad record in a large file is found
without bisecting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import data

# Splits that name the same thing: training reads "train" from --train-manifest and "val" from
# --val-manifest; Hugging Face datasets spell the latter "validation", ScienceQA "val".
SPLIT_ALIASES = {
    "train": ("train",),
    "val": ("val", "validation", "valid", "dev"),
    "validation": ("validation", "val", "valid", "dev"),
    "test": ("test",),
}


class FormatError(data.ManifestError):
    """A dataset file or record is unusable; the message names the file, the record and the field."""


def load_json(path: Path) -> Any:
    """The parsed JSON document at ``path``; FormatError naming the file (and line:column) if it is not one."""
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except OSError as err:
        raise FormatError(f"{path}: cannot read: {err}") from err
    except json.JSONDecodeError as err:
        raise FormatError(f"{path}: malformed JSON: {err.msg} (line {err.lineno}, column {err.colno})") from err
    except UnicodeDecodeError as err:
        raise FormatError(f"{path}: not UTF-8 text: {err}") from err


def field(record: Any, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``record[name]``, checked to be a ``kind`` (a non-blank one for ``str``); FormatError naming ``where``."""
    if not isinstance(record, dict):
        raise FormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if name not in record:
        raise FormatError(f"{where}: field '{name}': missing")
    value = record[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int to Python, never to a dataset: an id or an answer index of `true` is a mistake
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise FormatError(f"{where}: field '{name}': expected {expected}, got {type(value).__name__} {value!r:.60}")
    if isinstance(value, str) and not value.strip():
        raise FormatError(f"{where}: field '{name}': must not be empty or whitespace")
    return value


def records(document: Any, key: str | None, path: Path) -> list:
    """The list of records of ``document`` (the document itself, or ``document[key]``); FormatError if not one."""
    if key is None:
        value, where = document, f"{path}: top level"
    elif isinstance(document, dict) and key in document:
        value, where = document[key], f"{path}: field '{key}'"
    else:
        raise FormatError(f"{path}: top level: field '{key}': missing (expected an object with a '{key}' list)")
    if not isinstance(value, list):
        raise FormatError(f"{where}: expected a JSON list of records, got {type(value).__name__}")
    return value


class ImageRoot:
    """A directory image paths from records are resolved in, refusing paths that leave it."""

    def __init__(self, root: str | Path, what: str):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FormatError(f"image folder {self.root} ({what}) does not exist; name it with --image-root")
        self.resolved = self.root.resolve()

    def resolve(self, rel: str, where: str) -> Path:
        """The existing file ``rel`` inside the root; data.ManifestError naming ``where`` and field 'image'
        otherwise (absolute, escaping the root, missing: the manifest's one rule, data._resolve_inside)."""
        return data._resolve_inside(self.root, self.resolved, rel, where)


def split_names(split: str) -> tuple[str, ...]:
    """The names ``split`` may have in a dataset, preferred first (``val`` is also ``validation``...)."""
    return SPLIT_ALIASES.get(split, (split,))


def pick_split(available: list[str], split: str | None, where: str) -> str:
    """The split of ``available`` to read: the only one whatever ``split`` says (a source of one split is
    read like a file), else the one ``split`` names; FormatError naming ``where`` and the splits if none."""
    if len(available) == 1:
        return available[0]
    if split is None:
        raise FormatError(f"{where}: holds the splits {', '.join(available)}; name one (or pass one split's path)")
    for name in split_names(split):
        if name in available:
            return name
    raise FormatError(
        f"{where}: no split {split!r} (looked for {', '.join(split_names(split))}); it holds "
        f"{', '.join(available) or 'no splits'} (or pass one split's path)"
    )
