"""bench.py on CPU with tiny presets: the same sweep, memory model and report code the GPU run uses.

Memory is only measured on CUDA, so the memory-model summaries are checked on
fabricated numbers with the shape of a GPU report; everything else runs for real.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from fractions import Fraction

import pytest
import torch
from hypothesis import given, strategies as st

from qformer_lora import bench, bench_report, compat, lora

TINY_IB, TINY_B2 = "tiny-instructblip-flan-t5", "tiny-blip2-flan-t5"
SHAPE = bench.SequenceShape(prompt_len=6, answer_len=3, instruction_len=4)
OOM_MESSAGE = "CUDA out of memory. Tried to allocate 2.00 GiB"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
    # spin-waiting made each step ~20x slower (4 s instead of 0.2 s).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    """One real run_benchmark (what the CLI and GPU tests call): custom and native forward on a
    tiny preset, 2 batch sizes, a validation request; counts model builds."""
    builds, out_dir = [], tmp_path_factory.mktemp("reports")
    real_build = bench.build
    points = [bench.SweepPoint(TINY_IB, precision="fp32", validate_budget_gib=24),
              bench.SweepPoint(TINY_IB, precision="fp32", forward="native")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "build", lambda point, device: builds.append(point) or real_build(point, device))
        report, paths = bench.run_benchmark(points, (2, 1), device="cpu", shape=SHAPE, steps=3,
                                            report_dir=out_dir, progress=False)
    assert paths["json"].parent == out_dir and json.loads(paths["json"].read_text()) == json.loads(json.dumps(report))
    return report, builds


def oom_from(batch_size: int, monkeypatch):
    """Make train_step raise the CUDA OOM error for batches >= ``batch_size``; returns the batches run."""
    real_step, seen = bench.train_step, []

    def step(state):
        seen.append(state.batch_size)
        if state.batch_size >= batch_size:
            raise torch.cuda.OutOfMemoryError(OOM_MESSAGE)
        return real_step(state)

    monkeypatch.setattr(bench, "train_step", step)
    return seen


# ----------------------------------------------------------------------------- the sweep on CPU

def test_sweep_report_is_well_formed(cpu_report):
    report, builds = cpu_report
    assert len(builds) == 1, f"custom and native share one configuration, so one model; built {len(builds)}"
    assert report["device"] == {"type": "cpu", "name": "cpu", "total_memory_bytes": None, "driver_version": None}
    assert report["versions"] == compat.versions()
    assert report["sequence"] == {"prompt_len": 6, "answer_len": 3, "instruction_len": 4}
    assert [e["label"] for e in report["points"]] == [f"{TINY_IB} qformer fp32 custom", f"{TINY_IB} qformer fp32 native"]
    assert report["settings"]["measured_steps"] == 3
    for entry in report["points"]:
        assert entry["image_size"] == 30  # from the tiny preset
        assert [r["batch_size"] for r in entry["results"]] == [1, 2], "batch sizes run ascending"
        for r in entry["results"]:
            assert r["oom"] is False and len(r["step_times_s"]) == 3, r
            assert r["step_time_s"] > 0 and r["samples_per_s"] == pytest.approx(r["batch_size"] / r["step_time_s"])
            assert math.isfinite(r["loss"]) and r["peak_allocated_bytes"] is None and r["peak_reserved_gib"] is None
        assert entry["memory_model"] is None, "no memory model without memory measurements"
    assert [(c["batch_size"], c["memory_ratio"]) for c in report["comparisons"]] == [(1, None), (2, None)]
    assert all(c["time_ratio"] > 0 for c in report["comparisons"])
    assert all(r["fp32"] is None and r["bf16"] is None for r in report["seed_table"])
    assert "needs a CUDA run" in report["paragraph"]
    assert report["validation"] == [{"label": f"{TINY_IB} qformer fp32 custom", "status": "skipped",
                                     "reason": "no memory measurements on cpu"}]


def test_report_writers(cpu_report, tmp_path):
    report, _ = cpu_report
    paths = bench_report.write_reports(report, tmp_path / "gpu")
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(report))
    text = paths["md"].read_text()
    assert f"| {TINY_IB} qformer fp32 native | 30 | 2 |" in text and report["paragraph"] in text
    assert paths["json"].name == f"cpu-{report['created'][:10]}.json"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert paths["png"] is None
    else:
        assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    expected = {p.name for p in paths.values() if p is not None}
    assert {p.name for p in (tmp_path / "gpu").iterdir()} == expected, "atomic writes leave no temp files"


def test_png_is_skipped_with_a_note_without_matplotlib(cpu_report, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    paths = bench_report.write_reports(cpu_report[0], tmp_path)
    assert paths["png"] is None and not list(tmp_path.glob("*.png"))
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_oom_is_recorded_and_the_sweep_goes_on(monkeypatch):
    seen = oom_from(2, monkeypatch)
    real_build = bench.build

    def build(point, device):
        if point.family == "blip2":
            raise torch.cuda.OutOfMemoryError(OOM_MESSAGE)
        return real_build(point, device)

    monkeypatch.setattr(bench, "build", build)
    points = [bench.SweepPoint(TINY_IB, precision="fp32"), bench.SweepPoint(TINY_IB, family="blip2"),
              bench.SweepPoint(TINY_IB, precision="fp32", forward="native")]
    report = bench.sweep(points, (1, 2, 3), device="cpu", shape=SHAPE, warmup=0, steps=1, progress=False)
    custom, too_big, native = ([(r["batch_size"], r["oom"]) for r in e["results"]] for e in report["points"])
    assert custom == native == [(1, False), (2, True), (3, True)]
    assert too_big == [(1, True), (2, True), (3, True)]
    assert report["points"][0]["results"][1]["error"] == OOM_MESSAGE
    assert report["points"][0]["results"][2]["error"] == "not run: a smaller batch ran out of memory"
    assert report["points"][1]["results"][0]["error"] == "not run: the model did not fit"
    assert seen == [1, 2, 1, 2], "batch 3 is not run once batch 2 ran out of memory"


def test_other_errors_are_not_swallowed(monkeypatch):
    def broken(state):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(bench, "train_step", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        bench.measure(bench.SweepPoint(TINY_IB, precision="fp32"), 1, "cpu", shape=SHAPE)


def test_bf16_with_lm_checkpointing_trains_fp32_adapters():
    point = bench.SweepPoint(TINY_B2, precision="bf16", lm_activation_checkpointing=True)
    model = bench.build(point, "cpu")
    assert compat.unwrap(model).language_model.get_input_embeddings().weight.dtype == torch.bfloat16
    adapters = lora.adapter_parameters(model)
    assert {p.dtype for p in adapters} == {torch.float32}
    before = [p.detach().clone() for p in adapters]
    result = bench.measure(point, 2, "cpu", model=model, shape=SHAPE, warmup=0, steps=1)
    assert result["oom"] is False and math.isfinite(result["loss"]) and result["skipped_steps"] is None, result
    assert bench.lm_checkpointing_active(model)
    changed = sum(not torch.equal(b, p) for b, p in zip(before, adapters))
    assert changed > 0, "no adapter moved: gradients did not reach the Q-Former through the checkpointed LM"
    bench.measure(dataclasses.replace(point, lm_activation_checkpointing=False), 1, "cpu", model=model,
                  shape=SHAPE, warmup=0, steps=1)
    assert not bench.lm_checkpointing_active(model), "checkpointing is switched per configuration"


def test_fp16_amp_scales_the_loss_and_counts_skipped_steps():
    point = bench.SweepPoint(TINY_B2, precision="fp16-amp")
    model = bench.build(point, "cpu")
    assert compat.unwrap(model).language_model.get_input_embeddings().weight.dtype == torch.float32
    state = bench.prepare_step(model, point, 2, "cpu", SHAPE)
    adapters = lora.adapter_parameters(model)
    before = [p.detach().clone() for p in adapters]
    losses = [bench.train_step(state) for _ in range(3)]
    assert all(math.isfinite(x) for x in losses), losses
    # GradScaler halves its scale (initially 2**16) on every step it skips for inf/NaN gradients
    assert state.scaler.get_scale() == 2.0 ** (16 - state.skipped_steps), (state.scaler.get_scale(), state.skipped_steps)
    moved = any(not torch.equal(b, p) for b, p in zip(before, adapters))
    assert moved == (state.skipped_steps < 3), "adapters move exactly when a step was not skipped"


def test_family_override_builds_the_other_family():
    model = bench.build(bench.SweepPoint(TINY_IB, precision="fp32", family="blip2"), "cpu")
    assert type(compat.unwrap(model)).__name__ == "Blip2ForConditionalGeneration"


def test_sweep_point_rejects_unknown_values():
    with pytest.raises(ValueError, match=r"precision is 'fp16'; expected one of \['bf16', 'fp16-amp', 'fp32'\]"):
        bench.SweepPoint(TINY_IB, precision="fp16")
    with pytest.raises(ValueError, match="forward"):
        bench.SweepPoint(TINY_IB, forward="peft")
    with pytest.raises(ValueError, match="batch_sizes"):
        bench.SweepPoint(TINY_IB, batch_sizes=(0, 4))


def test_default_grid_covers_the_seed_table_and_shares_builds():
    points = bench.default_points()
    for _, preset, scope, _ in bench.SEED_ROWS:
        for precision in ("fp32", "bf16"):
            matches = [p for p in points if dataclasses.replace(p, batch_sizes=None, validate_budget_gib=None)
                       == bench.SweepPoint(preset, scope, precision)]
            assert len(matches) == 1 and len(matches[0].batch_sizes) >= 2, (preset, scope, precision)
    assert sum(p.validate_budget_gib is not None for p in points) == 1
    keys = [p.build_key for p in points]
    runs = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
    assert len(runs) == len(set(runs)) == 6, "points sharing a model must be consecutive (6 builds)"
    assert any(p.forward == "native" for p in points) and any(p.lm_activation_checkpointing for p in points)


def test_the_gpu_grid_runs_end_to_end_on_tiny_presets(tmp_path):
    # the same call the GPU session fixture makes, on the tiny variants, one step per point
    points = bench.default_points(TINY_IB, TINY_B2)
    report, paths = bench.run_benchmark(points, device="cpu", shape=SHAPE, steps=1, report_dir=tmp_path,
                                        progress=False)
    assert [e["label"] for e in report["points"]] == [p.label for p in points]
    for entry, point in zip(report["points"], points):
        assert [(r["batch_size"], r["oom"]) for r in entry["results"]] == [(n, False) for n in point.batch_sizes]
        assert all(math.isfinite(r["loss"]) for r in entry["results"]), entry["label"]
        assert all((r["skipped_steps"] is None) == (point.precision != "fp16-amp") for r in entry["results"])
    assert [c["batch_size"] for c in report["comparisons"]] == [8]
    assert [v["status"] for v in report["validation"]] == ["skipped"]
    assert paths["md"].is_file() and paths["json"].is_file()


def test_grid_orders_points_to_share_models():
    points = bench.grid(TINY_IB, scopes=("qformer", "qformer+llm"), precisions=("fp32", "bf16", "fp16-amp"),
                        forwards=("custom", "native"), validate_budget_gib=24)
    assert len(points) == 12 and points[0].validate_budget_gib == 24
    assert all(p.validate_budget_gib is None for p in points[1:])
    keys = [p.build_key for p in points]
    assert len([k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]) == len(set(keys)) == 4
    with pytest.raises(ValueError, match="precision"):
        bench.grid(TINY_IB, precisions=("int8",))


# ----------------------------------------------------------------------------- memory model

def test_fit_linear_recovers_exact_coefficients():
    a, b = 7_516_192_768, 201_326_592
    assert bench.fit_linear([1, 4, 8, 16], [a + b * n for n in (1, 4, 8, 16)]) == (a, b)
    assert bench.fit_linear([2, 3], [10.5, 12.0]) == (7.5, 1.5)
    with pytest.raises(ValueError, match="2 distinct batch sizes"):
        bench.fit_linear([4, 4], [1, 2])


@given(a=st.floats(0, 2e11), b=st.floats(1, 2e10), budget=st.integers(0, 2 ** 38))
def test_predict_max_batch_is_the_largest_batch_within_budget(a, b, budget):
    n = bench.predict_max_batch(a, b, budget)
    a, b = Fraction(a), Fraction(b)
    assert n >= 0
    assert n == 0 or a + b * n <= budget, f"batch {n} needs {float(a + b * n)} > {budget}"
    assert a + b * (n + 1) > budget, f"batch {n + 1} would also fit"


@given(a=st.integers(0, 2 ** 36), b=st.integers(1, 2 ** 32), sizes=st.sets(st.integers(1, 512), min_size=2, max_size=6),
       budget=st.integers(0, 2 ** 38))
def test_fit_then_predict_matches_the_true_line(a, b, sizes, budget):
    sizes = sorted(sizes)
    fitted = bench.fit_linear(sizes, [a + b * n for n in sizes])
    assert fitted == (a, b)
    assert bench.predict_max_batch(*fitted, budget) == max(0, (budget - a) // b)


def test_predict_max_batch_without_growth_is_none():
    assert bench.predict_max_batch(1e9, 0.0, 24 * bench.GIB) is None


@given(limit=st.integers(0, 300), start=st.integers(1, 300), max_probes=st.integers(1, 30))
def test_find_limit_never_overshoots_and_is_exact_with_enough_probes(limit, start, max_probes):
    found, exact, probes = bench.find_limit(lambda n: n <= limit, start, max_probes)
    assert found <= limit and len(probes) <= max_probes
    assert all(fits == (n <= limit) for n, fits in probes.items())
    if exact:
        assert found == limit
    enough = bench.find_limit(lambda n: n <= limit, start, 40)
    assert enough[:2] == (limit, True), enough


@pytest.mark.parametrize("predicted", [3, 4, 9])
def test_validate_prediction_finds_the_real_limit(predicted, monkeypatch):
    oom_from(5, monkeypatch)  # batches of 5 and more "run out of memory"
    point = bench.SweepPoint(TINY_IB, precision="fp32")
    model = bench.build(point, "cpu")
    result = bench.validate_prediction(point, predicted, 24 * bench.GIB, device="cpu", model=model, shape=SHAPE)
    assert (result["measured"], result["measured_exact"]) == (4, True), result["probes"]
    assert result["relative_error"] == pytest.approx(abs(predicted - 4) / 4)
    assert result["memory_fraction"] is None  # no cap outside CUDA
    assert result["probes"]["5"] is False


def _fake_entry(point: bench.SweepPoint, a: int, b: int, sizes=(1, 4, 8), step_s: float = 0.5) -> dict:
    results = [{"batch_size": n, "oom": False, "peak_allocated_bytes": a + b * n, "peak_reserved_bytes": a + b * n + 2 ** 28,
                "peak_allocated_gib": (a + b * n) / bench.GIB, "peak_reserved_gib": (a + b * n + 2 ** 28) / bench.GIB,
                "step_time_s": step_s, "step_times_s": [step_s], "samples_per_s": n / step_s, "loss": 1.0}
               for n in sizes]
    return {"label": point.label, "config": dataclasses.asdict(point), "image_size": 224, "results": results,
            "memory_model": bench.memory_model(results, 80 * bench.GIB)}


def test_summaries_from_gpu_like_numbers(tmp_path):
    gib = bench.GIB
    lines = {("blip2-flan-t5-xl", "qformer", "fp32"): (16 * gib, gib // 4),
             ("blip2-flan-t5-xl", "qformer", "bf16"): (8 * gib, gib // 8),
             ("instructblip-flan-t5-xl", "qformer+llm", "fp32"): (16 * gib, gib // 2),
             ("instructblip-flan-t5-xl", "qformer+llm", "bf16"): (8 * gib, gib // 4),
             ("instructblip-flan-t5-xl", "qformer", "fp32"): (16 * gib, gib // 3),
             ("instructblip-flan-t5-xl", "qformer", "bf16"): (8 * gib, gib // 5)}
    entries = [_fake_entry(bench.SweepPoint(*key), *ab) for key, ab in lines.items()]
    native = bench.SweepPoint("instructblip-flan-t5-xl", "qformer", "bf16", forward="native")
    entries.append(_fake_entry(native, 8 * gib, gib // 4, sizes=(4,), step_s=0.25))
    report = {"created": "2026-11-27T10:00:00+00:00", "versions": compat.versions(), "sequence": dataclasses.asdict(
        bench.SequenceShape()), "settings": {"warmup_steps": 1, "measured_steps": 3, "optimizer": "AdamW lr=1e-4"},
        "device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "total_memory_bytes": 80 * gib,
                   "driver_version": "580.1", "cuda_runtime": "13.0", "outside_allocator_bytes": gib // 2},
        "points": entries, "validation": [{"status": "done", "label": entries[-2]["label"], "budget_gib": 24,
                                            "predicted": 80, "measured": 78, "relative_error": 2 / 78, "probes": {}}]}
    bench_report.summarise(report)

    expected = {key: (24 * gib - a) // b for key, (a, b) in lines.items()}
    assert [(r["fp32"], r["bf16"]) for r in report["seed_table"]] == [
        (expected[(p, s, "fp32")], expected[(p, s, "bf16")]) for _, p, s, _ in bench.SEED_ROWS]
    assert entries[0]["memory_model"]["max_batch"] == {
        name: (budget - 16 * gib) // (gib // 4) for name, budget in
        {"24 GiB": 24 * gib, "40 GiB": 40 * gib, "80 GiB": 80 * gib, "this card": 80 * gib}.items()}
    [ratio] = report["comparisons"]
    assert ratio["batch_size"] == 4 and ratio["time_ratio"] == 2.0
    assert ratio["memory_ratio"] == pytest.approx((8 * gib + 4 * (gib // 5)) / (8 * gib + 4 * (gib // 4)))
    text = report["paragraph"]
    assert f"BLIP-2 Q-Former LoRA batch {expected[('blip2-flan-t5-xl', 'qformer', 'fp32')]} with fp32" in text
    assert "(seed: 10)" in text and "the measured limit 78 (2.6% off" in text and "0.50 GiB" in text
    paths = bench_report.write_reports(report, tmp_path)
    assert paths["md"].name == "nvidia-h100-80gb-hbm3-2026-11-27.md"
    markdown = paths["md"].read_text()
    assert f"| BLIP-2 Q-Former LoRA | 24 | {expected[('blip2-flan-t5-xl', 'qformer', 'fp32')]} |" in markdown
    assert "predicted 80, measured 78" in markdown
