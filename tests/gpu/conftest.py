"""GPU tests: skipped with a reason without CUDA; the full-size sweep runs once per session.

The sweep is a session fixture so that every test reads the same measurements and the
reports are written once, before any assertion can stop the run (-x).
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import pytest
import torch

from qformer_lora.bench import measurement, report_files, sweep

HERE = Path(__file__).resolve().parent
RUN = {"loaded": time.perf_counter()}  # what the terminal summary prints
# The limit for the whole GPU run (8 minutes), and what must be left when the sweep
# starts a configuration: the longest one (a compiled configuration, ~100 s on the H200) and
# the tests after the sweep (~20 s). Past it the sweep records the rest as not run, so the
# run ends inside its limit with every test's result instead of being killed mid-sweep.
RUN_LIMIT_S = float(os.environ.get("QFORMER_LORA_GPU_BUDGET_S", 480))
RESERVE_S = 120


def pytest_collection_modifyitems(config, items):
    # the short NaN reproduction first: a sweep cut off by the session's time limit then
    # still leaves that result (reports are also written after every configuration)
    items.sort(key=lambda item: Path(str(item.fspath)).name != "test_gpu_nan.py")
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason=f"needs a CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}); "
        f"run scripts/gpu_sweep.sh or `nox -s gpu_tests` on a GPU machine"
    )
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def free_gpu_memory():
    # each test builds multi-GB models; the next one must start from an empty allocator
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.fixture(scope="session")
def gpu_report():
    """bench.default_points() on the full-size presets, reports written to $QFORMER_LORA_REPORT_DIR or reports/gpu."""
    start = time.perf_counter()
    report, paths = sweep.run_benchmark(
        measurement.default_points(),
        device="cuda",
        report_dir=report_files.default_report_dir(),
        out_of_time=lambda: time.perf_counter() - RUN["loaded"] > RUN_LIMIT_S - RESERVE_S,
    )
    RUN.update(sweep_s=time.perf_counter() - start, paths=paths)
    skipped = [
        e["label"] for e in report["points"] if any("time budget" in (r.get("error") or "") for r in e["results"])
    ]
    print(
        f"\ngpu sweep: {RUN['sweep_s']:.0f} s; reports: {', '.join(str(p) for p in paths.values() if p)}"
        + (f"\nnot run (time budget of {RUN_LIMIT_S:.0f} s): {skipped}" if skipped else "")
    )
    return report, paths


def pytest_terminal_summary(terminalreporter):
    if "sweep_s" not in RUN:
        return
    terminalreporter.write_sep("-", "gpu benchmark")
    terminalreporter.write_line(
        f"sweep {RUN['sweep_s']:.0f} s; gpu tests {time.perf_counter() - RUN['loaded']:.0f} s since collection"
    )
    for kind, path in RUN["paths"].items():
        terminalreporter.write_line(f"{kind}: {path or 'not written (matplotlib missing)'}")
