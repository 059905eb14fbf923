"""This release against the recorded ones: what `reproduce`, `verify` and `doctor` say about it, once.

A release the expectation tables hold is simply named. One they do not hold is compared with
the recorded release expectations.reference_release picks (the newest at or below it), on what
the command observes: `reproduce` on its kwarg-conflict and attention items (the rows of the
kwarg_conflict and attention tables), `verify` and `doctor` on the kwarg-conflict probe alone
(16 forwards of the tiny presets, about two seconds). Each behaviour that differs is named with
both values (expectations.Difference); differences are findings, not failures: the exit status
stays the fixes' own.
"""

from __future__ import annotations

import sys

from . import expectations, probes


def kwarg_conflict_rows(cases: dict[str, dict]) -> dict[str, dict]:
    """{"<preset> / <task type>": the native outcome} from probes.kwarg_conflict results keyed the same way:
    the kwarg_conflict table's rows (tests/regression/test_kwarg_conflict.py pins the same values)."""
    return {case: observed["native"] for case, observed in cases.items()}


def observe_kwarg_conflict() -> dict[str, dict]:
    """The kwarg_conflict table's rows, observed now on the four tiny presets."""
    return kwarg_conflict_rows(probes.kwarg_conflict_cases())


def compare(observed: dict[str, dict[str, object]], status: dict | None = None) -> dict:
    """The release's status (expectations.release_status) and every observed behaviour that differs.

    ``observed``: {table: {key: value}}. Returns a JSON-ready dict: release, recorded, compared_with,
    tables_lacking, compared (the behaviours looked at), differences (one line each, behaviour and both
    values). ``status``: expectations.release_status(), when the caller has it already."""
    status = status or expectations.release_status()
    differences = [
        d.line()
        for table, rows in observed.items()
        for key, value in rows.items()
        if (d := expectations.compare(table, key, value)) is not None
    ]
    compared = sum(len(rows) for rows in observed.values())
    return status | {"compared": compared, "differences": differences}


def lines(result: dict) -> list[str]:
    """What a command prints about the release: nothing for a recorded release that behaves as recorded."""
    head = expectations.status_line(result)
    if head is None and not result["differences"]:
        return []
    if head is None:
        head = f"{result['release']} differs from its own recorded behaviour"
    if not result["differences"]:
        return [f"{head}: the {result['compared']} behaviours looked at are the same"]
    return [f"{head}: {len(result['differences'])} of {result['compared']} behaviours differ:"] + [
        f"  {line}" for line in result["differences"]
    ]


def announce_if_unrecorded(stream=None) -> dict | None:
    """For `verify` and `doctor`: on a release the tables do not hold, observe the kwarg-conflict probe,
    print the comparison to ``stream`` (stderr, so --json output stays clean) and return it; None on a
    recorded release (nothing observed, nothing printed)."""
    status = expectations.release_status()
    if status["recorded"]:
        return None
    result = compare({"kwarg_conflict": observe_kwarg_conflict()}, status)
    print("\n".join(lines(result)), file=stream or sys.stderr)
    return result
