"""Timing helpers shared by the CPU benchmarks that report a ratio between variants."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_medians(steps: dict[str, Callable[[], object]], rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per variant, measured interleaved (a, b, c, then b, c, a, ...) so that
    drift in a shared machine's load hits every variant alike; sequential benchmarks do not.
    The first ``warmup`` rounds are run and discarded."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:  # rotate who goes first
            started = time.perf_counter()
            steps[name]()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}
