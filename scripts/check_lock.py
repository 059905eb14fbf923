"""The installed distributions against the lock of the running Python (requirements/test-py3.X.lock).

    python scripts/check_lock.py [--lock FILE]

Every installed distribution must be pinned in the lock at the installed version, and every pinned
package must be installed; a local version label (torch's "+cpu") is ignored on both sides, as pip's
"==" ignores it. The project itself (installed editable) and pip, setuptools and wheel are left out.
Exits 1 listing each difference, 0 when there is none. Standard library only: it runs on every
Python the project supports (.ci/run calls it right after the install).
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IGNORED = frozenset({"qformer-lora", "pip", "setuptools", "wheel"})
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)$")


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them: "Jinja2", "typing_extensions" -> "jinja2", "typing-extensions"."""
    return re.sub(r"[-_.]+", "-", name).lower()


def public_version(version: str) -> str:
    """The version without its local label: "2.13.0+cpu" -> "2.13.0"."""
    return version.split("+", 1)[0].strip().lower()


def parse_lock(text: str) -> dict[str, str]:
    """{normalized name: version} of a lock's ``name==version`` lines; comments, blank lines and pip
    options are skipped. Any other line (a range, an environment marker) is an error: a per-Python
    lock pins every package exactly."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = _PIN.match(line)
        if match is None:
            raise ValueError(f"line {number}: not a name==version pin: {raw.strip()!r}")
        name = normalize(match.group(1))
        if name in pins:
            raise ValueError(f"line {number}: {match.group(1)} is pinned twice")
        pins[name] = match.group(2)
    return pins


def installed() -> dict[str, str]:
    """{normalized name: version} of the distributions importlib.metadata finds (the first of a name, as imports do)."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(normalize(name), dist.version)
    return found


def compare(locked: dict[str, str], present: dict[str, str], ignored: frozenset[str] = IGNORED) -> list[str]:
    """One line per difference, sorted by name: a version other than the lock's, a distribution the lock
    does not pin, a pinned package not installed. Empty when the environment is the lock's."""
    problems = []
    for name in sorted(set(locked) | set(present)):
        if name in ignored:
            continue
        if name not in present:
            problems.append(f"{name}: missing (the lock pins {locked[name]})")
        elif name not in locked:
            problems.append(f"{name}: {present[name]} installed, not in the lock")
        elif public_version(present[name]) != public_version(locked[name]):
            problems.append(f"{name}: {present[name]} installed, the lock pins {locked[name]}")
    return problems


def default_lock() -> Path:
    return REPO / "requirements" / f"test-py{sys.version_info[0]}.{sys.version_info[1]}.lock"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lock", type=Path, default=None, help="default: requirements/test-py<this Python>.lock")
    args = parser.parse_args(argv)
    lock = args.lock or default_lock()
    try:
        locked = parse_lock(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        print(f"check_lock: cannot read {lock}: {error}", file=sys.stderr)
        return 2
    present = installed()
    problems = compare(locked, present)
    if problems:
        print(f"check_lock: {len(problems)} difference(s) from {lock}:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    checked = len(set(present) - IGNORED)
    print(f"check_lock: the {checked} installed distributions are the versions {lock} pins")
    return 0


if __name__ == "__main__":
    sys.exit(main())
