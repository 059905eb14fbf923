"""A sweep over configurations and batch sizes (bench/measurement.py measures one), each memory model
checked at its predicted max batch under a real memory cap, and the reports written.

Every configuration's failure is recorded rather than raised: a GPU run is one-shot, and
one broken option must not lose the others.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from .. import compat
from ..training.run_config import TrainConfig
from . import flops, measurement
from .capacity import GIB, find_limit, memory_model, predict_max_batch
from .device import device_info, free_memory, is_oom, memory_cap
from .measurement import SequenceShape, SweepPoint, is_plain, measure, ran
from .report_files import write_reports
from .reporting import summarise

# ----------------------------------------------------------------------------- the sweep


def sweep(
    points: list[SweepPoint],
    batch_sizes=(1, 4, 8, 16),
    *,
    device="cuda",
    shape: SequenceShape = SequenceShape(),
    warmup: int = 1,
    steps: int = 3,
    progress: bool = True,
    on_point=None,
    out_of_time=None,
) -> dict:
    """Measure every point at its batch sizes (ascending); after an OOM, larger batches are not run.

    ``on_point(report)`` is called after each configuration (to save partial results).
    ``out_of_time()``, asked before each configuration: once True, the remaining ones are
    recorded as not run (a GPU session has a fixed time limit, and a run killed by it
    would lose the results of every test still to come).
    """
    device = torch.device(device)
    report = _new_report(device, shape, warmup, steps)
    plan = [(p, sorted(set(p.batch_sizes or batch_sizes))) for p in points]
    model, model_key = None, None
    with tqdm(total=sum(len(sizes) for _, sizes in plan), desc="bench", disable=not progress) as bar:
        for point, sizes in plan:
            if out_of_time is not None and out_of_time():
                report["points"].append(_not_started(point, sizes))
                bar.update(len(sizes))
                continue
            if point.build_key != model_key:
                model, model_key = None, None
                free_memory()
                model, model_key = _build_or_oom(point, device), point.build_key
            entry = _measure_point(point, sizes, model, device, bar, report, shape=shape, warmup=warmup, steps=steps)
            report["points"].append(entry)
            if point.validate_budget_gib and model is not None:
                report["validation"].append(validate_point(point, entry, device, model, shape))
            if on_point is not None:
                on_point(summarise(report))
    del model
    free_memory()
    return summarise(report)


def _new_report(device: torch.device, shape: SequenceShape, warmup: int, steps: int) -> dict:
    return {
        "schema": 1,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_info(device),
        "versions": compat.versions(),
        "sequence": asdict(shape),
        "settings": {
            "warmup_steps": warmup,
            "measured_steps": steps,
            "optimizer": f"AdamW lr=1e-4 weight decay 0.01 in train's training step "
            f"(clip {TrainConfig.max_grad_norm:g}, finite check)",
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        },
        "points": [],
        "validation": [],
    }


def _measure_point(point: SweepPoint, sizes, model, device, bar, report: dict, **measure_kwargs) -> dict:
    """One configuration at its batch sizes (ascending; none after an OOM or a failure), with its memory
    model and, for the plain custom step, its FLOPs."""
    entry = {
        "label": point.label,
        "config": asdict(point),
        "results": [],
        "image_size": compat.unwrap(model).config.vision_config.image_size if model else None,
    }
    started = time.perf_counter()  # the point's wall time, compiles included: for planning GPU runs
    for size in sizes:
        bar.set_postfix_str(f"{point.label} b={size}")
        skip = _not_run(model, entry["results"])
        entry["results"].append(
            {"batch_size": size, **skip}
            if skip
            else _measure_or_error(point, size, device, model=model, **measure_kwargs)
        )
        bar.update()
    entry["wall_s"] = time.perf_counter() - started
    entry["memory_model"] = memory_model(entry["results"], report["device"].get("total_memory_bytes"))
    if is_plain(point) and model is not None and any(ran(r) for r in entry["results"]):
        entry.update(_flops_or_error(model, measure_kwargs["shape"], device))
    return entry


def _not_started(point: SweepPoint, sizes) -> dict:
    return {
        "label": point.label,
        "config": asdict(point),
        "image_size": None,
        "wall_s": 0.0,
        "memory_model": None,
        "results": [
            {"batch_size": n, "oom": False, "error": "not run: the sweep's time budget was spent"} for n in sizes
        ],
    }


def _not_run(model, results: list[dict]) -> dict | None:
    """Why a batch size is not run (larger batches after an OOM or a failure), or None to run it."""
    if model is None:
        return {"oom": True, "error": "not run: the model did not fit"}
    if any(r["oom"] for r in results):
        return {"oom": True, "error": "not run: a smaller batch ran out of memory"}
    if any(not ran(r) for r in results):
        return {"oom": False, "error": "not run: a smaller batch failed"}
    return None


def _measure_or_error(point: SweepPoint, size: int, device, **kwargs) -> dict:
    """measure(), with an error other than out-of-memory recorded as this result instead of
    ending the sweep: a GPU run is one-shot, and one broken option must not lose the others."""
    try:
        return measure(point, size, device, **kwargs)
    except Exception as err:  # noqa: BLE001 - recorded in the report, and the GPU tests assert on it
        message = f"{type(err).__name__}: {str(err).strip()[:300]}"
    free_memory()  # outside the except block: the traceback no longer holds the step's tensors
    return {"batch_size": size, "oom": False, "error": message}


def _flops_or_error(model, shape: SequenceShape, device: torch.device) -> dict:
    """{"flops_per_sample": n}, or the error of counting them: MFU is then left out, and the
    sweep goes on (counting runs one more step, which can still run out of memory)."""
    try:
        return {"flops_per_sample": flops.step_flops_per_sample(model, shape, device)}
    except Exception as err:  # noqa: BLE001 - recorded; the measurements still count
        message = f"{type(err).__name__}: {str(err).strip()[:300]}"
    free_memory()
    return {"flops_error": message}


def _build_or_oom(point: SweepPoint, device: torch.device):
    """The built model, or None when it does not fit on the device (the sweep goes on)."""
    try:
        return measurement.build(point, device)
    except RuntimeError as err:
        if not is_oom(err):
            raise
    free_memory()
    return None


# ----------------------------------------------------------------------------- checking a prediction


def validate_prediction(
    point: SweepPoint,
    predicted: int,
    budget_bytes: int,
    *,
    device="cuda",
    model=None,
    shape: SequenceShape = SequenceShape(),
    max_probes: int = 10,
) -> dict:
    """Run at the predicted batch under a cap of ``budget_bytes`` and search for the real limit."""
    device = torch.device(device)
    with memory_cap(budget_bytes, device) as fraction:

        def fits(n: int) -> bool:
            return not measure(point, n, device, model=model, shape=shape, warmup=0, steps=1)["oom"]

        measured, exact, probes = find_limit(fits, predicted, max_probes)
    return {
        "label": point.label,
        "budget_bytes": budget_bytes,
        "budget_gib": budget_bytes / GIB,
        "memory_fraction": fraction,
        "predicted": predicted,
        "measured": measured,
        "measured_exact": exact,
        "probes": {str(k): v for k, v in sorted(probes.items())},
        "relative_error": abs(predicted - measured) / measured if measured else None,
    }


def validate_point(point: SweepPoint, entry: dict, device: torch.device, model, shape: SequenceShape) -> dict:
    """validate_prediction for a swept point, or why it could not run."""
    budget, fit = int(point.validate_budget_gib * GIB), entry["memory_model"]
    if device.type != "cuda" or fit is None:
        return {"label": point.label, "status": "skipped", "reason": f"no memory measurements on {device.type}"}
    predicted = predict_max_batch(fit["allocated"]["a"], fit["allocated"]["b"], budget)
    total = torch.cuda.get_device_properties(device).total_memory
    if not predicted or budget > total:
        return {
            "label": point.label,
            "status": "skipped",
            "reason": f"predicted batch {predicted} for {budget / GIB:g} GiB on a {total / GIB:.0f} GiB card",
        }
    try:
        result = validate_prediction(point, predicted, budget, device=device, model=model, shape=shape)
    except Exception as err:  # noqa: BLE001 - a failed check is recorded; the sweep's measurements still count
        return {"label": point.label, "status": "error", "reason": f"{type(err).__name__}: {err}"}
    reserved = predict_max_batch(fit["reserved"]["a"], fit["reserved"]["b"], budget)
    return {"status": "done", **result, "predicted_from_reserved": reserved}


def run_benchmark(
    points: list[SweepPoint],
    batch_sizes=(1, 4, 8, 16),
    *,
    device="cuda",
    shape: SequenceShape = SequenceShape(),
    report_dir=None,
    steps: int = 3,
    progress: bool = True,
    out_of_time=None,
) -> tuple[dict, dict]:
    """sweep() then write_reports(): what the CLI and the GPU tests call."""
    # reports are rewritten after every configuration, so a run cut short still leaves its numbers
    report = sweep(
        points,
        batch_sizes,
        device=device,
        shape=shape,
        steps=steps,
        progress=progress,
        on_point=lambda partial: write_reports(partial, report_dir, plot=False),
        out_of_time=out_of_time,
    )
    return report, write_reports(report, report_dir)
