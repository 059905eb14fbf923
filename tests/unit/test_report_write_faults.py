"""Faults while writing reports (issue 18, item 5; the checkpoint, log, lock and feature-cache write
points are in test_write_faults.py): ENOSPC, a read-only directory or a permission error while a
report is written gives writes.WriteError naming the path, and the previous report stays whole."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from qformer_lora import writes
from qformer_lora.inference import evaluate
from qformer_lora.repro import reproduce

FAULTS = {"ENOSPC": errno.ENOSPC, "EROFS": errno.EROFS, "EACCES": errno.EACCES}
# the committed reproduction report, as a real one to rewrite
REPORT = json.loads((Path(__file__).resolve().parents[2] / "reports" / "REPRODUCTION.json").read_text(encoding="utf-8"))
EVALUATION = {"model": "m", "data": "d", "task": "qa", "samples": 1, "created": "then", "metrics": {"exact_match": 0.5}}


def reproduction(out: Path, report: dict) -> list[Path]:
    return list(reproduce.write(report, out))


def evaluation(out: Path, document: dict) -> list[Path]:
    written = evaluate.write(out / "evaluation", document, [{"id": "a", "prediction": "red"}])
    return sorted(written.iterdir())


WRITERS = {  # report writer -> (write it, a first version, a second version)
    "reproduce": (reproduction, REPORT, REPORT | {"all_fixes_hold": False}),
    "evaluate": (evaluation, EVALUATION, EVALUATION | {"metrics": {"exact_match": 0.75}}),
}


def contents(paths: list[Path]) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in paths}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_failed_report_write_is_named_and_keeps_the_previous_report(tmp_path, monkeypatch, writer, fault):
    write, first, second = WRITERS[writer]
    before = contents(write(tmp_path, first))
    assert before

    def refuse(src, dst):  # the last step of every atomic write: the rename into place
        raise OSError(FAULTS[fault], os.strerror(FAULTS[fault]), str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(writes.WriteError) as caught:
        write(tmp_path, second)
    monkeypatch.undo()
    assert str(tmp_path) in str(caught.value) and os.strerror(FAULTS[fault]) in str(caught.value)
    paths = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert contents(paths) == before, f"{writer}: the previous report changed or a temporary file was left"


def test_atomic_write_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "report.md"
    target.write_text("old", encoding="utf-8")
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    with pytest.raises(writes.WriteError, match=r"report\.md: cannot write the figure: No space"):
        writes.atomic(target, "new", "the figure")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.md"]
