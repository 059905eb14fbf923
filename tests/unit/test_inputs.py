"""Inference sees exactly what training saw (inputs.Collator: the one builder of model inputs).

Two faults of one kind came before this module: ``generate`` cut prompts at 32 tokens whatever
budget the run trained with, and for decoder-only models it kept the tokenizer's default special
tokens (an appended ``</s>``), so its prompt ids differed from training's and so did the first
greedy token. The properties below hold for all four tiny presets (T5, OPT and LLaMA language
models; BLIP-2 and InstructBLIP), any instruction text, any prompt budget and any batch mix:

* the ids inference feeds (Q-Former and language model) equal the ones training fed;
* the first greedy token equals the training forward's argmax at the same position;
* a sample's first-token logits do not depend on the other samples in its batch.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import processors

from qformer_lora import data, forward, inputs, presets
from qformer_lora.data import Example
from qformer_lora.forward import IGNORE_INDEX
from qformer_lora.inputs import Collator

PRESETS = ("tiny-instructblip-flan-t5", "tiny-instructblip-vicuna", "tiny-blip2-flan-t5", "tiny-blip2-opt")
WORDS = [
    word
    for word in json.loads((data.LM_TOKENIZER_DIR / "tokenizer.json").read_text())["model"]["vocab"]
    if word.isalpha()
]
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@functools.cache
def model_and_processor(preset: str):
    model = presets.build_model(preset, seed=0).eval()
    family = presets.load_preset(preset).family
    processor = data.build_processor(family, image_size=model.config.vision_config.image_size)
    return model, processor


@functools.cache
def images() -> tuple:
    return tuple(data.ShapesDataset("val")[i].image for i in range(4))


texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=40).map(" ".join)
batches = st.lists(st.tuples(texts, texts), min_size=1, max_size=4)  # (instruction, answer) per sample


def collator_for(preset: str, max_prompt_tokens: int, max_answer_tokens: int = 8) -> Collator:
    model, processor = model_and_processor(preset)
    budgets = {"max_prompt_tokens": max_prompt_tokens, "max_answer_tokens": max_answer_tokens}
    return Collator.for_model(processor, model.config, budgets)


def examples_of(pairs) -> list[Example]:
    return [Example(images()[i % 4], text, answer, f"s{i}") for i, (text, answer) in enumerate(pairs)]


def prompt_rows(batch: dict, decoder_only: bool) -> list[list[int]]:
    """Each training row's prompt ids (decoder-only: the unmasked positions before the answer)."""
    rows = []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        keep = mask.bool() & (labels == IGNORE_INDEX) if decoder_only else mask.bool()
        rows.append(ids[keep].tolist())
    return rows


@pytest.mark.filterwarnings("ignore:sample .* truncated")
@SETTINGS
@given(preset=st.sampled_from(PRESETS), pairs=batches, budget=st.integers(3, 48))
def test_inference_feeds_the_ids_training_fed(preset, pairs, budget):
    builder = collator_for(preset, budget)
    training, inference = builder(examples_of(pairs)), builder.prompts(examples_of(pairs))
    assert prompt_rows(training, builder.decoder_only) == [
        ids[mask.bool()].tolist() for ids, mask in zip(inference["input_ids"], inference["attention_mask"])
    ]
    assert all(len(row) <= budget for row in prompt_rows(training, builder.decoder_only))
    for key in ("pixel_values", "qformer_input_ids", "qformer_attention_mask"):
        if key in training:
            assert torch.equal(training[key], inference[key]), key
    if builder.decoder_only:  # every row ends with its last prompt token: generation continues from it
        assert inference["attention_mask"][:, -1].all()


@pytest.mark.parametrize("preset", PRESETS)
def test_the_tokenizers_own_special_tokens_change_nothing(preset):
    """A tokenizer whose post-processor prepends BOS and appends EOS (as the real OPT and LLaMA
    ones add BOS) gives the same training and inference ids: the builder adds special tokens
    by its own convention only."""
    builder = collator_for(preset, 32)
    pairs = [("what colour is the shape", "red")]
    before = builder(examples_of(pairs)), builder.prompts(examples_of(pairs))
    tokenizer = builder.tokenizer
    saved = tokenizer._tokenizer.post_processor
    bos, eos = tokenizer.convert_ids_to_tokens([3, 2])  # the tiny vocabulary's bos / eos
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, 3), (eos, 2)]
    )
    try:
        assert tokenizer("what")["input_ids"][0] == 3  # the template is live
        after = builder(examples_of(pairs)), builder.prompts(examples_of(pairs))
    finally:
        tokenizer._tokenizer.post_processor = saved
    for old, new in zip(before, after):
        assert all(torch.equal(old[k], new[k]) for k in old if torch.is_tensor(old[k]))


def first_token_logits(model, batch: dict) -> torch.Tensor:
    """The logits generate() picks the first answer token from (its own first step, read back)."""
    inputs_embeds, attention_mask = forward.generation_inputs(model, batch)
    with torch.no_grad():
        out = model.language_model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            max_new_tokens=1,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.logits[0]


def training_logits_at_first_answer_token(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        logits = forward.custom_forward(model, batch).logits
    if not model.config.use_decoder_only_language_model:
        return logits[:, 0]
    text = logits[:, -batch["labels"].shape[1] :]  # the text positions, after the query tokens
    last_prompt = (batch["labels"] == IGNORE_INDEX).int().argmin(dim=1) - 1  # the answer's first position - 1
    return text[torch.arange(len(text)), last_prompt]


@pytest.mark.filterwarnings("ignore:sample .* truncated")
@SETTINGS
@given(preset=st.sampled_from(PRESETS), pairs=batches, budget=st.integers(3, 24))
def test_first_greedy_token_is_the_training_argmax(preset, pairs, budget):
    model, _ = model_and_processor(preset)
    builder = collator_for(preset, budget)
    training = training_logits_at_first_answer_token(model, builder(examples_of(pairs)))
    prompts = builder.prompts(examples_of(pairs))
    greedy = forward.generate(model, prompts, max_new_tokens=1)[:, -1]
    # the same logits up to float rounding (padding sits elsewhere: right in training, left here)
    torch.testing.assert_close(first_token_logits(model, prompts), training, rtol=1e-4, atol=1e-5)
    top2 = training.topk(2).values
    decided = (top2[:, 0] - top2[:, 1]) > 1e-4  # a near-tie may go either way within that rounding
    assert torch.equal(greedy[decided], training.argmax(-1)[decided])


@pytest.mark.filterwarnings("ignore:sample .* truncated")
@SETTINGS
@given(preset=st.sampled_from(PRESETS), pairs=st.lists(st.tuples(texts, texts), min_size=2, max_size=4))
def test_an_answer_does_not_depend_on_its_batch_mates(preset, pairs):
    model, _ = model_and_processor(preset)
    builder = collator_for(preset, 24)
    together = first_token_logits(model, builder.prompts(examples_of(pairs)))
    for i in range(len(pairs)):
        alone = first_token_logits(model, builder.prompts(examples_of(pairs)[i : i + 1]))
        torch.testing.assert_close(alone[0], together[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-instructblip-flan-t5", "tiny-blip2-opt"])
def test_truncation_warnings_name_the_sample_in_training_and_in_generation(preset):
    """A prompt over budget is cut with a warning naming the sample and the part, whichever batch
    builds it: 'sample 's1': instruction has N tokens, truncated to B' (B = budget - 1 for the T5
    prompt's eos, the whole budget for a decoder-only prompt)."""
    collator = collator_for(preset, max_prompt_tokens=4)
    long_text = " ".join(WORDS[:12])
    examples = examples_of([("short", "a"), (long_text, "b")])
    budget = 4 if collator.decoder_only else 3
    for build in (collator, collator.prompts):
        with pytest.warns(UserWarning, match=rf"^sample 's1': instruction has \d+ tokens, truncated to {budget}$"):
            build(examples)


@pytest.mark.parametrize("preset", ("tiny-instructblip-vicuna", "tiny-blip2-opt"))
def test_generation_moves_left_padding_before_the_query_tokens(preset):
    """A decoder-only row [query tokens, left padding, prompt] goes to generate() as [padding,
    query tokens, prompt], each part in its own order (forward.generation_inputs). The expected
    order is written out per row from the training mask; the rows are long (a 24-word prompt
    beside a one-word one), since torch's CPU sort keeps ties in order for short rows even
    without stable=True and reorders them from about 17 positions on."""
    model, _ = model_and_processor(preset)
    batch = collator_for(preset, 32).prompts(examples_of([(" ".join(WORDS[:24]), "red"), ("what", "red")]))
    embeds, mask, _, _ = forward.embed_inputs(model, batch)
    moved_embeds, moved_mask = forward.generation_inputs(model, batch)
    queries = model.config.num_query_tokens
    assert mask.shape[1] >= 17 and not mask[1].all(), f"no long, padded row to test: {mask.tolist()}"
    for row, m in enumerate(mask.tolist()):
        padding = [i for i in range(queries, len(m)) if m[i] == 0]
        prompt = [i for i in range(queries, len(m)) if m[i] == 1]
        expected = padding + list(range(queries)) + prompt
        assert moved_mask[row].tolist() == [0] * len(padding) + [1] * (len(m) - len(padding)), f"row {row}"
        assert torch.equal(moved_embeds[row], embeds[row, expected]), f"row {row}: not padding, queries, prompt"


def test_to_device_moves_every_tensor_and_keeps_the_rest():
    """The meta device stands in for an accelerator (the copy is visible without one): every tensor of the
    batch lands there, with its dtype and shape; the sample ids (a list) come back as they were."""
    batch = {"pixel_values": torch.zeros(2, 3), "labels": torch.ones(2, 4, dtype=torch.long), "ids": ["a", "b"]}
    moved = inputs.to_device(batch, "meta")
    assert {k: v.device.type for k, v in moved.items() if torch.is_tensor(v)} == {
        "pixel_values": "meta",
        "labels": "meta",
    }
    assert (moved["labels"].dtype, tuple(moved["pixel_values"].shape)) == (torch.long, (2, 3))
    assert moved["ids"] == ["a", "b"]
