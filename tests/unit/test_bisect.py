"""scripts/bisect_boundary.py's pure part: the binary search over releases and the PyPI release list.

The venv / pip plumbing is exercised by running the script (reports/compat/boundaries.json), not here.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ..conftest import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bisect_boundary.py"
bisect = load_script(SCRIPT)


class Counting:
    """probe(candidate) -> values[index], counting calls per candidate."""

    def __init__(self, candidates, values):
        self.index = {c: i for i, c in enumerate(candidates)}
        self.values = values
        self.calls: list = []

    def __call__(self, candidate):
        self.calls.append(candidate)
        return self.values[self.index[candidate]]


def releases(n: int) -> list[str]:
    return [f"4.{i}.0" for i in range(n)]


@given(n=st.integers(1, 300), data=st.data())
def test_a_step_is_found_within_log2_n_plus_one_probes(n, data):
    # the step can sit at any of n positions: 1..n-1, or n meaning "no change"
    step = data.draw(st.integers(1, n), label="step")
    candidates = releases(n)
    probe = Counting(candidates, ["old"] * step + ["new"] * (n - step))
    found = bisect.first_change(candidates, probe)
    assert found.first == (step if step < n else None)
    assert len(probe.calls) == len(set(probe.calls)) == len(found.probed)  # nothing probed twice
    assert len(probe.calls) <= math.ceil(math.log2(n)) + 1


@given(n=st.integers(2, 300), data=st.data())
def test_known_ends_are_not_probed_again(n, data):
    # both ends known (the matrix pair and the decider): only the interior is probed,
    # n - 1 positions for the step -> at most ceil(log2(n - 1)) probes
    step = data.draw(st.integers(1, n - 1), label="step")
    candidates = releases(n)
    values = ["old"] * step + ["new"] * (n - step)
    probe = Counting(candidates, values)
    found = bisect.first_change(candidates, probe, known={0: "old", n - 1: "new"})
    assert found.first == step
    assert candidates[0] not in probe.calls and candidates[-1] not in probe.calls
    assert len(probe.calls) <= math.ceil(math.log2(n - 1))


@given(values=st.lists(st.sampled_from("abc"), min_size=1, max_size=40))
def test_what_it_returns_agrees_with_every_observation_and_what_it_refuses_is_a_real_contradiction(values):
    candidates = releases(len(values))
    probe = Counting(candidates, values)
    try:
        found = bisect.first_change(candidates, probe)
    except bisect.NonMonotone as err:
        # the message names the releases; they must witness a real non-step in the true values
        named = [c for c in candidates if f"{c} shows" in str(err)]
        assert len(named) == 3, str(err)
        first, changed, later = (values[candidates.index(c)] for c in named)
        assert changed != first and later != changed
        return
    for i, value in found.observations.items():
        before = found.first is None or i < found.first
        assert (value == values[0]) == before
        assert value == values[i]
    if found.first is not None:
        assert values[found.first] != values[0] and values[found.first - 1] == values[0]


def test_a_third_behaviour_it_sees_is_refused_naming_the_releases():
    # n = 4: probe 4.0.0 (a), lo=0 hi=4 -> mid 2 = "c" (changed, hi=2) -> mid 1 = "b" (changed, hi=1):
    # 4.1.0 shows b and 4.2.0 shows c, two different new behaviours
    candidates = releases(4)
    with pytest.raises(bisect.NonMonotone, match=r"4\.1\.0 shows 'b', then 4\.2\.0 shows 'c' \(a third behaviour\)"):
        bisect.first_change(candidates, Counting(candidates, ["a", "b", "c", "c"]))


def test_known_observations_that_go_back_are_refused_before_any_search():
    # known: 4.1.0 changed, 4.2.0 back to the first behaviour; the reference probe of 4.0.0 is the only call
    candidates = releases(3)
    probe = Counting(candidates, ["old", "new", "old"])
    with pytest.raises(bisect.NonMonotone, match=r"4\.1\.0 shows 'new', then 4\.2\.0 shows 'old' \(back to"):
        bisect.first_change(candidates, probe, known={1: "new", 2: "old"})
    assert probe.calls == ["4.0.0"]


def test_no_candidates_is_an_error():
    with pytest.raises(ValueError, match="no candidates"):
        bisect.first_change([], lambda c: c)


def test_final_releases_leave_out_pre_dev_and_yanked_releases():
    # 4.52.0: both files yanked -> out; 4.52.1: one of two yanked -> in; 5.0.0rc1 / 4.53.0.dev0 -> out
    page = {
        "versions": ["4.51.3", "4.52.0", "4.52.1", "4.53.0.dev0", "5.0.0rc1", "not-a-version"],
        "files": [
            {"filename": "transformers-4.51.3-py3-none-any.whl"},
            {"filename": "transformers-4.52.0-py3-none-any.whl", "yanked": "broken"},
            {"filename": "transformers-4.52.0.tar.gz", "yanked": True},
            {"filename": "transformers-4.52.1-py3-none-any.whl", "yanked": "oops"},
            {"filename": "transformers-4.52.1.tar.gz", "yanked": False},
            {"filename": "transformers-5.0.0rc1-py3-none-any.whl"},
        ],
    }
    assert [str(v) for v in bisect.final_releases(page)] == ["4.51.3", "4.52.1"]


def test_between_keeps_both_ends_and_orders_by_version_not_text():
    # "4.10.0" sorts before "4.9.0" as text; by version it comes after
    listed = [bisect.Version(v) for v in ("4.8.0", "4.9.0", "4.10.0", "4.11.0")]
    assert bisect.between(listed, "4.8.5", "4.10.0") == ["4.8.5", "4.9.0", "4.10.0"]


YANKED_PAGE = {
    # 4.52.0: both files yanked, one with a reason -> yanked, reason kept; 4.52.1: one of two yanked -> a
    # release; 4.50.0: yanked without a reason -> yanked, reason ""; 5.0.0rc1: yanked but a pre-release,
    # which the search never considers -> not listed
    "versions": ["4.50.0", "4.51.3", "4.52.0", "4.52.1", "4.53.3", "5.0.0rc1"],
    "files": [
        {"filename": "transformers-4.50.0-py3-none-any.whl", "yanked": True},
        {"filename": "transformers-4.51.3-py3-none-any.whl", "yanked": False},
        {"filename": "transformers-4.52.0-py3-none-any.whl", "yanked": "broken import"},
        {"filename": "transformers-4.52.0.tar.gz", "yanked": True},
        {"filename": "transformers-4.52.1-py3-none-any.whl", "yanked": "oops"},
        {"filename": "transformers-4.52.1.tar.gz"},
        {"filename": "transformers-4.53.3-py3-none-any.whl"},
        {"filename": "transformers-5.0.0rc1-py3-none-any.whl", "yanked": True},
    ],
}


def test_yanked_releases_are_the_final_ones_left_out_with_their_reasons():
    releases = bisect.Releases.from_page(YANKED_PAGE)
    assert {str(v): r for v, r in releases.yanked.items()} == {"4.50.0": "", "4.52.0": "broken import"}
    # every listed final release is either searched or yanked, never both
    assert [str(v) for v in releases.final] == ["4.51.3", "4.52.1", "4.53.3"]
    assert not set(releases.final) & set(releases.yanked)
    # strictly between the ends: 4.50.0 lies below 4.51.3, so only 4.52.0 was skipped
    assert bisect.yanked_between(releases.yanked, "4.51.3", "4.53.3") == [
        {"version": "4.52.0", "reason": "broken import"}
    ]
    assert bisect.yanked_between(releases.yanked, "4.52.0", "4.53.3") == []  # an end is not "skipped"


class TableBoundary(bisect.Boundary):
    """A Boundary whose releases are observed from ``table`` ((t, p) -> signature); a pair missing from it
    fails as an uninstallable release does (ProbeFailed)."""

    def __init__(self, table: dict, a: dict, b: dict):
        super().__init__("kwarg_conflict", a, b, lambda row: row["sig"], str, Path("unused"), "unused")
        self.table = table

    def value(self, t: str, p: str):
        self.observed.append({"transformers": t, "peft": p})
        if (t, p) not in self.table:
            raise bisect.ProbeFailed(f"transformers {t} / peft {p} could not be observed: pip install failed")
        return self.table[(t, p)]


A = {"_t": "4.51.3", "_p": "0.15.2", "sig": "old"}
B = {"_t": "4.53.3", "_p": "0.16.0", "sig": "new"}


def test_the_record_lists_the_yanked_releases_the_search_skipped():
    # decider transformers 4.51.3 + peft 0.16.0 shows "old" -> transformers bisected, peft held at 0.16.0;
    # candidates 4.51.3, 4.52.1, 4.53.3 (4.52.0 yanked); ends known, so mid = (0 + 2) // 2 = 1 -> 4.52.1: new
    table = {("4.51.3", "0.16.0"): "old", ("4.52.1", "0.16.0"): "new"}
    releases = {"transformers": bisect.Releases.from_page(YANKED_PAGE), "peft": bisect.Releases([], {})}
    record = bisect.bisect_boundary(TableBoundary(table, A, B), releases)
    assert record["status"] == "bisected", record
    assert (record["bisected"], record["held"]) == ("transformers", {"peft": "0.16.0"})
    assert record["candidates"] == ["4.51.3", "4.52.1", "4.53.3"]
    assert record["yanked_skipped"] == [{"version": "4.52.0", "reason": "broken import"}]
    assert (record["last_before"], record["first_changed"]) == ("4.51.3", "4.52.1")
    report = bisect.compat_report_module()
    assert "yanked and skipped: 4.52.0, 2 releases probed)" in report.exact_text(record)
    assert report.exact_text(record | {"probes": record["probes"][:1]}).endswith(", 1 release probed)")


def test_a_search_that_cannot_observe_a_release_records_why_and_what_it_searched():
    # 4.52.1 cannot be installed: the record says so, and still names the library, held release and yanked one
    table = {("4.51.3", "0.16.0"): "old"}
    releases = {"transformers": bisect.Releases.from_page(YANKED_PAGE), "peft": bisect.Releases([], {})}
    record = bisect.bisect_boundary(TableBoundary(table, A, B), releases)
    assert record["status"] == "not bisected"
    assert record["reason"] == "transformers 4.52.1 / peft 0.16.0 could not be observed: pip install failed"
    assert (record["bisected"], record["yanked_skipped"][0]["version"]) == ("transformers", "4.52.0")
    assert "first_changed" not in record
    text = bisect.compat_report_module().exact_text(record | {"reason": record["reason"] + "\npip tail"})
    assert text == f" — not bisected: {record['reason']} (pip's last lines in boundaries.json)"


def test_every_behaviour_of_the_report_has_a_driver_order_and_probe_sections():
    # a Boundaries row the script cannot bisect is a boundary COMPAT.md cannot name the release of
    names = set(bisect.compat_report_module().BEHAVIOURS)
    assert set(bisect.BEHAVIOUR_DRIVERS) == names
    assert set(bisect.BEHAVIOUR_SECTIONS) == names
    for name, drivers in bisect.BEHAVIOUR_DRIVERS.items():
        assert sorted(drivers) == sorted(bisect.LIBRARIES), name
        assert bisect.BEHAVIOUR_SECTIONS[name], name


def _attention_row(t: str, p: str, lm_in_use: str, *, lm_configured: str = "sdpa", sdpa_run: str = "ok") -> dict:
    """A compat_probe-shaped row (the "attention" section, as --observe writes it) for every tiny preset:
    vision and Q-Former run eager by default, the LM runs ``lm_in_use``."""
    default = {
        "vision_model": {"configured": "eager", "in_use": "eager"},
        "qformer": {"configured": "eager", "in_use": "eager"},
        "language_model": {"configured": lm_configured, "in_use": lm_in_use},
    }
    preset = {"default": default, "sdpa": {"status": sdpa_run}, "eager": {"status": "ok"}}
    names = ("tiny-instructblip-flan-t5", "tiny-instructblip-vicuna", "tiny-blip2-flan-t5", "tiny-blip2-opt")
    return {"_t": t, "_p": p, "attention": {n: preset for n in names}}


class AttentionBoundary(bisect.Boundary):
    """The "attention" Boundary with compat_report's own signature and description, observing rows from
    ``rows`` ((t, p) -> probe-shaped row) instead of venvs."""

    def __init__(self, rows: dict, a: dict, b: dict):
        _, signature, describe = bisect.compat_report_module().BEHAVIOURS["attention"]
        super().__init__("attention", a, b, signature, describe, Path("unused"), "unused")
        self.rows = rows

    def value(self, t: str, p: str):
        self.observed.append({"transformers": t, "peft": p})
        return self.signature(self.rows[(t, p)])


def test_attention_is_bisected_on_the_implementation_each_component_runs_by_default():
    # A (4.45.2 / 0.13.2): every component runs eager; B (4.48.3 / 0.14.0): the LM runs sdpa.
    # Decider = transformers A + peft B = 4.45.2 / 0.14.0: eager like A -> transformers bisected, peft held
    # at 0.14.0. Candidates 4.45.2, 4.46.1, 4.47.0, 4.48.3 with both ends known: mid (0 + 3) // 2 = 1 ->
    # 4.46.1, eager (lo = 1); mid (1 + 3) // 2 = 2 -> 4.47.0, sdpa (hi = 2): first changed 4.47.0.
    # 4.46.1 differs from A in what the LM's config *says* (sdpa configured, eager run) and in the explicit
    # sdpa build being refused: neither is the default that runs, so it must still count as "old".
    a, b = _attention_row("4.45.2", "0.13.2", "eager"), _attention_row("4.48.3", "0.14.0", "sdpa")
    rows = {
        ("4.45.2", "0.14.0"): _attention_row("4.45.2", "0.14.0", "eager"),
        ("4.46.1", "0.14.0"): _attention_row("4.46.1", "0.14.0", "eager", lm_configured="sdpa", sdpa_run="refused"),
        ("4.47.0", "0.14.0"): _attention_row("4.47.0", "0.14.0", "sdpa"),
    }
    releases = {
        "transformers": bisect.Releases([bisect.Version(v) for v in ("4.45.2", "4.46.1", "4.47.0", "4.48.3")], {}),
        "peft": bisect.Releases([], {}),
    }
    record = bisect.bisect_boundary(AttentionBoundary(rows, a, b), releases)
    assert record["status"] == "bisected", record
    assert (record["bisected"], record["held"]) == ("transformers", {"peft": "0.14.0"})
    assert (record["last_before"], record["first_changed"]) == ("4.46.1", "4.47.0")
    assert [o["transformers"] for o in record["probes"]] == ["4.45.2", "4.46.1", "4.47.0"]
    assert (record["old"], record["new"]) == ("all eager", "vision eager, Q-Former eager, LM sdpa")


@given(n=st.integers(3, 200), data=st.data())
def test_a_two_step_boundary_is_split_into_both_steps_each_found_exactly(n, data):
    # a ... a b ... b c ... c: the first change (a -> b at s1) is not the newer end's behaviour, so the
    # search goes on from s1 to the end (b -> c at s2). With both ends known, each step is one binary
    # search over at most n - 1 positions: at most 2 * ceil(log2(n - 1)) probes, none twice
    s1 = data.draw(st.integers(1, n - 2), label="s1")
    s2 = data.draw(st.integers(s1 + 1, n - 1), label="s2")
    candidates = releases(n)
    values = ["a"] * s1 + ["b"] * (s2 - s1) + ["c"] * (n - s2)
    probe = Counting(candidates, values)
    found = bisect.changes(candidates, probe, known={0: "a", n - 1: "c"})
    assert found.firsts == (s1, s2)
    assert len(probe.calls) == len(set(probe.calls)) == len(found.probed)
    assert len(probe.calls) <= 2 * math.ceil(math.log2(n - 1))


@given(n=st.integers(1, 300), data=st.data())
def test_one_step_is_one_step_for_changes_too(n, data):
    # the boundaries bisected before steps were recorded: same answer as first_change
    step = data.draw(st.integers(1, n), label="step")
    candidates = releases(n)
    values = ["old"] * step + ["new"] * (n - step)
    found = bisect.changes(candidates, Counting(candidates, values))
    assert found.firsts == ((step,) if step < n else ())
    first = bisect.first_change(candidates, Counting(candidates, values)).first
    assert found.firsts == (() if first is None else (first,))


@given(values=st.lists(st.sampled_from("abc"), min_size=1, max_size=40))
def test_changes_agree_with_every_observation_and_refuse_only_a_behaviour_that_comes_back(values):
    candidates = releases(len(values))
    try:
        found = bisect.changes(candidates, Counting(candidates, values))
    except bisect.NonMonotone as err:
        # three releases named: the first and the last show the same behaviour, the middle one another
        named = [c for c in candidates if f"{c} shows" in str(err)]
        assert len(named) == 3, str(err)
        first, middle, later = (values[candidates.index(c)] for c in named)
        assert first == later != middle
        return
    starts = (0, *found.firsts)
    for f in found.firsts:  # each first change is exact: it differs from the release right before it
        assert values[f] != values[f - 1]
    for i, value in found.observations.items():
        assert value == values[i]
        run = max(s for s in starts if s <= i)  # the step this release falls in shows the run's behaviour
        assert value == values[run]


def test_a_behaviour_that_comes_back_is_still_refused_naming_the_releases():
    # known a, b, a: not a sequence of steps; refused before any search (only the reference is read,
    # and it is known, so nothing is probed)
    candidates = releases(3)
    probe = Counting(candidates, ["a", "b", "a"])
    with pytest.raises(bisect.NonMonotone, match=r"4\.1\.0 shows 'b', then 4\.2\.0 shows 'a' \(back to an earlier"):
        bisect.changes(candidates, probe, known={0: "a", 1: "b", 2: "a"})
    assert probe.calls == []


def test_a_two_step_record_lists_both_steps_and_the_report_names_both_releases():
    # A 5.0.0 / 0.18.1 "old", B 5.3.0 / 0.21.2 "new". Decider 5.0.0 / 0.21.2: old -> transformers
    # bisected, peft held at 0.21.2. Candidates 5.0.0, 5.1.0, 5.2.0, 5.3.0, ends known (0 old, 3 new).
    # Step 1: mid (0 + 3) // 2 = 1 -> 5.1.0 "mid" (differs: hi = 1): first change 5.1.0, last before 5.0.0.
    # "mid" is not B's behaviour, so step 2 from 5.1.0: lo = 1, hi = 3 -> mid 2 -> 5.2.0 "mid" (lo = 2):
    # first changed 5.3.0, last before 5.2.0. Observed: the decider, 5.1.0, 5.2.0 (B is the matrix's).
    a, b = {"_t": "5.0.0", "_p": "0.18.1", "sig": "old"}, {"_t": "5.3.0", "_p": "0.21.2", "sig": "new"}
    table = {("5.0.0", "0.21.2"): "old", ("5.1.0", "0.21.2"): "mid", ("5.2.0", "0.21.2"): "mid"}
    releases_ = {
        "transformers": bisect.Releases([bisect.Version(v) for v in ("5.0.0", "5.1.0", "5.2.0", "5.3.0")], {}),
        "peft": bisect.Releases([], {}),
    }
    record = bisect.bisect_boundary(TableBoundary(table, a, b), releases_)
    assert record["status"] == "bisected", record
    assert record["steps"] == [
        {"from": "old", "to": "mid", "last_before": "5.0.0", "first_changed": "5.1.0"},
        {"from": "mid", "to": "new", "last_before": "5.2.0", "first_changed": "5.3.0"},
    ]
    assert (record["last_before"], record["first_changed"]) == ("5.0.0", "5.1.0")
    assert [(o["transformers"], o["peft"]) for o in record["probes"]] == [
        ("5.0.0", "0.21.2"),
        ("5.1.0", "0.21.2"),
        ("5.2.0", "0.21.2"),
    ]
    text = bisect.compat_report_module().exact_text(record)
    assert text == (
        " — first at transformers 5.1.0 (→ mid; last before: 5.0.0), then 5.3.0 (→ new; last before: 5.2.0; "
        "bisected over 5.0.0…5.3.0, peft held at 0.21.2, 3 releases probed)"
    )
