"""An unrecorded release is a diff, not a wall of failures (issue 31): which recorded release it is compared
with, each differing behaviour named with both values, recording refused on a dirty checkout and every
recorded value stored with its environment."""

from __future__ import annotations

import json
import shutil

import pytest

from qformer_lora import cli
from qformer_lora.repro import expectations, release_diff

T = "transformers {} / peft {}".format
RECORDED = [T("4.33.3", "0.5.0"), T("5.0.0", "0.18.1"), T("5.24.0", "0.21.2")]
UNRECORDED = T("5.99.0", "0.99.0")


def test_the_reference_release_is_the_newest_recorded_at_or_below(monkeypatch):
    assert expectations.reference_release(RECORDED, T("5.0.0", "0.18.1")) == (T("5.0.0", "0.18.1"), "recorded")
    # 5.23 is below 5.24: the newest below it is 5.0.0, not the newer 5.24.0
    below = expectations.reference_release(RECORDED, T("5.23.0", "0.21.2"))
    assert below == (T("5.0.0", "0.18.1"), "the newest recorded release below it")
    assert expectations.reference_release(RECORDED, T("5.25.0", "0.22.0"))[0] == T("5.24.0", "0.21.2")
    # versions, not strings: "4.9" sorts after "4.33" as text
    assert expectations.reference_release(RECORDED, T("4.9.0", "0.4.0")) == (
        T("5.24.0", "0.21.2"),
        "the newest recorded release",
    )
    with pytest.raises(expectations.UnknownRelease, match="no release is recorded"):
        expectations.reference_release([], T("5.0.0", "0.18.1"))
    with pytest.raises(ValueError, match="not a release key"):
        expectations.release_order("transformers five")
    # asked for another recorded release (QFORMER_LORA_COMPARE_WITH): that one, even for a recorded release
    monkeypatch.setattr(expectations, "COMPARE_WITH", T("4.33.3", "0.5.0"))
    monkeypatch.setattr(expectations, "release_key", lambda: T("5.0.0", "0.18.1"))
    assert expectations.reference_release(RECORDED) == (T("4.33.3", "0.5.0"), "asked for (QFORMER_LORA_COMPARE_WITH)")


@pytest.fixture(autouse=True)
def no_release_asked_for(monkeypatch):
    # nox -s newest -- --against ... sets QFORMER_LORA_COMPARE_WITH for the pinned tests; these test the choice
    monkeypatch.setattr(expectations, "COMPARE_WITH", None)


@pytest.fixture
def tables(tmp_path, monkeypatch):
    """A copy of the shipped tables the test may change, with the installed release made unrecorded."""
    folder = tmp_path / "expectations"
    shutil.copytree(expectations.EXPECTATIONS_DIR, folder)
    monkeypatch.setattr(expectations, "EXPECTATIONS_DIR", folder)
    monkeypatch.setattr(expectations, "release_key", lambda: UNRECORDED)
    return folder


def newest_recorded(table: str) -> str:
    return max(expectations.releases_of(table), key=expectations.release_order)


def test_a_difference_names_the_behaviour_both_releases_and_only_what_differs(tables):
    against = newest_recorded("kwarg_conflict")
    pinned = expectations.releases_of("kwarg_conflict")[against]["tiny-blip2-opt / CAUSAL_LM"]
    assert expectations.compare("kwarg_conflict", "tiny-blip2-opt / CAUSAL_LM", pinned) is None
    observed = pinned | {"status": "error", "exception": "TypeError"}
    line = expectations.compare("kwarg_conflict", "tiny-blip2-opt / CAUSAL_LM", observed).line()
    assert line == (
        f"kwarg_conflict['tiny-blip2-opt / CAUSAL_LM']: status: {UNRECORDED} shows 'error', {against} pinned 'ok'; "
        f"exception: {UNRECORDED} shows 'TypeError', {against} pinned '<absent>'"
    )
    missing = expectations.compare("kwarg_conflict", "no such case", 1).line()
    assert missing == f"kwarg_conflict['no such case']: {UNRECORDED} shows 1; {against} has no value"


def test_a_message_quoting_its_own_release_is_the_same_behaviour():
    old, new = T("5.24.0", "0.21.2"), T("5.25.0", "0.22.0")
    pinned = {"message": "the own forward of transformers 5.24.0 needs image tokens from 4.55.0 on"}
    observed = {"message": "the own forward of transformers 5.25.0 needs image tokens from 4.55.0 on"}
    assert expectations._release_neutral(pinned, old) == expectations._release_neutral(observed, new)
    # another version in the text (4.55.0) is not the release's and stays
    assert "4.55.0" in expectations._release_neutral(observed, new)["message"]
    assert expectations._release_neutral("15.25.0 and 5.25.01", new) == "15.25.0 and 5.25.01"


def test_the_summary_lists_the_tables_that_lack_the_release(tables):
    status = expectations.release_status()
    assert status["recorded"] is False and status["release"] == UNRECORDED
    per_release = [t for t in expectations.tables() if expectations.releases_of(t)]
    assert status["tables_lacking"] == per_release and "lora_counts" not in per_release
    line = expectations.status_line(status)
    assert line == (
        f"{UNRECORDED} is not recorded in the expectation tables; compared with {newest_recorded('kwarg_conflict')} "
        f"(the newest recorded release below it: {', '.join(per_release)})"
    )


def test_tables_recorded_from_different_releases_are_compared_with_each_ones_own(tables):
    # a table first recorded at 5.24 (known_warnings, made so here) lies above 5.23 in every row: it falls back
    # to its newest row, the others to the newest release below 5.23 (as reproduce said on a real 5.23.0 venv)
    data = json.loads((tables / "known_warnings.json").read_text())
    data["releases"] = {r: row for r, row in data["releases"].items() if expectations.release_order(r)[0].major >= 5
                        and expectations.release_order(r)[0].minor >= 24}  # fmt: skip
    (tables / "known_warnings.json").write_text(json.dumps(data))
    release = T("5.23.0", "0.21.2")
    status = expectations.release_status(release)
    below = [c for c in status["comparisons"] if c["how"] == "the newest recorded release below it"]
    newest = [c for c in status["comparisons"] if c["how"] == "the newest recorded release"]
    assert [c["release"] for c in below] == [T("5.0.0", "0.18.1")] and "kwarg_conflict" in below[0]["tables"]
    assert "known_warnings" in newest[0]["tables"] and "kwarg_conflict" not in newest[0]["tables"]
    assert sorted(below[0]["tables"] + newest[0]["tables"]) == status["tables_lacking"]


def test_reproduce_on_an_unrecorded_release_exits_0_and_names_each_difference(tables, capsys):
    data = json.loads((tables / "kwarg_conflict.json").read_text())
    against = newest_recorded("kwarg_conflict")
    data["releases"][against]["tiny-blip2-flan-t5 / None"] = {"status": "error", "exception": "TypeError"}
    (tables / "kwarg_conflict.json").write_text(json.dumps(data))
    assert cli.main(["reproduce", "--only", "kwarg-conflict"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{UNRECORDED} is not recorded in the expectation tables")
    assert out.count("is not recorded") == 1  # said once
    assert "1 of 16 behaviours differ" in out
    assert (
        f"kwarg_conflict['tiny-blip2-flan-t5 / None']: status: {UNRECORDED} shows 'ok', {against} pinned 'error'" in out
    )


def test_verify_says_it_once_on_stderr_and_keeps_its_json(tables, capsys):
    assert cli.main(["verify", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["release"]["recorded"] is False and report["release"]["differences"] == []
    assert captured.err.count("is not recorded") == 1
    assert "the 16 behaviours looked at are the same" in captured.err


def test_doctor_says_it_too(tables, capsys):
    assert cli.main(["doctor", "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["release"]["compared_with"] == [newest_recorded("kwarg_conflict")]
    assert captured.err.count("is not recorded") == 1


def test_a_recorded_release_prints_nothing_and_observes_nothing(monkeypatch, capsys):
    recorded = [t for t in expectations.tables() if expectations.releases_of(t)]
    common = set.intersection(*(set(expectations.releases_of(t)) for t in recorded))
    monkeypatch.setattr(expectations, "release_key", lambda: max(common, key=expectations.release_order))
    monkeypatch.setattr(release_diff, "observe_kwarg_conflict", lambda: pytest.fail("observed on a recorded release"))
    assert release_diff.announce_if_unrecorded() is None
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- recording


def test_dirty_paths_allow_only_the_tables_and_reports():
    porcelain = "\n".join(
        [
            " M src/qformer_lora/resources/expectations/attention.json",  # the first line starts with a blank
            "?? reports/compat/5.25.0-0.22.0.json",
            " M src/qformer_lora/forward.py",
            'R  old.py -> "tests/new name.py"',
        ]
    )
    assert expectations.dirty_paths(porcelain) == ["src/qformer_lora/forward.py", "tests/new name.py"]


def test_record_refuses_a_dirty_checkout_and_stores_the_environment(tables, monkeypatch):
    answers = {"rev-parse --is-inside-work-tree": "true", "rev-parse HEAD": "abc123"}
    porcelain = [" M src/qformer_lora/forward.py"]
    monkeypatch.setattr(expectations, "_git", lambda *a: porcelain[0] if a[0] == "status" else answers[" ".join(a)])
    expectations._checked_clean.cache_clear()
    expectations.environment.cache_clear()
    with pytest.raises(expectations.DirtyTree, match=r"uncommitted changes \(src/qformer_lora/forward.py\)"):
        expectations.record("golden_loss", "k", [1.0])
    assert UNRECORDED not in expectations.releases_of("golden_loss")  # nothing written
    porcelain[0] = " M src/qformer_lora/resources/expectations/golden_loss.json"
    expectations._checked_clean.cache_clear()
    expectations.record("golden_loss", "k", [1.0])
    data = expectations.load("golden_loss")
    assert data["releases"][UNRECORDED] == {"k": [1.0]}
    env = data["environments"][data["observed_in"][UNRECORDED]["k"]]
    assert env["commit"] == "abc123" and env["packages"]["torch"].startswith("2.")
    assert env["cpu"]["capability"] and set(env) == {"python", "packages", "cpu", "commit"}
    assert list(data["releases"]) == sorted(data["releases"], key=expectations.release_order)
    expectations._checked_clean.cache_clear()
    expectations.environment.cache_clear()
