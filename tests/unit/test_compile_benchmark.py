"""What compiling saves where a step is bound by per-op overhead, as the H200 step was
(batch 1 took 258 ms and batch 64 416 ms: the GPU mostly waited for the host).

    pytest tests/unit/test_compile_benchmark.py -s --benchmark-columns=median,iqr,rounds

The model has InstructBLIP-FlanT5-XL's depth (39 ViT-g layers, 12 Q-Former layers, 24 + 24
T5 blocks) at width 64, so almost all of a CPU step is the per-op cost that compiling
removes, not arithmetic. Variants: eager; the frozen vision / LM blocks compiled
(``compile_frozen_blocks``); those and the Q-Former compiled; and eager and all compiled with
LM activation checkpointing (the option that halves memory, whose recompute compiling should
pay for). The ratio is a CPU proxy for the host-bound GPU step, not a GPU figure (inductor
writes C++ here, triton there).
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch

from qformer_lora import compat, forward, lora, presets, synthetic
from qformer_lora.training import step_options

from ..timing import interleaved_medians

BATCH = 2
ROUNDS = 10  # per variant in the pytest-benchmark table
RATIO_ROUNDS = 15  # per variant in the interleaved ratio
VARIANTS = ("eager", "compiled-frozen", "compiled-all", "eager+lm-ckpt", "compiled-all+lm-ckpt")

pytestmark = pytest.mark.long  # compiles a 100-layer model: run by .ci/run (pytest -m long)


def narrow_deep_preset() -> presets.Preset:
    full = presets.load_preset("instructblip-flan-t5-xl")
    config = copy.deepcopy(full.config)
    config["vision_config"].update(hidden_size=64, intermediate_size=128, num_attention_heads=4, image_size=56)
    config["qformer_config"].update(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, encoder_hidden_size=64, vocab_size=1000
    )
    config["text_config"].update(d_model=64, d_ff=128, num_heads=4, d_kv=16)
    return dataclasses.replace(full, name="instructblip-flan-t5-xl depth, width 64", config=config)


@functools.cache
def _adapter_model():
    return lora.apply_lora(presets.build_model(narrow_deep_preset()), lora.LoraSpec(r=8, alpha=16)).eval()


def make_step(variant: str):
    """(step closure, loss of its first call); compiled variants compile in their first call."""
    model = copy.deepcopy(_adapter_model())
    batch = synthetic.random_batch(model, batch_size=BATCH, prompt_len=16, answer_len=8, instruction_len=16)
    params = lora.adapter_parameters(model)

    def step():
        loss = forward.custom_forward(model, batch).loss
        loss.backward()
        for p in params:
            p.grad = None
        return loss.detach()

    compiling, _, checkpointing = variant.partition("+")
    choices = [step_options.set_lm_checkpointing(model, True)] if checkpointing else []
    if compiling != "eager":
        choices.append(step_options.compile_frozen_blocks(model, True, dynamic=False))
    if compiling == "compiled-all":
        choices.append(step_options.maybe_compile(compat.unwrap(model).qformer, True, dynamic=False)[1])
    first_loss = step()  # compiles; then the choices are known to hold
    assert all(c.used in ("compiled", "on") for c in choices), choices
    return step, first_loss


@pytest.fixture(scope="module")
def steps():
    reason = compat.torch_compile_unavailable_reason("cpu")
    if reason is not None:
        pytest.skip(f"torch.compile cannot run here: {reason}")
    made = {variant: make_step(variant) for variant in VARIANTS}
    eager_loss = made["eager"][1]
    for variant, (_, loss) in made.items():  # the same step: compiling must not change the loss
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=0, msg=variant)
    return {variant: step for variant, (step, _) in made.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_overhead_bound_step(benchmark, steps, variant):
    benchmark.group = f"forward + backward, InstructBLIP-FlanT5-XL depth at width 64, batch {BATCH}"
    benchmark.pedantic(steps[variant], rounds=ROUNDS, iterations=1, warmup_rounds=2)


def test_compile_speedup(steps):
    """Interleaved, so load changes on a shared machine hit every variant alike."""
    medians = interleaved_medians(steps, rounds=RATIO_ROUNDS, warmup=2)
    speedup = {variant: medians["eager"] / medians[variant] for variant in VARIANTS[1:]}
    print(
        f"\ncompile, overhead-bound CPU step, interleaved medians of {RATIO_ROUNDS}: eager "
        f"{medians['eager'] * 1e3:.1f} ms, "
        + ", ".join(f"{v} {medians[v] * 1e3:.1f} ms ({speedup[v]:.2f}x)" for v in VARIANTS[1:])
        + f"; with LM checkpointing, compiling all: {medians['eager+lm-ckpt'] / medians['compiled-all+lm-ckpt']:.2f}x"
    )
    # generous bounds for a noisy shared machine (the printed figures are the measurement)
    assert speedup["compiled-all"] > 1.0, f"compiling made the step slower: {speedup} ({medians})"
    assert medians["compiled-all+lm-ckpt"] < medians["eager+lm-ckpt"], (
        f"compiling made the checkpointed step slower: {medians}"
    )
