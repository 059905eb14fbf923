"""The custom forward equals the library's native forward wherever the native one works."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qformer_lora import compat, forward, lora, presets, synthetic

from ..conftest import TINY_PRESETS, tiny_model

# Same ops in the same order in fp32; the only difference allowed is summation order in
# the loss reduction (decoder-only loss is computed by us, not by the library).
ATOL = 1e-5


@settings(max_examples=10)
@given(
    batch_size=st.integers(1, 4),
    prompt_len=st.integers(1, 8),
    answer_len=st.integers(1, 5),
    pad_rows=st.integers(0, 4),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_custom_forward_matches_native(preset, batch_size, prompt_len, answer_len, pad_rows, seed):
    model = tiny_model(preset)
    batch = synthetic.random_batch(
        model,
        batch_size=batch_size,
        prompt_len=prompt_len,
        answer_len=answer_len,
        pad_rows=min(pad_rows, batch_size),
        seed=seed,
    )
    with torch.no_grad():
        ours = forward.custom_forward(model, batch)
        native = model(**compat.native_inputs(model, batch))
    text_len = ours.logits.shape[1] if not model.config.use_decoder_only_language_model else batch["input_ids"].shape[1]
    loss_gap = (ours.loss - native.loss).abs().item()
    logit_gap = (ours.logits[:, -text_len:] - native.logits[:, -text_len:]).abs().max().item()
    assert loss_gap <= ATOL, f"{preset}: loss {ours.loss.item():.6f} vs native {native.loss.item():.6f}"
    assert logit_gap <= ATOL, f"{preset}: logits differ by up to {logit_gap:.2e}"


def test_vision_encoder_runs_without_autograd_when_frozen():
    model = presets.build_model("tiny-instructblip-flan-t5")
    peft_model = lora.apply_lora(model, lora.LoraSpec(r=2, alpha=4))
    batch = synthetic.random_batch(model)
    image_embeds = forward.encode_images(model, batch["pixel_values"])
    assert image_embeds.grad_fn is None and not image_embeds.requires_grad
    out = forward.custom_forward(peft_model, batch)
    out.loss.backward()
    grads = [p.grad for p in lora.adapter_parameters(peft_model)]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads), "no gradient reached the Q-Former LoRA weights"
    assert all(p.grad is None for p in model.vision_model.parameters())


def test_decoder_only_labels_ignore_query_and_prompt_positions():
    """Changing a prompt-position label must not move the loss; changing an answer label must."""
    model = tiny_model("tiny-blip2-opt")
    batch = synthetic.random_batch(model, batch_size=2, prompt_len=4, answer_len=3, seed=3)
    assert (batch["labels"][:, :4] == forward.IGNORE_INDEX).all()
    with torch.no_grad():
        base = forward.custom_forward(model, batch).loss
        changed_answer = dict(batch, labels=batch["labels"].clone())
        changed_answer["labels"][0, 5] = (changed_answer["labels"][0, 5] + 1) % 500
        moved = forward.custom_forward(model, changed_answer).loss
    assert (moved - base).abs() > 1e-4
    logits = forward.custom_forward(model, batch).logits
    assert logits.shape[1] == model.config.num_query_tokens + batch["input_ids"].shape[1]


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_language_model_builds_no_kv_cache(preset, monkeypatch):
    # training never reads a KV cache; with one, T5's decoder blocks specialise on their layer
    # index and compile_frozen would compile every block separately instead of sharing code
    model = tiny_model(preset)
    lm = model.language_model
    seen = []
    real_forward = lm.forward
    monkeypatch.setattr(lm, "forward", lambda *a, **k: seen.append(k.get("use_cache")) or real_forward(*a, **k))
    with torch.no_grad():
        forward.custom_forward(model, synthetic.random_batch(model, batch_size=2))
    assert seen == [False]


def test_token_cross_entropy_defaults_to_the_mean_over_answer_tokens():
    """Uniform logits over a vocabulary of 4: every target costs ln 4. Three targets and three ignored
    positions (-100): the default reduction is their mean, ln 4; "sum" gives 3 ln 4."""
    logits = torch.zeros(2, 3, 4)
    labels = torch.tensor([[1, forward.IGNORE_INDEX, 2], [forward.IGNORE_INDEX, forward.IGNORE_INDEX, 3]])
    assert float(forward.token_cross_entropy(logits, labels)) == pytest.approx(math.log(4))
    assert float(forward.token_cross_entropy(logits, labels, "sum")) == pytest.approx(3 * math.log(4))


def test_the_forward_without_labels_gives_logits_and_the_query_path_but_no_loss():
    """A decoder-only model (OPT) runs the forward without labels (an encoder-decoder's decoder needs them):
    loss None, logits over the vocabulary, and the query path the localiser reads: the Q-Former's output at the
    query positions (batch, query tokens, Q-Former width) and its language projection (batch, query tokens,
    LM width)."""
    model = tiny_model("tiny-blip2-opt")
    batch = synthetic.random_batch(model, batch_size=2, seed=0)
    batch.pop("labels")
    with torch.no_grad():
        out = forward.custom_forward(model, batch)
    config = model.config
    queries = config.num_query_tokens
    assert out.loss is None and out.logits.shape[-1] == config.text_config.vocab_size
    assert tuple(out.query_output.shape) == (2, queries, config.qformer_config.hidden_size)
    assert tuple(out.language_model_inputs.shape) == (2, queries, config.text_config.hidden_size)


def test_padding_of_the_instruction_does_not_reach_the_query_features():
    """InstructBLIP's Q-Former reads the instruction beside the query tokens: an instruction padded with three
    pad tokens (mask 0), as a batch pads its shorter rows, gives the query features of the unpadded one."""
    model = tiny_model("tiny-instructblip-flan-t5")
    batch = synthetic.random_batch(model, batch_size=1, seed=0)
    padded = dict(batch)
    pad = torch.full((1, 3), model.config.qformer_config.pad_token_id or 0, dtype=torch.long)
    padded["qformer_input_ids"] = torch.cat([batch["qformer_input_ids"], pad], dim=1)
    padded["qformer_attention_mask"] = torch.cat([batch["qformer_attention_mask"], torch.zeros_like(pad)], dim=1)
    with torch.no_grad():
        image_embeds = forward.encode_images(model, batch)
        plain = forward.query_features(model, image_embeds, batch)
        with_padding = forward.query_features(model, image_embeds, padded)
    torch.testing.assert_close(with_padding, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fp32_projection", [False, True])
def test_a_bf16_model_with_fp32_parts_runs_in_each_part_dtype(fp32_projection):
    """transformers loads BLIP-2 in bf16 but keeps the modules its class lists in ``_keep_in_fp32_modules`` in
    fp32 (the installed release decides: 5.x keeps the Q-Former and the query tokens, 4.33 neither); a recipe
    may keep the language projection in fp32 too. The forward casts at each border: fp32 pixels to the vision
    tower's bf16, the Q-Former's output to the projection's dtype, the projected queries to the language
    model's bf16. Loss in fp32 (as the libraries compute it), logits in the language model's bf16."""
    model = copy.deepcopy(tiny_model("tiny-blip2-opt")).to(torch.bfloat16)
    kept = [name for name in type(model)._keep_in_fp32_modules or () if name in ("qformer", "query_tokens")]
    for name in kept + ["language_projection"] * fp32_projection:
        part = getattr(model, name)
        part.data = part.data.float() if isinstance(part, torch.nn.Parameter) else part.float()
    batch = synthetic.random_batch(model, batch_size=2, seed=0)
    with torch.no_grad():
        out = forward.custom_forward(model, batch)
    qformer_dtype = next(model.qformer.parameters()).dtype
    assert (out.query_output.dtype, out.language_model_inputs.dtype) == (qformer_dtype, torch.bfloat16)
    assert (out.loss.dtype, out.logits.dtype) == (torch.float32, torch.bfloat16) and torch.isfinite(out.loss)
