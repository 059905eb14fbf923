"""bench.reporting on numbers: fabricated ones with the shape of a GPU report, and the committed
GPU reports. Memory is only measured on CUDA, so the memory model, the seed table, the option
ratios and MFU are checked here without running a model (tests/unit/test_bench.py runs the sweep).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from qformer_lora import compat
from qformer_lora.bench import capacity, flops, measurement, report_files, reporting

REPORTS_GPU = Path(__file__).resolve().parents[2] / "reports" / "gpu"


def _fake_entry(point: measurement.SweepPoint, a: int, b: int, sizes=(1, 4, 8), step_s: float = 0.5) -> dict:
    results = [
        {
            "batch_size": n,
            "oom": False,
            "peak_allocated_bytes": a + b * n,
            "peak_reserved_bytes": a + b * n + 2**28,
            "peak_allocated_gib": (a + b * n) / capacity.GIB,
            "peak_reserved_gib": (a + b * n + 2**28) / capacity.GIB,
            "step_time_s": step_s,
            "step_times_s": [step_s],
            "samples_per_s": n / step_s,
            "loss": 1.0,
        }
        for n in sizes
    ]
    return {
        "label": point.label,
        "config": dataclasses.asdict(point),
        "image_size": 224,
        "results": results,
        "memory_model": capacity.memory_model(results, 80 * capacity.GIB),
    }


def test_summaries_from_gpu_like_numbers(tmp_path):
    gib = capacity.GIB
    lines = {
        ("blip2-flan-t5-xl", "qformer", "fp32"): (16 * gib, gib // 4),
        ("blip2-flan-t5-xl", "qformer", "bf16"): (8 * gib, gib // 8),
        ("instructblip-flan-t5-xl", "qformer+llm", "fp32"): (16 * gib, gib // 2),
        ("instructblip-flan-t5-xl", "qformer+llm", "bf16"): (8 * gib, gib // 4),
        ("instructblip-flan-t5-xl", "qformer", "fp32"): (16 * gib, gib // 3),
        ("instructblip-flan-t5-xl", "qformer", "bf16"): (8 * gib, gib // 5),
    }
    entries = [_fake_entry(measurement.SweepPoint(*key), *ab) for key, ab in lines.items()]
    native = measurement.SweepPoint("instructblip-flan-t5-xl", "qformer", "bf16", forward="native")
    entries.append(_fake_entry(native, 8 * gib, gib // 4, sizes=(4,), step_s=0.25))
    report = {
        "created": "2026-11-27T10:00:00+00:00",
        "versions": compat.versions(),
        "sequence": dataclasses.asdict(measurement.SequenceShape()),
        "settings": {"warmup_steps": 1, "measured_steps": 3, "optimizer": "AdamW lr=1e-4"},
        "device": {
            "type": "cuda",
            "name": "NVIDIA H100 80GB HBM3",
            "total_memory_bytes": 80 * gib,
            "driver_version": "580.1",
            "cuda_runtime": "13.0",
            "outside_allocator_bytes": gib // 2,
        },
        "points": entries,
        "validation": [
            {
                "status": "done",
                "label": entries[-2]["label"],
                "budget_gib": 24,
                "predicted": 80,
                "measured": 78,
                "relative_error": 2 / 78,
                "probes": {},
            }
        ],
    }
    reporting.summarise(report)

    expected = {key: (24 * gib - a) // b for key, (a, b) in lines.items()}
    assert [(r["fp32"], r["bf16"]) for r in report["seed_table"]] == [
        (expected[(p, s, "fp32")], expected[(p, s, "bf16")]) for _, p, s, _ in measurement.SEED_ROWS
    ]
    assert entries[0]["memory_model"]["max_batch"] == {
        name: (budget - 16 * gib) // (gib // 4)
        for name, budget in {"24 GiB": 24 * gib, "40 GiB": 40 * gib, "80 GiB": 80 * gib, "this card": 80 * gib}.items()
    }
    [ratio] = report["comparisons"]
    assert ratio["batch_size"] == 4 and ratio["time_ratio"] == 2.0
    assert ratio["memory_ratio"] == pytest.approx((8 * gib + 4 * (gib // 5)) / (8 * gib + 4 * (gib // 4)))
    text = report["paragraph"]
    assert f"BLIP-2 Q-Former LoRA batch {expected[('blip2-flan-t5-xl', 'qformer', 'fp32')]} with fp32" in text
    assert "(seed: 10)" in text and "the measured limit 78 (2.6% off" in text and "0.50 GiB" in text
    paths = report_files.write_reports(report, tmp_path)
    assert paths["md"].name == "nvidia-h100-80gb-hbm3-2026-11-27.md"
    markdown = paths["md"].read_text()
    assert f"| BLIP-2 Q-Former LoRA | 24 | {expected[('blip2-flan-t5-xl', 'qformer', 'fp32')]} |" in markdown
    assert "predicted 80, measured 78" in markdown


def test_option_table_ratios_and_mfu_from_gpu_like_numbers():
    gib, preset = capacity.GIB, "instructblip-flan-t5-xl"
    native = _fake_entry(measurement.SweepPoint(preset, forward="native"), 20 * gib, 0, sizes=(64,), step_s=0.5)
    plain = _fake_entry(measurement.SweepPoint(preset), 15 * gib, 0, sizes=(64,), step_s=0.25)
    plain["flops_per_sample"] = 2e12
    cached = _fake_entry(measurement.SweepPoint(preset, feature_cache=True), 9 * gib, 0, sizes=(64,), step_s=0.125)
    other = _fake_entry(measurement.SweepPoint("blip2-flan-t5-xl"), 5 * gib, 0, sizes=(64,), step_s=0.1)
    rows = reporting.option_table([native, plain, cached, other], "NVIDIA H200")
    assert [(r["label"], r["speedup"], r["memory_ratio"], r["meets_targets"]) for r in rows] == [
        (native["label"], 1.0, 1.0, False),
        (plain["label"], 2.0, 0.75, False),
        (cached["label"], 4.0, 0.45, True),
    ]
    assert rows[2]["mfu"] == pytest.approx((64 / 0.125) * 2e12 / 989.5e12)
    assert reporting.option_table([native, plain], "a card with no listed peak")[1]["mfu"] is None


def test_peak_flops_table():
    assert flops.peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989.5e12
    assert flops.peak_flops("NVIDIA H100 PCIe", "fp16-amp") == 756e12
    assert flops.peak_flops("NVIDIA H200", "fp32") is None


def test_holdout_check_predicts_the_largest_batch_from_the_others():
    point = measurement.SweepPoint("instructblip-flan-t5-xl")
    entry = _fake_entry(point, 8 * capacity.GIB, capacity.GIB // 4, sizes=(1, 4, 8, 64))
    entry["results"][-1]["peak_allocated_bytes"] += capacity.GIB  # batch 64 needs 1 GiB more than the line says
    [check] = reporting.holdout_checks([entry, _fake_entry(point, 0, 1, sizes=(1, 2))])  # 2 batches: no check
    measured = 8 * capacity.GIB + 64 * (capacity.GIB // 4) + capacity.GIB
    assert check["fitted_on"] == [1, 4, 8] and check["batch_size"] == 64
    assert check["predicted_gib"] == pytest.approx(measured / capacity.GIB - 1)
    assert check["relative_error"] == pytest.approx(-capacity.GIB / measured)


def test_paragraph_of_a_gpu_run_without_seed_table_rows():
    # bench --options-batch measures memory, but none of the seed table's configurations: its
    # paragraph said "No memory measurements ... needs a CUDA run" on an H200
    gib = capacity.GIB
    entries = [
        _fake_entry(point, 8 * gib, gib // 4, sizes=(64,))
        for point in measurement.options_grid("instructblip-flan-t5-xl")[:2]
    ]
    report = {
        "created": "2026-11-28T10:00:00+00:00",
        "versions": compat.versions(),
        "sequence": dataclasses.asdict(measurement.SequenceShape()),
        "device": {"type": "cuda", "name": "NVIDIA H200", "total_memory_bytes": 140 * gib},
        "points": entries,
        "validation": [],
    }
    text = reporting.summarise(report)["paragraph"]
    assert text.startswith("Measured on NVIDIA H200") and "None of the seed table's configurations" in text
    # and the rest of the paragraph still follows: here the custom/native comparison at batch 64
    assert "needs a CUDA run" not in text and "took 1.00x the memory and 1.00x the step time" in text


@pytest.mark.parametrize(
    "stem",
    [
        "nvidia-h200-2026-11-27",
        "nvidia-h200-2026-11-28",
        "options/nvidia-h200-2026-11-28",
        "combo/nvidia-h200-2026-11-28",
    ],
)
def test_committed_gpu_reports_rerender_unchanged(stem, tmp_path):
    # reports written before a SweepPoint field was added must still summarise the same way
    saved = REPORTS_GPU / f"{stem}.json"
    assert report_files.main([str(saved), "--out", str(tmp_path)]) == 0
    assert (tmp_path / f"{saved.stem}.md").read_text() == (REPORTS_GPU / f"{stem}.md").read_text()
