"""Named points in training and checkpoint writes where a crash test can stop a process deterministically.

The crash test (tests/unit/test_crash.py) kills ``qformer-lora train`` with SIGKILL at chosen
moments, including inside a checkpoint write, which takes milliseconds on the tiny model and
so is hit by a timer almost never. With the environment variable ``QFORMER_LORA_PAUSE_AT`` set
to ``<point>:<n>``, the n-th arrival (1-based, counted per process) at :func:`reached`
``(point)`` appends ``<point>:<n>`` and a newline to the file ``QFORMER_LORA_PAUSE_FILE`` and
then sleeps until the process is killed. Unset (always, outside that test), :func:`reached`
returns at once.

Points: ``checkpoint.adapter`` (the adapter written to the staging directory),
``checkpoint.staged`` (every file written and fsynced, before the rename),
``checkpoint.renamed`` (renamed into place, before checkpoints/ is fsynced and old ones pruned),
``checkpoint.pruning`` (between two removals of old checkpoints), ``step`` (an optimizer step
taken, before its log record) and ``eval`` (inside validation, after each batch).
"""

from __future__ import annotations

import os
import time

POINTS = ("checkpoint.adapter", "checkpoint.staged", "checkpoint.renamed", "checkpoint.pruning", "step", "eval")
_arrivals: dict[str, int] = {}


def reached(point: str) -> None:
    """Count an arrival at ``point``; pause here for good if QFORMER_LORA_PAUSE_AT names this one."""
    target = os.environ.get("QFORMER_LORA_PAUSE_AT")
    if not target:
        return
    _arrivals[point] = _arrivals.get(point, 0) + 1
    if target != f"{point}:{_arrivals[point]}":
        return
    with open(os.environ["QFORMER_LORA_PAUSE_FILE"], "a", encoding="utf-8") as f:
        f.write(f"{target}\n")
    while True:  # until the test's SIGKILL
        time.sleep(60)
