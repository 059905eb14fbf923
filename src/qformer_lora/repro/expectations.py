"""Per-release expectations in resources/expectations/*.json, and a switch to record them.

Behaviour that depends on the installed transformers / peft is stored per release
("transformers 5.24.0 / peft 0.21.2"), derived from observation, never hand-edited
into agreement. A release missing from a table fails loudly, naming itself, so a
new release is looked at before it is trusted. Set QFORMER_LORA_RECORD=1 to write
the observed values for the installed release into the table (PEFT's regeneration
switch), then review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import compat, jsonio
from ..presets import RESOURCES_DIR

EXPECTATIONS_DIR = RESOURCES_DIR / "expectations"
RECORD = os.environ.get("QFORMER_LORA_RECORD") == "1"


class UnknownRelease(LookupError):
    """The installed release has no row in an expectation table."""


def release_key() -> str:
    return f"transformers {compat.TRANSFORMERS} / peft {compat.PEFT}"


def _path(table: str) -> Path:
    return EXPECTATIONS_DIR / f"{table}.json"


def load(table: str) -> dict:
    return json.loads(_path(table).read_text(encoding="utf-8"))


def for_release(table: str) -> dict:
    """The installed release's row of ``table``; raises UnknownRelease naming the release."""
    releases = load(table).get("releases", {})
    if release_key() not in releases:
        raise UnknownRelease(
            f"{_path(table)} has no row for {release_key()}: this release's behaviour has not been "
            f"observed yet. Known: {sorted(releases)}. Run the tests with QFORMER_LORA_RECORD=1 to "
            f"record it, then review the diff before committing."
        )
    return releases[release_key()]


def record(table: str, key: str, value) -> None:
    """Store ``value`` under the installed release and ``key`` (atomic rewrite of the file)."""
    path = _path(table)
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"releases": {}}
    data.setdefault("releases", {}).setdefault(release_key(), {})[key] = value
    data["releases"] = dict(sorted(data["releases"].items()))
    jsonio.write(path, data)
