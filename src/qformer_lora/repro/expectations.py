"""Per-release expectations in resources/expectations/*.json, and a switch to record them.

Behaviour that depends on the installed transformers / peft is stored per release
("transformers 5.24.0 / peft 0.21.2"), derived from observation, never hand-edited
into agreement. Each table is ``{"about": ..., "releases": {release: {key: value}},
"observed_in": {release: {key: environment id}}, "environments": {id: environment}}``:
every recorded value names the environment it was observed in (every installed
package's version, Python, the CPU features that matter, the commit).

A release missing from a table is not an error by itself: it is compared with the
recorded release :func:`reference_release` picks (the newest one at or below it, else the
newest overall), and only behaviour that differs fails, naming the behaviour and both
releases (:class:`Difference`). Set QFORMER_LORA_RECORD=1 to write the observed values for
the installed release into the table (PEFT's regeneration switch); it refuses a dirty
checkout (anything changed besides the tables and reports/), then review the diff.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .. import compat, jsonio
from ..presets import RESOURCES_DIR

EXPECTATIONS_DIR = RESOURCES_DIR / "expectations"
RECORD = os.environ.get("QFORMER_LORA_RECORD") == "1"
# nox -s newest -- --against "transformers X / peft Y": compare with that recorded release instead, even
# where the installed one is recorded (what a new release changed since X, asked after recording it)
COMPARE_WITH = os.environ.get("QFORMER_LORA_COMPARE_WITH") or None
# What a recording run may have changed in the checkout: the tables themselves and the reports the
# compat sessions write before their tests run. Anything else is code the rows would not describe.
RECORDING_MAY_CHANGE = ("src/qformer_lora/resources/expectations/", "reports/")


class UnknownRelease(LookupError):
    """A table holds no release at all to compare with."""


class DirtyTree(RuntimeError):
    """QFORMER_LORA_RECORD=1 in a checkout with uncommitted changes outside the tables."""


def release_key() -> str:
    return f"transformers {compat.TRANSFORMERS} / peft {compat.PEFT}"


def release_order(key: str) -> tuple:
    """ "transformers 5.24.0 / peft 0.21.2" -> its versions (compat.release_versions), for ordering rows."""
    return compat.release_versions(key)


def tables() -> list[str]:
    """The names of every expectation table shipped with the package."""
    return sorted(p.stem for p in EXPECTATIONS_DIR.glob("*.json"))


def _path(table: str) -> Path:
    return EXPECTATIONS_DIR / f"{table}.json"


def load(table: str) -> dict:
    return json.loads(_path(table).read_text(encoding="utf-8"))


def releases_of(table: str) -> dict[str, dict]:
    """{release: row} of ``table``; {} for a table that is not kept per release (lora_counts)."""
    return load(table).get("releases", {})


def reference_release(recorded, release: str | None = None) -> tuple[str, str]:
    """(the recorded release to compare ``release`` with, how it was chosen).

    ``release`` itself when recorded ("recorded"); else the newest recorded release at or below it
    ("the newest recorded release below it"); else the newest recorded one ("the newest recorded
    release", for a release older than every row). Raises UnknownRelease when nothing is recorded."""
    release = release or release_key()
    recorded = list(recorded)
    if COMPARE_WITH in recorded and release == release_key():
        return COMPARE_WITH, "asked for (QFORMER_LORA_COMPARE_WITH)"
    if release in recorded:
        return release, "recorded"
    if not recorded:
        raise UnknownRelease(f"no release is recorded to compare {release} with")
    below = [r for r in recorded if release_order(r) <= release_order(release)]
    if below:
        return max(below, key=release_order), "the newest recorded release below it"
    return max(recorded, key=release_order), "the newest recorded release"


def for_release(table: str) -> dict:
    """The installed release's row of ``table``, or, when it is not recorded, its reference release's."""
    releases = releases_of(table)
    return releases[reference_release(releases)[0]]


@dataclass(frozen=True)
class Difference:
    """One behaviour whose observed value differs from the value pinned for the compared release."""

    table: str
    key: str
    release: str  # the installed release, where ``observed`` was seen
    against: str  # the recorded release whose row ``pinned`` is
    observed: object
    pinned: object

    def line(self) -> str:
        """The behaviour, both releases and both values; for nested rows only the parts that differ."""
        if self.pinned is _MISSING:
            return f"{self.table}[{self.key!r}]: {self.release} shows {self.observed!r}; {self.against} has no value"
        parts = _differing_parts(self.observed, self.pinned)
        shown = "; ".join(
            f"{where or 'value'}: {self.release} shows {o!r}, {self.against} pinned {p!r}" for where, o, p in parts[:4]
        )
        more = f"; and {len(parts) - 4} more" if len(parts) > 4 else ""
        return f"{self.table}[{self.key!r}]: {shown}{more}"


def _differing_parts(observed, pinned, where: str = "") -> list[tuple[str, object, object]]:
    """[(dotted path, observed, pinned)] of the leaves where two nested dicts differ."""
    if isinstance(observed, dict) and isinstance(pinned, dict):
        parts = []
        for k in list(pinned) + [k for k in observed if k not in pinned]:
            path = f"{where}.{k}" if where else str(k)
            parts += _differing_parts(observed.get(k, _ABSENT), pinned.get(k, _ABSENT), path)
        return parts
    return [] if observed == pinned else [(where, observed, pinned)]


def _release_neutral(value, release: str):
    """``value`` with ``release``'s own version numbers replaced by placeholders: messages that quote the
    installed release ("the own forward of transformers 5.24.0 needs ...") compare across releases."""
    if isinstance(value, dict):
        return {k: _release_neutral(v, release) for k, v in value.items()}
    if isinstance(value, list):
        return [_release_neutral(v, release) for v in value]
    if isinstance(value, str):
        for library, version in zip(("transformers", "peft"), release_order(release)):
            value = re.sub(rf"(?<![\w.]){re.escape(str(version))}(?![\w.])", f"<{library}>", value)
    return value


_MISSING = object()
_ABSENT = "<absent>"


def compare(table: str, key: str, observed, release: str | None = None) -> Difference | None:
    """None when ``observed`` is the value pinned for ``release`` (default: the installed one) or its
    reference release; else the Difference."""
    release = release or release_key()
    releases = releases_of(table)
    against, _ = reference_release(releases, release)
    pinned = releases[against].get(key, _MISSING)
    if pinned == observed or (
        pinned is not _MISSING
        and against != release
        and _release_neutral(pinned, against) == _release_neutral(observed, release)
    ):
        return None
    return Difference(table, key, release, against, observed, pinned)


def lacking(release: str | None = None) -> dict[str, tuple[str, str]]:
    """{table: (the release it is compared with, how it was chosen)} for every per-release table without
    ``release`` (or, with QFORMER_LORA_COMPARE_WITH, compared with another one)."""
    release = release or release_key()
    out = {}
    for table in tables():
        releases = releases_of(table)
        if releases and (release not in releases or COMPARE_WITH in releases):
            out[table] = reference_release(releases, release)
    return out


def release_status(release: str | None = None) -> dict:
    """What a command says once about the installed release: recorded or not, and compared with what.

    ``comparisons``: [{"release", "how", "tables"}], one per recorded release compared with (tables
    recorded at different releases can fall back to different ones)."""
    release = release or release_key()
    missing = lacking(release)
    groups: dict[tuple[str, str], list[str]] = {}
    for table, against_how in missing.items():
        groups.setdefault(against_how, []).append(table)
    comparisons = [
        {"release": against, "how": how, "tables": sorted(names)}
        for (against, how), names in sorted(groups.items(), key=lambda item: release_order(item[0][0]))
    ]
    return {
        "release": release,
        "recorded": not missing,
        "compared_with": [c["release"] for c in comparisons],
        "comparisons": comparisons,
        "tables_lacking": sorted(missing),
    }


def status_line(status: dict) -> str | None:
    """One sentence for an unrecorded release; None for a recorded one."""
    if status["recorded"]:
        return None
    compared = "; ".join(f"{c['release']} ({c['how']}: {', '.join(c['tables'])})" for c in status["comparisons"])
    return f"{status['release']} is not recorded in the expectation tables; compared with {compared}"


# ----------------------------------------------------------------------------- recording


@functools.cache
def environment() -> dict:
    """The environment a recorded row was observed in: every installed distribution's version, Python,
    the CPU features that change results (compat.cpu_features) and the checkout's commit."""
    packages = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name:
            packages[name] = dist.version
    return {
        "python": platform.python_version(),
        "packages": dict(sorted(packages.items())),
        "cpu": compat.cpu_features(),
        "commit": _git("rev-parse", "HEAD"),
    }


def pinned_environment(table: str, release: str, key: str) -> dict | None:
    """The environment ``table``'s value for ``release`` and ``key`` was observed in; None for a value
    recorded before environments were kept."""
    data = load(table)
    env_id = data.get("observed_in", {}).get(release, {}).get(key)
    return data.get("environments", {}).get(env_id) if env_id else None


def environment_changes(then: dict | None, now: dict) -> list[str]:
    """What differs between two environments: the CPU, Python, and each package added, removed or moved."""
    if then is None:
        return ["not stored (recorded before environments were kept)"]
    changes = [f"cpu {then['cpu']} -> {now['cpu']}"] if then["cpu"] != now["cpu"] else []
    changes += [f"python {then['python']} -> {now['python']}"] if then["python"] != now["python"] else []
    old, new = then["packages"], now["packages"]
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            changes.append(f"{name} {old.get(name, 'absent')} -> {new.get(name, 'absent')}")
    return changes


def environment_id(env: dict) -> str:
    return hashlib.sha256(jsonio.dumps(env, sort_keys=True).encode()).hexdigest()[:12]


def _git(*args: str) -> str | None:
    """git's output in the folder holding the tables; None outside a checkout (an installed package)."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=EXPECTATIONS_DIR, capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.rstrip()  # not lstrip: porcelain lines start with a status column that may be blank


def dirty_paths(porcelain: str) -> list[str]:
    """The paths of ``git status --porcelain`` output that a recording may not leave behind."""
    paths = [line[3:].split(" -> ")[-1].strip('"') for line in porcelain.splitlines() if line.strip()]
    return [p for p in paths if not p.startswith(RECORDING_MAY_CHANGE)]


@functools.cache
def _checked_clean() -> None:
    # once per process: the first record() makes the tables themselves dirty, which is allowed
    if _git("rev-parse", "--is-inside-work-tree") != "true":
        return  # an installed copy (nox -s newest records into the venv's): no checkout to describe
    dirty = dirty_paths(_git("status", "--porcelain", "--untracked-files=all") or "")
    if dirty:
        shown = ", ".join(dirty[:8]) + (f" and {len(dirty) - 8} more" if len(dirty) > 8 else "")
        raise DirtyTree(
            f"QFORMER_LORA_RECORD=1 refuses to record into {EXPECTATIONS_DIR} from a checkout with uncommitted "
            f"changes ({shown}): a recorded row must be the behaviour of committed code. Commit or stash them, "
            f"then record again."
        )


def record(table: str, key: str, value) -> None:
    """Store ``value`` under the installed release and ``key``, with the environment it was observed in
    (atomic rewrite of the file). Raises DirtyTree in a checkout with changes outside the tables."""
    _checked_clean()
    path = _path(table)
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"releases": {}}
    release = release_key()
    env = environment()
    env_id = environment_id(env)
    data.setdefault("releases", {}).setdefault(release, {})[key] = value
    data.setdefault("observed_in", {}).setdefault(release, {})[key] = env_id
    data.setdefault("environments", {})[env_id] = env
    used = {i for row in data["observed_in"].values() for i in row.values()}
    data["environments"] = {i: e for i, e in sorted(data["environments"].items()) if i in used}
    for section in ("releases", "observed_in"):
        data[section] = dict(sorted(data[section].items(), key=lambda item: release_order(item[0])))
    jsonio.write(path, data)
