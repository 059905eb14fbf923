"""scripts/gpu_end_to_end.py, the prepared GPU run, run as the GPU machine runs it but on a CPU with the
tiny preset: a fresh process, its report under --out, in well under a minute."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_end_to_end.py"


@pytest.mark.slow
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
    # the configuration: batch 64, bf16, Q-Former LoRA r=8, 32/16/32 tokens, train's default options
    assert report["config"] | {"num_workers": None} == {
        "preset": "tiny-instructblip-flan-t5",
        "precision": "bf16",
        "batch_size": 64,
        "lora_r": 8,
        "scope": "qformer",
        "lm_checkpointing": True,
        "fused_optimizer": False,
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
    assert report["wall_s"] < 60 and "deterministic_failed" not in report
    assert (tmp_path / written.name.replace(".json", ".md")).is_file()
    assert report["paragraph"] in done.stdout
