"""The declared Python range is true: nothing in the project needs a newer Python than
pyproject's ``requires-python`` minimum.

The first time it was not: ``train`` imported ``tomllib`` (3.11+, PEP 680) while pyproject
claimed 3.10, so every ``train`` on 3.10 failed with ``ModuleNotFoundError``. Torch has no
3.10 build on this machine's disk, so instead of running the suite on 3.10 this runs vermin,
which knows the version each standard-library module, member and syntax form arrived in, over
the package, the tests, the scripts and the noxfile. Imports guarded by a
``sys.version_info`` check (compat.tomllib) count as the older branch.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from qformer_lora.compat import tomllib

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def minimum_python() -> str:
    """The lowest version pyproject's ``requires-python`` admits, e.g. ``'3.10'``."""
    (spec,) = SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert spec.operator == ">=", f"requires-python {spec} is not a lower bound"
    return spec.version


def vermin(*paths: str | Path) -> subprocess.CompletedProcess:
    target = f"-t={minimum_python()}-"
    return subprocess.run(
        # vermin has no __main__ module: its console script calls vermin.main()
        [
            sys.executable,
            "-c",
            "import sys, vermin; sys.exit(vermin.main())",
            target,
            "--violations",
            "--no-tips",
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_project_runs_on_the_declared_minimum_python():
    result = vermin(REPO / "src", REPO / "tests", REPO / "scripts", REPO / "noxfile.py")
    assert result.returncode == 0, f"needs a Python newer than requires-python:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize(
    "source",
    ["import tomllib\n", "from datetime import UTC\n", "from enum import StrEnum\n"],
    ids=["tomllib", "datetime.UTC", "enum.StrEnum"],
)
def test_the_check_catches_a_311_only_feature(tmp_path: Path, source: str):
    """The same check fails on each 3.11-only feature (so a green run above means something)."""
    module = tmp_path / "newer.py"
    module.write_text(source, encoding="utf-8")
    result = vermin(module)
    assert result.returncode != 0 and "3.11" in result.stdout, result.stdout


def test_tomli_is_required_where_tomllib_is_missing():
    """compat falls back to tomli below 3.11; pyproject must then install it."""
    requirements = [Requirement(text) for text in PYPROJECT["project"]["dependencies"]]
    tomli = [req for req in requirements if req.name == "tomli"]
    assert tomli, "tomli is not a dependency"
    assert tomli[0].marker is not None and tomli[0].marker.evaluate({"python_version": "3.10"})
    assert not tomli[0].marker.evaluate({"python_version": "3.11"})
