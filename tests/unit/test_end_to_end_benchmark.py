"""The training loop end to end on CPU: COCO-sized JPEG files -> the trainer's data pipeline -> its
step, against the step alone on pre-collated batches and HF's forward through PEFT.

    pytest -m long tests/unit/test_end_to_end_benchmark.py -s --benchmark-columns=median,iqr,rounds

Each round is one measurement of bench/end_to_end.py (``measure``: the adapter restored, a fresh
AdamW, then STEPS steps of batch BATCH, all timed); ``samples_per_s`` in the benchmark's
extra_info is BATCH x STEPS / the round's median. On a 2-core machine the tiny preset's step is
cheaper than decoding its 640 x 480 JPEGs, so here the loop is bound by the loader: the
opposite of the H200, where a step of the full-size model is the larger cost. The GPU figures
come from scripts/gpu_end_to_end.py.
"""

from __future__ import annotations

import pytest
import torch

from qformer_lora.bench import end_to_end

PRESET = "tiny-instructblip-flan-t5"
BATCH, STEPS = 8, 4
VARIANTS = {  # name -> (loader workers, forward, mode)
    "custom-loop-0-workers": (0, "custom", "loop"),
    "custom-loop-2-workers": (2, "custom", "loop"),
    "custom-step": (0, "custom", "step"),
    "native-loop-0-workers": (0, "native", "loop"),
    "native-step": (0, "native", "step"),
}

pytestmark = pytest.mark.long  # a benchmark, not a correctness check: run by .ci/run (pytest -m long)


@pytest.fixture(scope="module")
def benches(tmp_path_factory):
    """A prepared benchmark per worker count over one set of STEPS batches of JPEGs, and those
    batches pre-collated (the same for every worker count: training/loader.py)."""
    manifest = end_to_end.write_images(tmp_path_factory.mktemp("photos"), BATCH * STEPS)
    made = {}
    for workers in (0, 2):
        [config] = end_to_end.configs(PRESET, ["fp32"], [BATCH], num_workers=workers, max_answer_tokens=16)
        made[workers] = end_to_end.prepare(config, manifest, torch.device("cpu"))
    return made, end_to_end.collated(made[0])


@pytest.mark.parametrize("variant", VARIANTS)
def test_end_to_end(benchmark, benches, variant):
    made, batches = benches
    workers, forward_name, mode = VARIANTS[variant]
    benchmark.group = f"{STEPS} training steps, {PRESET}, batch {BATCH}, from 640x480 JPEGs"
    timing = benchmark.pedantic(
        end_to_end.measure, args=(made[workers], forward_name, mode, 0, STEPS, batches), rounds=3, warmup_rounds=1
    )
    assert "error" not in timing, timing
    benchmark.extra_info["samples_per_s"] = BATCH * STEPS / benchmark.stats.stats.median
    benchmark.extra_info["loader_wait_ms_per_batch"] = timing["loader_wait_ms_per_batch"]
    # every round and variant starts from the same adapter on the same batches
    reference = end_to_end.measure(made[0], "custom", "step", 0, STEPS, batches)["losses"]
    torch.testing.assert_close(timing["losses"], reference, rtol=1e-5, atol=0)
