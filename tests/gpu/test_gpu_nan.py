"""The seed's NaN on the full-size InstructBLIP-FlanT5-XL (random init) on a real GPU.

fp16-pure: loss finite at step 0, non-finite at every later step (CUDA's default foreach
AdamW computes in fp16, so eps=1e-8 is 0 and lora_A's first update is 0/0). fp16-amp and
bf16 (fp32 adapters): finite for 20 steps. Same code path as the CPU stability test
tests/stability/test_seed_nan.py::test_same_code_path_as_gpu_test (trials.reproduce).
Writes nan-<gpu>-<date>.json to $QFORMER_LORA_REPORT_DIR (default reports/gpu).
"""

from __future__ import annotations

import gc
import math
import re
import time
from datetime import datetime, timezone

import pytest
import torch

from qformer_lora import compat, jsonio
from qformer_lora.bench import report_files
from qformer_lora.repro import trials

pytestmark = pytest.mark.gpu

PRESET = "instructblip-flan-t5-xl"
SEED_SETTINGS = dict(lr=5e-6, max_grad_norm=0.1, warmup_steps=50)  # the seed's last configuration
RUNS = {"fp16-pure": 3, "fp16-amp": 20, "bf16": 20}  # precision -> optimizer steps


@pytest.fixture(scope="module")
def nan_report():
    report = {
        "preset": PRESET,
        "versions": compat.versions(),
        "device": torch.cuda.get_device_name(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": SEED_SETTINGS,
        "runs": {},
    }
    for precision, steps in RUNS.items():
        started = time.perf_counter()
        trace = trials.reproduce(PRESET, precision, steps=steps, device="cuda", batch_size=2, **SEED_SETTINGS)
        trace["wall_s"] = round(time.perf_counter() - started, 1)
        report["runs"][precision] = trace
        gc.collect()
        torch.cuda.empty_cache()
    out_dir = report_files.default_report_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-")
    path = out_dir / f"nan-{slug}-{report['created'][:10]}.json"
    jsonio.write(path, report, indent=1, default=str)  # strict JSON: the NaN losses are written "NaN"
    print(f"\nseed NaN report: {path}")
    return report


def test_fp16_pure_reproduces_the_seed(nan_report):
    run = nan_report["runs"]["fp16-pure"]
    assert run["finite"][0] and not any(run["finite"][1:]), f"fp16-pure losses per step: {run['losses']}"
    assert run["adapter_dtypes"] == ["float16"], run["adapter_dtypes"]
    diagnosis = run["diagnosis"]
    assert diagnosis is not None and diagnosis["step"] >= 1, diagnosis


@pytest.mark.parametrize("precision", ["fp16-amp", "bf16"])
def test_fp32_adapters_stay_finite(nan_report, precision):
    run = nan_report["runs"][precision]
    assert len(run["losses"]) == RUNS[precision] and all(map(math.isfinite, run["losses"])), (
        f"{precision} losses: {run['losses']}"
    )
    assert run["diagnosis"] is None and run["adapter_dtypes"] == ["float32"], run
