"""bench/measurement.py and bench/sweep.py on CPU with tiny presets: the same sweep, memory model and report
code the GPU run uses.

Memory is only measured on CUDA, so the memory-model summaries are checked on fabricated
numbers with the shape of a GPU report in test_bench_report.py; everything here runs for real.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import pytest
import torch

from qformer_lora import compat, lora
from qformer_lora.bench import capacity, device, flops, measurement, report_files, sweep
from qformer_lora.training import step_options

TINY_IB, TINY_B2 = "tiny-instructblip-flan-t5", "tiny-blip2-flan-t5"
SHAPE = measurement.SequenceShape(prompt_len=6, answer_len=3, instruction_len=4)
OOM_MESSAGE = "CUDA out of memory. Tried to allocate 2.00 GiB"


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    """One real run_benchmark (what the CLI and GPU tests call): custom and native forward on a
    tiny preset, 2 batch sizes, a validation request; counts model builds."""
    builds, out_dir = [], tmp_path_factory.mktemp("reports")
    real_build = measurement.build
    points = [
        measurement.SweepPoint(TINY_IB, precision="fp32", validate_budget_gib=24),
        measurement.SweepPoint(TINY_IB, precision="fp32", forward="native"),
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(measurement, "build", lambda point, device: builds.append(point) or real_build(point, device))
        report, paths = sweep.run_benchmark(
            points, (2, 1), device="cpu", shape=SHAPE, steps=3, report_dir=out_dir, progress=False
        )
    assert paths["json"].parent == out_dir and json.loads(paths["json"].read_text()) == json.loads(json.dumps(report))
    return report, builds


def oom_from(batch_size: int, monkeypatch):
    """Make train_step raise the CUDA OOM error for batches >= ``batch_size``; returns the batches run."""
    real_step, seen = measurement.timed_step, []

    def step(state):
        seen.append(state.batch_size)
        if state.batch_size >= batch_size:
            raise torch.cuda.OutOfMemoryError(OOM_MESSAGE)
        return real_step(state)

    monkeypatch.setattr(measurement, "timed_step", step)
    return seen


# ----------------------------------------------------------------------------- the sweep on CPU


def test_sweep_report_is_well_formed(cpu_report):
    report, builds = cpu_report
    assert len(builds) == 1, f"custom and native share one configuration, so one model; built {len(builds)}"
    assert report["device"] == {"type": "cpu", "name": "cpu", "total_memory_bytes": None, "driver_version": None}
    assert report["versions"] == compat.versions()
    assert report["sequence"] == {"prompt_len": 6, "answer_len": 3, "instruction_len": 4}
    assert [e["label"] for e in report["points"]] == [
        f"{TINY_IB} qformer fp32 custom",
        f"{TINY_IB} qformer fp32 native",
    ]
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
    assert report["validation"] == [
        {"label": f"{TINY_IB} qformer fp32 custom", "status": "skipped", "reason": "no memory measurements on cpu"}
    ]


def test_report_writers(cpu_report, tmp_path):
    report, _ = cpu_report
    paths = report_files.write_reports(report, tmp_path / "gpu")
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(report))
    text = paths["md"].read_text()
    assert f"| {TINY_IB} qformer fp32 native | 30 | 2 |" in text and report["paragraph"] in text
    assert paths["json"].name == f"cpu-{report['created'][:10]}.json"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert paths["figures"] is None
    else:
        # a CPU run measures no memory (no memory figure) and no seed-table row; throughput and the
        # custom-vs-native options it has
        assert set(paths["figures"]) == {"throughput", "options"}
        assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths["figures"].values())
    expected = {paths["json"].name, paths["md"].name} | {p.name for p in (paths["figures"] or {}).values()}
    assert {p.name for p in (tmp_path / "gpu").iterdir()} == expected, "atomic writes leave no temp files"


def test_png_is_skipped_with_a_note_without_matplotlib(cpu_report, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    paths = report_files.write_reports(cpu_report[0], tmp_path)
    assert paths["figures"] is None and not list(tmp_path.glob("*.png"))
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_oom_is_recorded_and_the_sweep_goes_on(monkeypatch):
    seen = oom_from(2, monkeypatch)
    real_build = measurement.build

    def build(point, device):
        if point.family == "blip2":
            raise torch.cuda.OutOfMemoryError(OOM_MESSAGE)
        return real_build(point, device)

    monkeypatch.setattr(measurement, "build", build)
    points = [
        measurement.SweepPoint(TINY_IB, precision="fp32"),
        measurement.SweepPoint(TINY_IB, family="blip2"),
        measurement.SweepPoint(TINY_IB, precision="fp32", forward="native"),
    ]
    report = sweep.sweep(points, (1, 2, 3), device="cpu", shape=SHAPE, warmup=0, steps=1, progress=False)
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

    monkeypatch.setattr(measurement, "timed_step", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        measurement.measure(measurement.SweepPoint(TINY_IB, precision="fp32"), 1, "cpu", shape=SHAPE)


def test_a_failing_configuration_is_recorded_and_the_sweep_goes_on(monkeypatch):
    real_step = measurement.timed_step

    def step(state):
        if state.point.fused_optimizer and state.batch_size >= 2:
            raise RuntimeError("fused kernel missing")
        return real_step(state)

    monkeypatch.setattr(measurement, "timed_step", step)
    points = [
        measurement.SweepPoint(TINY_IB, precision="fp32", fused_optimizer=True),
        measurement.SweepPoint(TINY_IB, precision="fp32"),
    ]
    report = sweep.sweep(points, (1, 2, 3), device="cpu", shape=SHAPE, warmup=0, steps=1, progress=False)
    failed, plain = ([(r["batch_size"], measurement.ran(r)) for r in e["results"]] for e in report["points"])
    assert failed == [(1, True), (2, False), (3, False)] and plain == [(1, True), (2, True), (3, True)]
    assert report["points"][0]["results"][1]["error"] == "RuntimeError: fused kernel missing"
    assert report["points"][0]["results"][2]["error"] == "not run: a smaller batch failed"
    assert not any(r["oom"] for r in report["points"][0]["results"])


def test_a_compile_that_falls_back_to_eager_says_so_in_its_row(monkeypatch, tmp_path):
    # where compile is unavailable the option runs eager: its row must not pass for compiled
    monkeypatch.setattr(compat, "torch_compile_unavailable_reason", lambda device_type: "no triton here")
    native, compiled = (
        measurement.SweepPoint(TINY_IB, precision="fp32", forward="native", batch_sizes=(2,)),
        measurement.SweepPoint(TINY_IB, precision="fp32", compile_qformer=True, compile_frozen=True, batch_sizes=(2,)),
    )
    with pytest.warns(UserWarning, match="no triton here"):
        report, paths = sweep.run_benchmark(
            [native, compiled], device="cpu", shape=SHAPE, steps=1, report_dir=tmp_path, progress=False
        )
    [result] = report["points"][1]["results"]
    assert [(c["option"], c["used"]) for c in result["step_options"] if c["option"].startswith("compile")] == [
        ("compile", "eager"),
        ("compile_frozen", "eager"),
    ]
    rows = {row["label"]: row for row in report["options"]}
    assert rows[native.label]["not_used"] == []
    assert rows[compiled.label]["not_used"] == [
        "compile: eager (no triton here)",
        "compile_frozen: eager (no triton here)",
    ]
    assert f"{compiled.label} (not used: compile: eager (no triton here); " in paths["md"].read_text()


def test_a_failed_flop_count_is_recorded_and_the_sweep_goes_on(monkeypatch):
    def broken(model, shape, device):
        raise RuntimeError("FlopCounterMode fell over")

    monkeypatch.setattr(flops, "step_flops_per_sample", broken)
    points = [
        measurement.SweepPoint(TINY_IB, precision="fp32", batch_sizes=(1,)),
        measurement.SweepPoint(TINY_IB, precision="fp32", forward="native", batch_sizes=(1,)),
    ]
    report = sweep.sweep(points, device="cpu", shape=SHAPE, warmup=0, steps=1, progress=False)
    plain, native = report["points"]
    assert plain["flops_error"] == "RuntimeError: FlopCounterMode fell over" and "flops_per_sample" not in plain
    assert measurement.ran(native["results"][0]), "the sweep stopped at the failed count"
    assert all(row["flops_per_sample"] is None and row["mfu"] is None for row in report["options"])


def test_bf16_with_lm_checkpointing_trains_fp32_adapters():
    point = measurement.SweepPoint(TINY_B2, precision="bf16", lm_activation_checkpointing=True)
    model = measurement.build(point, "cpu")
    assert compat.unwrap(model).language_model.get_input_embeddings().weight.dtype == torch.bfloat16
    adapters = lora.adapter_parameters(model)
    assert {p.dtype for p in adapters} == {torch.float32}
    before = [p.detach().clone() for p in adapters]
    result = measurement.measure(point, 2, "cpu", model=model, shape=SHAPE, warmup=0, steps=1)
    assert result["oom"] is False and math.isfinite(result["loss"]) and result["skipped_steps"] is None, result
    assert step_options.lm_checkpointing_active(model)
    changed = sum(not torch.equal(b, p) for b, p in zip(before, adapters))
    assert changed > 0, "no adapter moved: gradients did not reach the Q-Former through the checkpointed LM"
    measurement.measure(
        dataclasses.replace(point, lm_activation_checkpointing=False),
        1,
        "cpu",
        model=model,
        shape=SHAPE,
        warmup=0,
        steps=1,
    )
    assert not step_options.lm_checkpointing_active(model), "checkpointing is switched per configuration"


def test_fp16_amp_scales_the_loss_and_counts_skipped_steps():
    point = measurement.SweepPoint(TINY_B2, precision="fp16-amp")
    model = measurement.build(point, "cpu")
    assert compat.unwrap(model).language_model.get_input_embeddings().weight.dtype == torch.float32
    state = measurement.prepare_step(model, point, 2, "cpu", SHAPE)
    adapters = lora.adapter_parameters(model)
    before = [p.detach().clone() for p in adapters]
    losses = [measurement.timed_step(state) for _ in range(3)]
    assert all(math.isfinite(x) for x in losses), losses
    # GradScaler halves its scale (initially 2**16) on every step it skips for inf/NaN gradients
    assert state.parts.scaler.get_scale() == 2.0 ** (16 - state.skipped_steps), (
        state.parts.scaler.get_scale(),
        state.skipped_steps,
    )
    moved = any(not torch.equal(b, p) for b, p in zip(before, adapters))
    assert moved == (state.skipped_steps < 3), "adapters move exactly when a step was not skipped"


def test_family_override_builds_the_other_family():
    model = measurement.build(measurement.SweepPoint(TINY_IB, precision="fp32", family="blip2"), "cpu")
    assert type(compat.unwrap(model)).__name__ == "Blip2ForConditionalGeneration"


def test_sweep_point_rejects_unknown_values():
    with pytest.raises(ValueError, match=r"precision is 'fp16'; expected one of \['bf16', 'fp16-amp', 'fp32'\]"):
        measurement.SweepPoint(TINY_IB, precision="fp16")
    with pytest.raises(ValueError, match="forward"):
        measurement.SweepPoint(TINY_IB, forward="peft")
    with pytest.raises(ValueError, match="batch_sizes"):
        measurement.SweepPoint(TINY_IB, batch_sizes=(0, 4))


def test_default_grid_covers_the_seed_table_and_shares_builds():
    points = measurement.default_points()
    for _, preset, scope, _ in measurement.SEED_ROWS:
        for precision in ("fp32", "bf16"):
            matches = [
                p
                for p in points
                if dataclasses.replace(p, batch_sizes=None, validate_budget_gib=None)
                == measurement.SweepPoint(preset, scope, precision)
            ]
            assert len(matches) == 1 and len(matches[0].batch_sizes) >= 2, (preset, scope, precision)
    assert sum(p.validate_budget_gib is not None for p in points) == 1
    keys = [p.build_key for p in points]
    runs = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
    assert len(runs) == len(set(runs)) == 8, "points sharing a model must be consecutive (8 builds)"
    assert any(p.forward == "native" for p in points) and any(p.lm_activation_checkpointing for p in points)


@pytest.mark.long  # compiles two builds of the grid (about 30 s on 2 cores)
def test_the_gpu_grid_runs_end_to_end_on_tiny_presets(tmp_path):
    # the same call the GPU session fixture makes, on the tiny variants, one step per point
    points = measurement.default_points(TINY_IB, TINY_B2, options_batch=4)  # batch 64 adds nothing on CPU but time
    report, paths = sweep.run_benchmark(points, device="cpu", shape=SHAPE, steps=1, report_dir=tmp_path, progress=False)
    assert [e["label"] for e in report["points"]] == [p.label for p in points]
    for entry, point in zip(report["points"], points):
        assert [(r["batch_size"], r["oom"]) for r in entry["results"]] == [(n, False) for n in point.batch_sizes]
        assert all(math.isfinite(r["loss"]) for r in entry["results"]), entry["label"]
        assert all((r["skipped_steps"] is None) == (point.precision != "fp16-amp") for r in entry["results"])
    assert [c["batch_size"] for c in report["comparisons"]] == [4]
    assert [(o["forward"], o["options"], o["error"]) for o in report["options"]] == [
        ("native", [], None),
        ("custom", [], None),
        ("custom", ["lm_activation_checkpointing"], None),
        ("custom", ["feature_cache"], None),
        ("custom", ["fused_optimizer"], None),
        ("custom", ["feature_cache", "fused_optimizer", "compile_frozen"], None),
        ("custom", ["feature_cache", "fused_optimizer", "compile_qformer", "compile_frozen"], None),
        (
            "custom",
            ["lm_activation_checkpointing", "feature_cache", "fused_optimizer", "compile_qformer", "compile_frozen"],
            None,
        ),
    ]
    # no memory and no 16-bit peak on a CPU: the ratios of time only
    assert all(o["memory_ratio"] is None and o["mfu"] is None and o["speedup"] > 0 for o in report["options"])
    assert all(o["flops_per_sample"] > 0 for o in report["options"])
    assert [v["status"] for v in report["validation"]] == ["skipped"]
    assert paths["md"].is_file() and paths["json"].is_file()


def test_sweep_out_of_time_records_the_rest_as_not_run(tmp_path):
    points = [
        measurement.SweepPoint(TINY_IB, batch_sizes=(1,)),
        measurement.SweepPoint(TINY_IB, "qformer+llm", batch_sizes=(1, 2)),
    ]
    asked = iter([False, True])
    report, paths = sweep.run_benchmark(
        points, device="cpu", shape=SHAPE, steps=1, report_dir=tmp_path, progress=False, out_of_time=lambda: next(asked)
    )
    first, second = report["points"]
    assert [r["oom"] for r in first["results"]] == [False] and measurement.ran(first["results"][0])
    assert second["label"] == points[1].label and second["memory_model"] is None
    assert [(r["batch_size"], r["error"]) for r in second["results"]] == [
        (1, "not run: the sweep's time budget was spent"),
        (2, "not run: the sweep's time budget was spent"),
    ]
    assert paths["md"].is_file()


def test_grid_orders_points_to_share_models():
    points = measurement.grid(
        TINY_IB,
        scopes=("qformer", "qformer+llm"),
        precisions=("fp32", "bf16", "fp16-amp"),
        forwards=("custom", "native"),
        validate_budget_gib=24,
    )
    assert len(points) == 12 and points[0].validate_budget_gib == 24
    assert all(p.validate_budget_gib is None for p in points[1:])
    keys = [p.build_key for p in points]
    assert len([k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]) == len(set(keys)) == 4
    with pytest.raises(ValueError, match="precision"):
        measurement.grid(TINY_IB, precisions=("int8",))


# ----------------------------------------------------------------------------- memory model (measured)


@pytest.mark.parametrize("predicted", [3, 4, 9])
def test_validate_prediction_finds_the_real_limit(predicted, monkeypatch):
    oom_from(5, monkeypatch)  # batches of 5 and more "run out of memory"
    point = measurement.SweepPoint(TINY_IB, precision="fp32")
    model = measurement.build(point, "cpu")
    result = sweep.validate_prediction(point, predicted, 24 * capacity.GIB, device="cpu", model=model, shape=SHAPE)
    assert (result["measured"], result["measured_exact"]) == (4, True), result["probes"]
    assert result["relative_error"] == pytest.approx(abs(predicted - 4) / 4)
    assert result["memory_fraction"] is None  # no cap outside CUDA
    assert result["probes"]["5"] is False


def test_flops_per_sample_is_counted_and_independent_of_batch_size():
    point = measurement.SweepPoint(TINY_IB, precision="fp32")
    model = measurement.build(point, "cpu")
    per_sample = {n: flops.step_flops_per_sample(model, SHAPE, "cpu", batch_size=n) for n in (1, 3)}
    assert per_sample[1] == per_sample[3] > 0
    longer = flops.step_flops_per_sample(model, dataclasses.replace(SHAPE, prompt_len=12), "cpu")
    assert longer > per_sample[1], "a longer prompt is more language-model work"
    # a floor: the frozen vision encoder's linear layers run once per patch token (+ CLS)
    vision = compat.unwrap(model).vision_model
    linear = sum(m.weight.numel() for m in vision.modules() if isinstance(m, torch.nn.Linear))
    config = vision.config
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    assert per_sample[1] > 2 * linear * tokens
    assert all(p.grad is None for p in lora.adapter_parameters(model)), "counting leaves no gradients behind"


def test_bench_report_rerenders_a_saved_report(cpu_report, tmp_path, capsys):
    report, _ = cpu_report
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(report))
    assert report_files.main([str(saved), "--out", str(tmp_path / "out")]) == 0
    written = {p.name.removeprefix(f"{report_files.report_stem(report)}-").removesuffix(".png"): p.name
               for p in (tmp_path / "out").glob("*.png")}  # fmt: skip
    assert (tmp_path / "out" / f"{report_files.report_stem(report)}.md").read_text() == report_files.markdown(
        report, written
    )
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        report_files.main([str(tmp_path / "broken.json")])
    assert exit_info.value.code == 2 and "broken.json: not a bench report" in capsys.readouterr().err


def test_memory_cap_names_the_device_index(monkeypatch):
    # torch.cuda.set_per_process_memory_fraction refuses a bare "cuda" device (seen on the H200 run)
    calls = []
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": 80 * capacity.GIB})
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda, "set_per_process_memory_fraction", lambda fraction, device: calls.append((fraction, device))
    )
    monkeypatch.setattr(device, "free_memory", lambda collect=True: None)
    with device.memory_cap(24 * capacity.GIB, torch.device("cuda")) as fraction:
        assert fraction == 24 / 80
    with device.memory_cap(40 * capacity.GIB, torch.device("cuda", 1)):
        pass
    assert calls == [(0.3, 0), (1.0, 0), (0.5, 1), (1.0, 1)]


def test_grid_turns_step_options_on():
    [point] = measurement.grid(TINY_IB, compile_qformer=True, feature_cache=True)
    assert point.compile_qformer and point.feature_cache and not point.fused_optimizer and not point.compile_frozen
    [point] = measurement.grid(TINY_IB, compile_frozen=True)
    assert point.compile_frozen and point.label.endswith("custom compiled-frozen")
    assert point.build_key != measurement.SweepPoint(TINY_IB).build_key, "compiled blocks change the model"
    with pytest.raises(ValueError, match="custom forward only"):
        measurement.SweepPoint(TINY_IB, forward="native", compile_frozen=True)
