"""The prepared GPU runs, run as the GPU machine runs them but on a CPU with the tiny preset:
scripts/gpu_end_to_end.py (a fresh process, its report under --out) and
scripts/gpu_issue19.py (every phase in a fresh process; the time guard and the missing-bitsandbytes
path in this one)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qformer_lora import presets, quantization

from ..conftest import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_end_to_end.py"


@pytest.mark.long  # whole-script runs (1-2.5 min each on 2 cores): .ci/run's pytest -m long
def test_the_gpu_script_runs_on_cpu_and_writes_its_report(tmp_path):
    argv = ["--preset", "tiny-instructblip-flan-t5", "--device", "cpu", "--steps", "2", "--out", str(tmp_path)]
    # one intra-op thread, as conftest sets for the tests in this process: on a shared 2-core machine
    # two threads per process thrash (the bf16 tiny step took 6 s instead of 1.5 s)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=120, check=False, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [written] = tmp_path.glob("end-to-end-cpu-*-bf16-b64.json")
    report = json.loads(written.read_text())
    # the issue's configuration: batch 64, bf16, Q-Former LoRA r=8, 32/16/32 tokens, train's default options
    assert report["config"] | {"num_workers": None} == {
        "preset": "tiny-instructblip-flan-t5",
        "precision": "bf16",
        "batch_size": 64,
        "lora_r": 8,
        "scope": "qformer",
        "lm_checkpointing": True,
        "fused_optimizer": False,
        "compile_optimizer": False,
        "compile_mode": "default",
        "sync_every": 0,
        "deterministic": True,
        "seed": 0,
        "num_workers": None,
        "pin_memory": False,
    }
    assert report["config"]["num_workers"] == 0  # the trainer's default on a CPU (loader.default_workers)
    assert report["sequence"] == {"prompt_len": 32, "answer_len": 16, "instruction_len": 32}
    assert report["settings"] == {"warmup_steps": 2, "measured_steps": 2}
    assert (report["images"]["samples"], report["images"]["files"]) == (64 * (2 + 2), 64)
    for name in ("custom", "native"):
        for mode in ("loop", "step"):
            timing = report["results"][name][mode]
            assert timing["samples"] == 64 * 2 and timing["samples_per_s"] > 0, (name, mode, timing)
            assert len(timing["losses"]) == 4 and timing["mfu"] is None  # no 16-bit peak for a CPU
    assert report["flops_per_sample"] > 0
    assert set(report["custom_vs_native"]) == {"loop", "step"} and report["targets"]["met"] is None
    assert "deterministic_failed" not in report
    assert (tmp_path / written.name.replace(".json", ".md")).is_file()
    assert report["paragraph"] in done.stdout


# ----------------------------------------------------------------------------- scripts/gpu_issue19.py

ISSUE19 = SCRIPT.parent / "gpu_issue19.py"
TINY = "tiny-instructblip-flan-t5"


@functools.cache
def _issue19():
    """The script as a module (it puts src/ and scripts/ on sys.path itself), loaded once; registered
    before it runs, as an import would, because its dataclass looks its own module up."""
    return load_script(ISSUE19)


def _tiny_language_model_linears() -> tuple[int, int]:
    """(layers, weights) quantization.py quantizes in the tiny preset's language model, counted on meta."""
    shapes = quantization.quantizable_linears(presets.build_model(TINY, device="meta").language_model).values()
    return len(shapes), sum(o * i for o, i in shapes)


@pytest.mark.long
def test_the_issue19_script_runs_every_phase_on_cpu(tmp_path):
    argv = ["--preset", TINY, "--device", "cpu", "--steps", "2", "--out", str(tmp_path)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # as above: one intra-op thread on a shared machine
    done = subprocess.run(
        [sys.executable, str(ISSUE19), *argv], capture_output=True, text=True, timeout=600, check=False, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [written] = tmp_path.glob("issue19-cpu-*.json")
    report = json.loads(written.read_text())
    phases = ("end_to_end", "bench", "deferred", "graphs", "quantized", "auto_batch")
    assert [report[name]["status"] for name in phases] == ["done"] * 6, [report[n].get("traceback") for n in phases]
    assert list(report["phases_s"]) == list(phases) and min(report["phases_s"].values()) > 0
    assert sum(report["phases_s"].values()) <= report["wall_s"]
    e2e = report["end_to_end"]["report"]
    assert (e2e["config"]["batch_size"], e2e["settings"]) == (64, {"warmup_steps": 2, "measured_steps": 2})
    custom_step = e2e["results"]["custom"]["step"]
    # the shared bench: max(warmup 2 + steps 2, 4 quantized batches) = 4 batches of 64, as phase 1's
    assert (report["bench"]["batches"], report["bench"]["samples"]) == (4, 256)
    _check_deferred(report["deferred"], e2e)
    _check_graphs(report["graphs"], e2e)
    _check_quantized(report["quantized"], custom_step, report["bitsandbytes"].startswith("installed "))
    _check_auto_batch(report["auto_batch"], "nf4" if report["bitsandbytes"].startswith("installed ") else "none")
    assert report["targets"]["default_loop_speedup"] == e2e["custom_vs_native"]["loop"]["speedup"]
    # no memory ratio and no MFU on a CPU, and the fake batch is not the card's
    assert report["targets"]["default_2x_native_at_half_memory"] is None
    assert report["targets"]["nf4_batch_at_least_128_on_24_gib"] is None
    assert report["targets"]["auto_batch_on_budget"] == report["auto_batch"]["batch_size"]


def _check_deferred(deferred: dict, e2e: dict) -> None:
    assert deferred["options"] == {"sync_every": 10, "fused_optimizer": True, "guard": "skip"}
    for mode in ("loop", "step"):
        timing = deferred["results"][mode]
        # 4 steps (2 warm-up + 2 timed) < sync_every 10: one read, at the end; 2 x 64 samples timed
        assert (timing["samples"], timing["host_reads"], timing["actions"]) == (128, 1, {"step": 4})
        assert {"option": "fused_optimizer", "requested": True, "used": "fused", "reason": None} in (
            timing["step_options"]
        )
        assert timing["samples_per_s"] == pytest.approx(128 / timing["elapsed_s"], rel=1e-12)
        for name in ("custom", "native"):
            reference = e2e["results"][name][mode]["samples_per_s"]
            assert deferred["versus"][mode][name]["speedup"] == pytest.approx(timing["samples_per_s"] / reference)
    # the same batches in the same order from the same adapter weights: the loop's losses are the step's
    assert deferred["results"]["loop"]["losses"] == deferred["results"]["step"]["losses"]
    # before any update the deferred step's first loss is phase 1's (same seed, same build, same batch)
    assert deferred["results"]["step"]["losses"][0] == e2e["results"]["custom"]["step"]["losses"][0]


def _check_graphs(graphs: dict, e2e: dict) -> None:
    """The CUDA-graph configurations on a CPU: compiled as default (recorded), measured as deferred's are."""
    assert graphs["compile"][0]["option"] == "compile_mode" and graphs["compile"][0]["used"] == "default"
    assert [c["used"] for c in graphs["compile"][1:]] == ["compiled", "compiled"], graphs["compile"]
    eager_first = e2e["results"]["custom"]["step"]["losses"][0]
    firsts = set()
    for name, reads in (("graphs_deferred", 1), ("graphs_compiled_optimizer", None)):
        for mode in ("loop", "step"):
            timing = graphs["results"][name][mode]
            assert (timing["samples"], timing["host_reads"], timing["actions"]) == (128, reads, {"step": 4}), timing
            firsts.add(timing["losses"][0])
    # before any update: one compiled model, one batch, one adapter state, so one first loss; against eager
    # (bf16) within two bf16 roundings (2 x 2^-8): the fused kernels round to bf16 at other points
    [first] = firsts
    assert abs(first - eager_first) <= 2 * 2**-8 * abs(eager_first), (first, eager_first)
    used = {c["option"]: c["used"] for c in graphs["results"]["graphs_compiled_optimizer"]["step"]["step_options"]}
    assert used["compile_optimizer"] == "compiled"


def _check_quantized(quantized: dict, custom_step: dict, installed: bool) -> None:
    results = quantized["results"]
    unquantized = results["none"]
    assert (unquantized["status"], unquantized["quantized_layers"]) == ("done", 0)
    # same configuration, batches and starting weights as phase 1's custom step: bitwise its losses on a CPU
    assert unquantized["timing"]["losses"] == custom_step["losses"]
    if not installed:
        assert [results[m]["status"] for m in ("int8", "nf4")] == ["not installed"] * 2
        return
    layers, weights = _tiny_language_model_linears()
    total = unquantized["language_model_bytes"]
    # each quantized bf16 weight (2 B) becomes 1 B of int8 or half a byte of packed nf4 codes (uint8)
    for mode, dtype, stored in (("int8", "int8", weights), ("nf4", "uint8", weights // 2)):
        item = results[mode]
        assert (item["status"], item["quantized_layers"]) == ("done", layers)
        assert item["language_model_dtypes"][dtype] == stored
        assert item["language_model_bytes"] == total - 2 * weights + stored
        losses = item["timing"]["losses"]
        assert len(losses) == 4 and losses[0] != unquantized["timing"]["losses"][0]  # quantization changed the LM
        diffs = [abs(a - b) for a, b in zip(losses, unquantized["timing"]["losses"])]
        assert quantized["loss_vs_unquantized"][mode]["abs"] == diffs
        assert quantized["loss_vs_unquantized"][mode]["max_abs"] == max(diffs)


def _check_auto_batch(auto: dict, mode: str) -> None:
    """The fake reader's peak is 1 GiB x batch: probes 2 and 8 give the line a = 0, b = 1 GiB; the margined
    budget 0.9 x 24 GiB = 21.6 GiB puts the largest batch at floor(21.6) = 21, confirmed at 21 GiB."""
    assert (auto["status"], auto["quantize_language_model"], auto["memory_reader"]) == (
        "done",
        mode,
        f"fake: {1024**3} bytes per sample",
    )
    record = auto["record"]
    assert record["probes"] == [[2, 2 * 1024**3], [8, 8 * 1024**3]]
    assert record["fit"] == {"a_bytes": 0.0, "b_bytes_per_sample": float(1024**3)}
    assert (record["predicted"], record["confirmations"]) == (21, [[21, 21 * 1024**3]])
    assert auto["batch_size"] == record["batch_size"] == 21 and auto["target_met"] is None


def test_past_the_time_limit_every_phase_is_skipped_and_the_json_is_still_written(tmp_path):
    script = _issue19()
    assert script.main(["--preset", TINY, "--device", "cpu", "--time-limit", "0", "--out", str(tmp_path)]) == 0
    [written] = tmp_path.glob("issue19-cpu-*.json")
    report = json.loads(written.read_text())
    assert [report[name]["status"] for name in script.PHASES] == ["skipped: time"] * len(script.PHASES)
    assert list(report["phases_s"]) == list(script.PHASES)
    assert set(report["targets"].values()) == {None}
    assert report["settings"]["time_limit"] == 0


def test_without_bitsandbytes_the_quantized_items_say_so_and_auto_runs_unquantized(tmp_path, monkeypatch):
    script = _issue19()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    status = script.bitsandbytes_status()
    assert status == "not installed (ModuleNotFoundError: import of bitsandbytes halted; None in sys.modules)"
    # 2 batches of 16: 32 training samples, so the data's limit (auto_batch's cap) stays above the fake's 21
    argv = ["--preset", TINY, "--device", "cpu", "--batch-size", "16", "--steps", "1", "--warmup", "0"]
    args = script.parse_args([*argv, "--quantized-batches", "2", "--out", str(tmp_path)])
    device = torch.device("cpu")
    report = script.header(args, argv, device)
    assert report["bitsandbytes"] == status
    path = script.output_path(report, args.out)
    state = script.State(args, script.gpu_end_to_end.default_config(args), device, 0.0, str(tmp_path), report, path)
    state.started = time.perf_counter()
    for name in ("bench", "quantized", "auto_batch"):
        script.run_phase(state, name)
        assert report[name]["status"] == "done", report[name].get("traceback")
    quantized = report["quantized"]
    assert [quantized["results"][m]["status"] for m in quantization.MODES] == ["done", "not installed", "not installed"]
    assert len(quantized["results"]["none"]["timing"]["losses"]) == 2
    assert quantized["loss_vs_unquantized"] == {"int8": None, "nf4": None}
    _check_auto_batch(report["auto_batch"], "none")
    assert report["auto_batch"]["quantized_layers"] == 0
    assert json.loads(path.read_text())["auto_batch"] == json.loads(json.dumps(report["auto_batch"]))
