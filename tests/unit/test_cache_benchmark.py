"""What the vision-feature cache saves in a training step on CPU: the same step (lookup or
encoder, Q-Former, language model, backward, AdamW) without the cache, with a warm
in-memory cache, and with a warm disk cache read by a fresh cache object every step
(the worst case: every image comes from a file).

    pytest tests/unit/test_cache_benchmark.py -s --benchmark-columns=median,iqr,rounds

On the tiny preset the vision encoder is small (2 layers, 226 tokens of width 32), so the
ratio here is a lower bound of the effect; on the full-size presets the frozen ViT-g is
most of the forward pass (a GPU measurement, not this one).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from qformer_lora import compat, forward, lora, presets, synthetic
from qformer_lora.training.feature_cache import FeatureCache, attach_cached_features

from ..timing import interleaved_medians

PRESET = "tiny-instructblip-flan-t5"
BATCH = 8
ROUNDS = 10  # per variant in the pytest-benchmark table
RATIO_ROUNDS = 15  # per variant in the interleaved ratio
VARIANTS = ("no-cache", "memory-cache", "disk-cache")

pytestmark = pytest.mark.long  # a benchmark, not a correctness check: run by .ci/run (pytest -m long)


@functools.cache
def _adapter_model():
    torch.manual_seed(0)
    return lora.apply_lora(presets.build_model(PRESET), lora.LoraSpec(r=8, alpha=16, dropout=0.0)).eval()


def make_step(variant: str, directory):
    """A step closure and a counter of vision-encoder runs; caches are warmed before timing."""
    model = copy.deepcopy(_adapter_model())
    batch = synthetic.random_batch(model, batch_size=BATCH, prompt_len=8, answer_len=4)
    params = lora.adapter_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    encoder_runs = []
    compat.unwrap(model).vision_model.register_forward_hook(lambda *args: encoder_runs.append(1))
    cache = None
    if variant == "memory-cache":
        cache = FeatureCache(model)
    elif variant == "disk-cache":
        FeatureCache(model, directory=directory).features(model, batch["pixel_values"])  # written once
    if cache is not None:
        cache.features(model, batch["pixel_values"])  # warm: the timed steps are all hits

    def step():
        step_cache = FeatureCache(model, directory=directory, memory=False) if variant == "disk-cache" else cache
        loss = forward.custom_forward(model, attach_cached_features(model, batch, step_cache)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    encoder_runs.clear()
    return step, encoder_runs


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_step(benchmark, variant, tmp_path):
    """The table pytest-benchmark prints; also checks that a warm cache never runs the encoder."""
    benchmark.group = f"training step, {PRESET}, batch {BATCH}"
    step, encoder_runs = make_step(variant, tmp_path)
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=2)
    ran = len(encoder_runs)
    assert (ran >= 1) if variant == "no-cache" else (ran == 0), f"{variant}: the vision encoder ran {ran} times"


def test_cache_speedup(tmp_path):
    """The ratio, measured interleaved so that load changes on a shared machine hit every
    variant alike (sequential benchmarks would not)."""
    steps = {variant: make_step(variant, tmp_path / variant)[0] for variant in VARIANTS}
    medians = interleaved_medians(steps, rounds=RATIO_ROUNDS, warmup=2)
    speedup = {variant: medians["no-cache"] / medians[variant] for variant in VARIANTS[1:]}
    print(
        f"\nfeature cache, {PRESET} batch {BATCH}, interleaved medians of {RATIO_ROUNDS} steps: "
        f"no cache {medians['no-cache'] * 1e3:.1f} ms, "
        + ", ".join(f"{v} {medians[v] * 1e3:.1f} ms ({speedup[v]:.2f}x)" for v in VARIANTS[1:])
    )
    # generous bound for a noisy shared machine (see the printed figures for the measurement)
    assert speedup["memory-cache"] > 1.0, (
        f"a warm memory cache made the step slower: {speedup['memory-cache']:.2f}x ({medians})"
    )
