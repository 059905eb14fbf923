"""The project's own JSONL manifest: one ``{"image", "instruction", "answer", "id"?}`` object a line.

Read by ``data.read_manifest`` (its rules and errors); this module only gives it the readers'
common signature.
"""

from __future__ import annotations

from pathlib import Path

from .. import data


def read(path: str | Path, image_root: str | Path | None = None, split: str | None = None) -> list[data.Sample]:
    """``data.read_manifest(path, image_root)``; ``split`` is ignored (a manifest is one split)."""
    return data.read_manifest(path, image_root)
