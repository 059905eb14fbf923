"""Summaries of a bench sweep: custom/native and step-option ratios, MFU, the held-out check,
the seed's table and the paragraph that says what it all means.

Split from bench/measurement.py so that module only measures; bench/report_files.py writes
these summaries as JSON, Markdown and PNG.
"""

from __future__ import annotations

from . import flops
from .capacity import GIB, fit_linear, predict_max_batch
from .measurement import SEED_ROWS, STEP_OPTIONS, SweepPoint, is_plain, ran

# ----------------------------------------------------------------------------- summaries


def _same_config(config: dict) -> tuple:
    return tuple(v for k, v in sorted(config.items()) if k not in ("batch_sizes", "validate_budget_gib", "forward"))


def _memory_ratio(result: dict, base: dict) -> float | None:
    """Peak allocated memory of ``result`` over ``base``; None without memory measurements (CPU)."""
    if not (result["peak_allocated_bytes"] and base["peak_allocated_bytes"]):
        return None
    return result["peak_allocated_bytes"] / base["peak_allocated_bytes"]


def compare_forwards(entries: list[dict]) -> list[dict]:
    """custom / native ratios of peak allocated memory and step time, same configuration and batch."""
    out = []
    for native in (e for e in entries if e["config"]["forward"] == "native"):
        for custom in (
            e
            for e in entries
            if e["config"]["forward"] == "custom" and _same_config(e["config"]) == _same_config(native["config"])
        ):
            ok = {r["batch_size"]: r for r in custom["results"] if ran(r)}
            for n in (r for r in native["results"] if ran(r) and r["batch_size"] in ok):
                c = ok[n["batch_size"]]
                out.append(
                    {
                        "label": custom["label"],
                        "batch_size": n["batch_size"],
                        "memory_ratio": _memory_ratio(c, n),
                        "time_ratio": c["step_time_s"] / n["step_time_s"],
                    }
                )
            break
    return out


TARGETS = {"speedup": 2.0, "memory_ratio": 0.5}  # the options' goal against the native forward


def _workload(config: dict) -> tuple:
    return config["preset"], config["family"], config["scope"], config["precision"], config["r"]


def option_table(entries: list[dict], device_name: str, batch_size: int | None = None) -> list[dict]:
    """Each step option at ``batch_size`` (default: the native point's largest, bench.OPTIONS_BATCH
    in the GPU grid) against the native forward of the same workload: samples/s and peak
    allocated memory, their ratios to native, and MFU.

    MFU uses the plain custom step's counted FLOPs per sample for every row (bench/flops.py)."""
    rows = []
    for native in (e for e in entries if e["config"]["forward"] == "native"):
        size = batch_size or max(r["batch_size"] for r in native["results"])
        base = next((r for r in native["results"] if r["batch_size"] == size and ran(r)), None)
        if base is None:
            continue
        same = [native] + [
            e
            for e in entries
            if e["config"]["forward"] == "custom" and _workload(e["config"]) == _workload(native["config"])
        ]
        flops_per_sample = next((e.get("flops_per_sample") for e in same if is_plain(SweepPoint(**e["config"]))), None)
        peak = flops.peak_flops(device_name, native["config"]["precision"])
        for entry in same:
            result = next((r for r in entry["results"] if r["batch_size"] == size), None)
            if result is None:
                continue
            options = [field for field in STEP_OPTIONS if entry["config"].get(field)]  # reports predate some
            row = {
                "label": entry["label"],
                "forward": entry["config"]["forward"],
                "options": options,
                "batch_size": size,
                "error": result.get("error") if not ran(result) else None,
                "not_used": not_used(result),
            }
            if ran(result):
                memory = _memory_ratio(result, base)
                row.update(
                    samples_per_s=result["samples_per_s"],
                    peak_allocated_gib=result["peak_allocated_gib"],
                    speedup=result["samples_per_s"] / base["samples_per_s"],
                    memory_ratio=memory,
                    flops_per_sample=flops_per_sample,
                    peak_flops=peak,
                    mfu=flops.mfu(result["samples_per_s"], flops_per_sample, peak),
                )
                row["meets_targets"] = (
                    row["speedup"] >= TARGETS["speedup"] and memory is not None and memory <= TARGETS["memory_ratio"]
                )
            rows.append(row)
    return rows


def not_used(result: dict) -> list[str]:
    """The options a result asked for but ran without, with the reason (e.g. compile
    unavailable: eager), from its step_options records; such a row measures the fallback."""
    return [
        f"{c['option']}: {c['used']} ({c['reason']})"
        for c in result.get("step_options", [])
        if c["requested"] and c["reason"] is not None
    ]


def holdout_checks(entries: list[dict]) -> list[dict]:
    """The memory model on data it was not fitted to: fit every measured batch but the largest,
    predict the largest one's peak, compare with its measured peak (>= 3 measured batches)."""
    out = []
    for entry in entries:
        ok = sorted(
            (r for r in entry["results"] if ran(r) and r.get("peak_allocated_bytes")), key=lambda r: r["batch_size"]
        )
        if len(ok) < 3:
            continue
        *fitted, held = ok
        a, b = fit_linear([r["batch_size"] for r in fitted], [r["peak_allocated_bytes"] for r in fitted])
        predicted, measured = a + b * held["batch_size"], held["peak_allocated_bytes"]
        out.append(
            {
                "label": entry["label"],
                "fitted_on": [r["batch_size"] for r in fitted],
                "batch_size": held["batch_size"],
                "predicted_gib": predicted / GIB,
                "measured_gib": measured / GIB,
                "relative_error": (predicted - measured) / measured,
            }
        )
    return out


def seed_table(entries: list[dict], budget_bytes: int = 24 * GIB, rows=SEED_ROWS) -> list[dict]:
    """The seed's "what fits" table from the fitted models: max batch in fp32 and bf16 weights."""
    table = []
    for row, preset, scope, seed in rows:
        line = {"row": row, "preset": preset, "scope": scope, "seed": seed}
        for precision in ("fp32", "bf16"):
            # compared as SweepPoints: fields added since a report was written take their defaults
            fit = next(
                (
                    e["memory_model"]
                    for e in entries
                    if e["memory_model"]
                    and SweepPoint(**e["config"] | {"batch_sizes": None, "validate_budget_gib": None})
                    == SweepPoint(preset, scope, precision)
                ),
                None,
            )
            line[precision] = (
                predict_max_batch(fit["allocated"]["a"], fit["allocated"]["b"], budget_bytes) if fit else None
            )
        table.append(line)
    return table


def paragraph(report: dict) -> str:
    """The numbers in prose; the explanation of why is for a human to add."""
    dev, seq, versions = report["device"], report["sequence"], report["versions"]
    rows = [r for r in report["seed_table"] if r["fp32"] is not None or r["bf16"] is not None]
    if not any(r.get("peak_allocated_bytes") for e in report["points"] for r in e["results"]):
        return f"No memory measurements on {dev['name']}: the 24 GiB table needs a CUDA run."
    image = report["points"][0]["image_size"]
    text = (
        f"Measured on {dev['name']} (torch {versions['torch']}, transformers {versions['transformers']}, peft "
        f"{versions['peft']}) with {seq['prompt_len']} prompt and {seq['answer_len']} answer tokens, {image}px "
        f"images, LoRA r=8 and AdamW."
    )
    if rows:
        text += (
            " A linear fit of peak allocated memory against batch size predicts, on a 24 GiB budget: "
            + "; ".join(
                f"{r['row']} batch {r['fp32']} with fp32 weights and {r['bf16']} with bf16 weights (seed: {r['seed']})"
                for r in rows
            )
            + "."
        )
    else:  # a run of other configurations (bench --preset, --options-batch)
        text += " None of the seed table's configurations was measured in this run."
    if dev.get("outside_allocator_bytes"):
        text += (
            f" Budgets are the allocator's; the CUDA context ({dev['outside_allocator_bytes'] / GIB:.2f} GiB "
            f"here) comes on top on a real card."
        )
    for v in (v for v in report["validation"] if v["status"] == "done"):
        error = f"{v['relative_error']:.1%} off" if v["relative_error"] is not None else "no batch fitted"
        text += (
            f" Under a {v['budget_gib']:g} GiB cap the prediction for {v['label']} was {v['predicted']}, "
            f"the measured limit {v['measured']} ({error}; target 5 %)."
        )
    if report.get("holdout"):
        worst = max(report["holdout"], key=lambda h: abs(h["relative_error"]))
        text += (
            f" Fitted without its largest batch, the model predicts that batch's peak within "
            f"{abs(worst['relative_error']):.1%} in every configuration (worst: {worst['label']}, batch "
            f"{worst['batch_size']} from {worst['fitted_on']})."
        )
    for c in (c for c in report["comparisons"] if c["memory_ratio"]):
        text += (
            f" The custom forward took {c['memory_ratio']:.2f}x the memory and {c['time_ratio']:.2f}x the "
            f"step time of the library's own forward ({c['label']}, batch {c['batch_size']})."
        )
    return text


def summarise(report: dict, rows=SEED_ROWS) -> dict:
    report["comparisons"] = compare_forwards(report["points"])
    report["options"] = option_table(report["points"], report["device"]["name"])
    report["holdout"] = holdout_checks(report["points"])
    report["seed_table"] = seed_table(report["points"], rows=rows)
    report["paragraph"] = paragraph(report)
    return report
