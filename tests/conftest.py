"""Shared test set-up: hypothesis profile, tiny models built once per session."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from qformer_lora import presets

# Tiny models are dominated by per-op overhead: one thread is faster than two, and on a
# shared 2-core machine two threads per process thrash (measured 0.04 s vs 5.7 s a step).
torch.set_num_threads(1)

# Tiny CPU models are fast but not microsecond-fast; a deadline would only add flakes.
settings.register_profile("default", deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")

TINY_PRESETS = ("tiny-instructblip-flan-t5", "tiny-instructblip-vicuna", "tiny-blip2-flan-t5", "tiny-blip2-opt")
FULL_PRESETS = ("instructblip-flan-t5-xl", "instructblip-vicuna-7b", "blip2-flan-t5-xl", "blip2-opt-2.7b")


def pytest_collection_modifyitems(config, items):
    """Under mutmut (nox -s mutation), run a mutant's tests fastest first.

    mutmut hands pytest the tests that reach the mutated function in set order and stops at the first
    failure (-x), so a killed mutant costs whatever ran before its killing test. Ordering by the
    durations mutmut recorded in its stats run (mutants/mutmut-stats.json, the working directory of
    its runs) makes that the quickest killing test in most cases; verdicts do not change, only time.
    """
    if "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", ""):
        return
    stats = Path("mutmut-stats.json")
    if not stats.is_file():
        return
    duration = json.loads(stats.read_text(encoding="utf-8")).get("duration_by_test", {})
    items.sort(key=lambda item: duration.get(item.nodeid, float("inf")))


def load_script(path: Path):
    """A script outside the package (scripts/*.py, noxfile.py) as a module, registered in sys.modules before
    it runs, as an import would register it (a dataclass looks its own module up there)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@functools.cache
def tiny_model(name: str, seed: int = 0):
    """A tiny fp32 CPU model; shared read-only across tests (do not train or wrap it)."""
    return presets.build_model(name, seed=seed)


@pytest.fixture(params=TINY_PRESETS)
def tiny_preset(request) -> str:
    return request.param


def check_against_release(table: str, key: str, observed, rel_tol: float | None = None):
    """Assert ``observed`` equals the value pinned for the installed release, or, for a release the table
    does not hold, for the recorded release it is compared with (expectations.reference_release); the
    failure names the behaviour and both releases. With QFORMER_LORA_RECORD=1 the observation is written to
    src/qformer_lora/resources/expectations/<table>.json instead; review that diff before committing it.
    """
    from qformer_lora.repro import expectations

    if expectations.RECORD:
        expectations.record(table, key, observed)
        return
    difference = expectations.compare(table, key, observed)
    if difference is not None and rel_tol is not None and isinstance(difference.pinned, list):
        difference = None if _close(observed, difference.pinned, rel_tol) else difference
    _log_behaviour(table, key, difference)
    if difference is None:
        return
    raise AssertionError(
        f"behaviour differs: {difference.line()}"
        + (f" (beyond rel_tol={rel_tol})" if rel_tol is not None else "")
        + ("" if difference.against == difference.release else f" [{difference.release} is not recorded in {table}]")
    )


def _close(observed, pinned, rel_tol: float) -> bool:
    """Golden curves: lists of floats equal within ``rel_tol``, elementwise."""
    import math

    return len(observed) == len(pinned) and all(math.isclose(o, p, rel_tol=rel_tol) for o, p in zip(observed, pinned))


def _log_behaviour(table: str, key: str, difference) -> None:
    """With QFORMER_LORA_BEHAVIOUR_LOG=<file> (nox -s newest), one JSON line per compared behaviour: same or
    different, and the line naming both values; the session's report is written from it."""
    path = os.environ.get("QFORMER_LORA_BEHAVIOUR_LOG")
    if not path:
        return
    from qformer_lora.repro import expectations

    against = difference.against if difference else expectations.reference_release(expectations.releases_of(table))[0]
    entry = {"table": table, "key": key, "release": expectations.release_key(), "against": against,
             "same": difference is None, "line": difference.line() if difference else None,
             "environment_changes": expectations.environment_changes(
                 expectations.pinned_environment(table, against, key), expectations.environment())}  # fmt: skip
    with open(path, "a", encoding="utf-8") as log:
        log.write(json.dumps(entry, default=str) + "\n")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line naming the expectation tables that lack the installed release, and what it was compared with."""
    from qformer_lora.repro import expectations

    status = expectations.release_status()
    if status["comparisons"]:
        terminalreporter.write_line(
            f"expectation tables without {status['release']}: "
            + "; ".join(f"{', '.join(c['tables'])} (compared with {c['release']})" for c in status["comparisons"])
            + " - record it with QFORMER_LORA_RECORD=1 on a clean checkout"
        )
