"""scripts/mutation_report.py on a mutmut working tree written by hand: statuses, the score, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..conftest import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "mutation_report.py"

MUTATED = """
def x_f__mutmut_orig(a):
    return a + 1

def x_f__mutmut_1(a):
    return a - 1

def x_f__mutmut_2(a):
    return a + 2

def x_f__mutmut_3(a):
    return None
"""


@pytest.fixture(scope="module")
def report():
    return load_script(SCRIPT)


def tree(root: Path) -> Path:
    """mutants/src/pkg/m.py with three mutants of f: 1 killed (exit 1), 2 survived (0), 3 not checked (None)."""
    source = root / "mutants" / "src" / "pkg" / "m.py"
    source.parent.mkdir(parents=True)
    source.write_text(MUTATED, encoding="utf-8")
    codes = {"pkg.m.x_f__mutmut_1": 1, "pkg.m.x_f__mutmut_2": 0, "pkg.m.x_f__mutmut_3": None}
    (source.parent / "m.py.meta").write_text(json.dumps({"exit_code_by_key": codes}), encoding="utf-8")
    return root / "mutants"


def test_diffs_statuses_and_score(report, tmp_path):
    """Mutant 2 listed equivalent with its diff: out of the denominator, so 1 killed of 3 - 1 = 50 %; the
    not-checked mutant counts against the score. Listed with another diff, it is a stale entry, not applied."""
    mutants = tree(tmp_path)
    diff = "- return a + 1  + return a + 2"
    assert report.mutant_diffs(mutants / "src/pkg/m.py")["x_f__mutmut_2"] == diff
    rows = report.collect(mutants, {"pkg.m.x_f__mutmut_2": {"diff": diff}})["pkg.m"]
    assert [r["status"] for r in rows] == ["killed", "equivalent", "not checked"], rows
    assert report.score(rows)["score"] == 0.5
    stale = report.collect(mutants, {"pkg.m.x_f__mutmut_2": {"diff": "- return a  + return a + 2"}})["pkg.m"]
    assert stale[1]["status"] == "stale equivalent" and report.score(stale)["score"] == 1 / 3


def test_main_writes_the_report_says_how_and_fails_below_the_target(report, tmp_path, monkeypatch):
    mutants = tree(tmp_path)
    monkeypatch.setattr(report, "EQUIVALENT", tmp_path / "none.toml")
    monkeypatch.setattr(report, "load_equivalent", lambda path=None: {})
    out = tmp_path / "out"
    args = ["--mutants", str(mutants), "--out", str(out), "--wall-s", "12", "--how", "Staged: fast tests first."]
    assert report.main([*args, "--check"]) == 1  # 1 of 3 killed: 33 % < 90 %
    text = (out / "README.md").read_text(encoding="utf-8").splitlines()
    assert "whole run 12 s" in text[2] and text[4] == "Staged: fast tests first.", text[:6]
    assert "* `pkg.m.x_f__mutmut_2` (survived): `- return a + 1  + return a + 2`" in text
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert (
        summary["modules"]["pkg.m"]["score"] == pytest.approx(1 / 3) and summary["how"] == "Staged: fast tests first."
    )


def test_a_timeout_is_detected_and_a_mutant_without_tests_is_not(report, tmp_path):
    """Mutant 2 ran past mutmut's CPU limit (exit -24, SIGXCPU: an endless loop), mutant 3 reached by no test
    (exit 33): detected 2 of 3 (killed + timeout, PIT's and Stryker's rule), 66.7 %."""
    mutants = tree(tmp_path)
    meta = mutants / "src/pkg/m.py.meta"
    codes = {"pkg.m.x_f__mutmut_1": 1, "pkg.m.x_f__mutmut_2": -24, "pkg.m.x_f__mutmut_3": 33}
    meta.write_text(json.dumps({"exit_code_by_key": codes}), encoding="utf-8")
    rows = report.collect(mutants, {})["pkg.m"]
    assert [r["status"] for r in rows] == ["killed", "timeout", "no tests"], rows
    assert report.score(rows)["score"] == pytest.approx(2 / 3)


def test_a_mutated_default_in_a_one_line_def_shows_in_the_diff(report, tmp_path):
    """mutmut renames each copy (x_g__mutmut_1, ...): the def line is compared without the name, so a changed
    default argument is the diff, and an unchanged def line is not."""
    source = tmp_path / "m.py"
    source.write_text(
        'def x_g__mutmut_orig(a, r="mean"):\n    return a\n\n'
        'def x_g__mutmut_1(a, r="XXmeanXX"):\n    return a\n\n'
        'def x_g__mutmut_2(a, r="mean"):\n    return None\n',
        encoding="utf-8",
    )
    diffs = report.mutant_diffs(source)
    assert diffs["x_g__mutmut_1"] == '- def f(a, r="mean"):  + def f(a, r="XXmeanXX"):', diffs
    assert diffs["x_g__mutmut_2"] == "- return a  + return None", diffs
