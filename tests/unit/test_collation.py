"""Fixture tokenizers, processors built offline, and collation (qformer_lora.inputs.Collator).

Split from test_data.py, which keeps manifests, images and the fixture generators.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from qformer_lora import inputs
from qformer_lora.data import (
    RESOURCES_DIR,
    SHAPES_DIR,
    Example,
    ShapesDataset,
    build_processor,
    read_manifest,
)
from qformer_lora.forward import IGNORE_INDEX
from qformer_lora.inputs import Collator

# Tiny presets use image_token_index 511 (see src/qformer_lora/resources/tokenizers/README.md).
IMAGE_TOKEN_INDEX = 511
CONFIGS = [(f, d) for f in ("instructblip", "blip2") for d in (False, True)]


@functools.cache
def processor(family: str):
    # Cached at module level rather than as a pytest fixture so the
    # hypothesis test can use it too (function-scoped fixtures + @given clash).
    return build_processor(family, image_size=32)


def tiny_image() -> Image.Image:
    return Image.new("RGB", (32, 32), (10, 200, 10))


# --------------------------------------------------------------------------- tokenizers & processors


def test_fixture_tokenizers_ids_and_post_processors():
    lm, qf = processor("instructblip").tokenizer, processor("instructblip").qformer_tokenizer
    assert (lm.pad_token_id, lm.eos_token_id, lm.unk_token_id, lm.bos_token_id) == (0, 1, 2, 3)
    assert lm.convert_tokens_to_ids("<image>") == 4
    assert [qf.convert_tokens_to_ids(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    assert len(lm) <= 500 and len(qf) <= 500, f"vocab sizes {len(lm)}, {len(qf)} exceed 500"
    ids = lm("What colour is the shape?")["input_ids"]
    assert ids[-1] == lm.eos_token_id and lm.unk_token_id not in ids, ids
    qids = qf("What colour is the shape?")["input_ids"]
    assert qids[0] == qf.cls_token_id and qids[-1] == qf.sep_token_id and qf.unk_token_id not in qids, qids
    # every fixture word tokenizes without <unk> in both tokenizers
    for s in read_manifest(SHAPES_DIR / "train.jsonl", SHAPES_DIR):
        for tok in (lm, qf):
            assert tok.unk_token_id not in tok(s.instruction + " " + s.answer)["input_ids"], (s.id, type(tok))


def test_processor_construction_does_not_grow_vocab():
    # The processors add "<image>" if missing; the fixture reserves it at id 4.
    for family in ("instructblip", "blip2"):
        tok = processor(family).tokenizer
        assert len(tok) < IMAGE_TOKEN_INDEX, f"{family}: LM vocab {len(tok)} reaches image_token_index"
        assert len(tok) == len(
            json.loads((RESOURCES_DIR / "tokenizers/lm/tokenizer.json").read_text())["model"]["vocab"]
        )


def test_processor_types_and_image_size():
    from transformers import Blip2Processor, InstructBlipProcessor

    assert isinstance(processor("instructblip"), InstructBlipProcessor)
    assert isinstance(processor("blip2"), Blip2Processor)
    out = processor("blip2").image_processor(tiny_image(), return_tensors="pt")["pixel_values"]
    assert tuple(out.shape) == (1, 3, 32, 32), out.shape


def test_build_processor_from_local_checkpoint(tmp_path: Path):
    processor("instructblip").save_pretrained(tmp_path / "ckpt")
    loaded = build_processor("instructblip", checkpoint_dir=tmp_path / "ckpt", image_size=999)
    assert loaded.image_processor.size["height"] == 32, "checkpoint's image size must win over image_size"
    assert len(loaded.qformer_tokenizer) == len(processor("instructblip").qformer_tokenizer)


def test_build_processor_errors(tmp_path: Path):
    with pytest.raises(ValueError, match="family"):
        build_processor("llava")
    with pytest.raises(FileNotFoundError, match="missing"):
        build_processor("blip2", checkpoint_dir=tmp_path / "missing")


# --------------------------------------------------------------------------- collation


def shapes_batch(n: int = 5) -> list[Example]:
    ds = ShapesDataset("train")
    return [ds[i] for i in range(n)]


@pytest.mark.parametrize("family,decoder_only", CONFIGS)
def test_collate_keys_shapes_and_padding(family: str, decoder_only: bool):
    proc = processor(family)
    # One longer instruction and answer so that every field really needs padding.
    extra = Example(tiny_image(), "Is there a red circle above the blue square?", "yes red circle", "extra")
    batch = Collator(proc, family, decoder_only)([*shapes_batch(4), extra])
    expected = {"pixel_values", "input_ids", "attention_mask", "labels", "ids"}
    if family == "instructblip":
        expected |= {"qformer_input_ids", "qformer_attention_mask"}
    assert set(batch) == expected, f"keys differ: extra {set(batch) - expected}, missing {expected - set(batch)}"

    pv = batch["pixel_values"]
    assert tuple(pv.shape) == (5, 3, 32, 32) and pv.dtype == torch.float32, (pv.shape, pv.dtype)
    assert batch["ids"] == [f"train-{i // 3:03d}-{i % 3}" for i in range(4)] + ["extra"]

    pairs = [("input_ids", "attention_mask", proc.tokenizer.pad_token_id)]
    if family == "instructblip":
        pairs.append(("qformer_input_ids", "qformer_attention_mask", proc.qformer_tokenizer.pad_token_id))
    for ids_key, mask_key, pad in pairs:
        ids, mask = batch[ids_key], batch[mask_key]
        assert ids.shape == mask.shape and ids.dtype == torch.long, (ids_key, ids.shape, mask.shape)
        # pad never occurs as a real token, so the mask must be exactly "not pad"
        assert torch.equal(mask, (ids != pad).long()), f"{mask_key} disagrees with non-pad positions of {ids_key}"
        # right padding: every row is 1...1 0...0
        assert torch.equal(mask, mask.sort(dim=1, descending=True).values), f"{mask_key} is not right-padded"
        assert mask[:, 0].all(), f"{ids_key} has an empty row"

    labels = batch["labels"]
    assert labels.dtype == torch.long
    eos = proc.tokenizer.eos_token_id
    for row_labels in labels:
        targets = row_labels[row_labels != IGNORE_INDEX]
        assert targets[-1] == eos, f"targets {targets.tolist()} do not end with eos {eos}"
        assert not (row_labels == proc.tokenizer.pad_token_id).any(), "pad id leaked into labels (should be -100)"
        # -100 only as a prefix (decoder-only prompt) and/or suffix (padding): targets are contiguous
        pos = (row_labels != IGNORE_INDEX).nonzero().flatten()
        assert pos.tolist() == list(range(pos[0], pos[-1] + 1)), f"targets not contiguous: {row_labels.tolist()}"

    if decoder_only:
        assert labels.shape == batch["input_ids"].shape
    else:
        assert labels.shape[0] == 5 and labels.shape[1] <= 16
        assert (batch["input_ids"].gather(1, batch["attention_mask"].sum(1, keepdim=True) - 1) == eos).all(), (
            "encoder prompts must end with eos"
        )
    # no image/placeholder tokens, and all ids fit the tiny presets' vocab
    assert not (batch["input_ids"] == proc.tokenizer.convert_tokens_to_ids("<image>")).any()
    assert int(batch["input_ids"].max()) < IMAGE_TOKEN_INDEX


def test_decoder_only_label_alignment():
    proc = processor("blip2")
    examples = shapes_batch(4)
    batch = Collator(proc, "blip2", decoder_only=True)(examples)
    tok = proc.tokenizer
    for i, ex in enumerate(examples):
        prompt = tok(ex.instruction, add_special_tokens=False)["input_ids"]
        answer = tok(ex.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(prompt) + len(answer)
        row_ids, row_labels = batch["input_ids"][i], batch["labels"][i]
        assert row_ids[:n].tolist() == prompt + answer, f"row {i}: input_ids {row_ids.tolist()} != prompt+answer+eos"
        assert (row_labels[: len(prompt)] == IGNORE_INDEX).all(), (
            f"row {i}: prompt positions not -100: {row_labels.tolist()}"
        )
        assert row_labels[len(prompt) : n].tolist() == row_ids[len(prompt) : n].tolist() == answer
        assert (row_labels[n:] == IGNORE_INDEX).all() and (row_ids[n:] == tok.pad_token_id).all()


def test_encoder_decoder_labels_are_answer_plus_eos():
    proc = processor("instructblip")
    examples = shapes_batch(3)
    batch = Collator(proc, "instructblip", decoder_only=False)(examples)
    for i, ex in enumerate(examples):
        want = proc.tokenizer(ex.answer)["input_ids"]  # T5-style tokenizer appends eos itself
        got = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX].tolist()
        assert got == want, f"row {i}: labels {got}, expected {want}"
        q = batch["qformer_input_ids"][i][batch["qformer_attention_mask"][i].bool()].tolist()
        assert q == proc.qformer_tokenizer(ex.instruction)["input_ids"], f"row {i}: qformer ids {q}"


@pytest.mark.parametrize("family,decoder_only", CONFIGS)
def test_overlong_text_truncated_with_warning(family: str, decoder_only: bool):
    long_instruction = " ".join(["what"] * 50)
    long_answer = " ".join(["red"] * 30)
    collate = Collator(processor(family), family, decoder_only, max_prompt_tokens=10, max_answer_tokens=4)
    with pytest.warns(UserWarning, match="sample 'too-long'") as record:
        batch = collate([Example(tiny_image(), long_instruction, long_answer, "too-long"), shapes_batch(1)[0]])
    messages = " | ".join(str(w.message) for w in record)
    assert "instruction" in messages and "answer" in messages, messages
    assert not any("train-000-0" in str(w.message) for w in record), f"short sample warned: {messages}"

    n_prompt = 10  # max_prompt_tokens; for encoder-decoder it includes the closing eos
    targets = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]
    assert len(targets) == 4 and targets[-1] == processor(family).tokenizer.eos_token_id, targets.tolist()
    if decoder_only:
        assert int(batch["attention_mask"][0].sum()) == n_prompt + 4
    else:
        assert int(batch["attention_mask"][0].sum()) == n_prompt
        assert batch["input_ids"][0, n_prompt - 1] == processor(family).tokenizer.eos_token_id, "eos lost in truncation"
    if family == "instructblip":
        q = batch["qformer_input_ids"][0]
        assert (
            int(batch["qformer_attention_mask"][0].sum()) == 10
            and q[9] == processor(family).qformer_tokenizer.sep_token_id
        )


def test_dataloader_integration():
    ds = ShapesDataset("val")
    loader = torch.utils.data.DataLoader(ds, batch_size=16, collate_fn=Collator(processor("blip2"), "blip2", True))
    batches = list(loader)
    assert [b["pixel_values"].shape[0] for b in batches] == [16, 16, 16]
    assert sum(len(b["ids"]) for b in batches) == len(ds) == 48


LM_WORDS = sorted(
    t for t in json.loads((RESOURCES_DIR / "tokenizers/lm/tokenizer.json").read_text())["model"]["vocab"] if t.isalpha()
)
words = st.lists(st.sampled_from(LM_WORDS), min_size=1, max_size=8).map(" ".join)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=st.sampled_from(CONFIGS), pairs=st.lists(st.tuples(words, words), min_size=1, max_size=4))
def test_collation_round_trips(config, pairs):
    family, decoder_only = config
    proc = processor(family)
    tok = proc.tokenizer
    examples = [Example(tiny_image(), q, a, f"h{i}") for i, (q, a) in enumerate(pairs)]
    batch = Collator(proc, family, decoder_only)(examples)
    for i, (instruction, answer) in enumerate(pairs):
        labels = batch["labels"][i]
        targets = labels[labels != IGNORE_INDEX]
        # decode(skip_special_tokens) would hide a stray pad/eos, so check those first
        assert targets[-1] == tok.eos_token_id and (targets[:-1] != tok.eos_token_id).all(), targets.tolist()
        assert (targets != tok.pad_token_id).all(), f"row {i}: pad id in targets {targets.tolist()}"
        assert tok.decode(targets, skip_special_tokens=True) == answer, f"row {i}: {targets.tolist()}"
        real = batch["input_ids"][i][batch["attention_mask"][i].bool()]
        if decoder_only:
            assert torch.equal(real[-len(targets) :], targets), "answer ids in input_ids differ from labels"
            prompt = real[: len(real) - len(targets)]
        else:
            prompt = real
        assert tok.decode(prompt, skip_special_tokens=True) == instruction, f"row {i}: prompt {prompt.tolist()}"
        if family == "instructblip":
            q = batch["qformer_input_ids"][i][batch["qformer_attention_mask"][i].bool()]
            assert proc.qformer_tokenizer.decode(q, skip_special_tokens=True) == instruction, q.tolist()


def test_collator_defaults_are_the_documented_budgets():
    """Prompt budget 32 and answer budget 16 tokens (the issue's prompt 32 / answer 16), shapes padded per
    batch unless asked (static_shapes=False): a caller relying on the defaults gets exactly these."""
    collate = Collator(processor("blip2"), "blip2", decoder_only=True)
    assert (collate.max_prompt_tokens, collate.max_answer_tokens, collate.static_shapes) == (32, 16, False)


@pytest.mark.parametrize(
    ("prompt", "answer", "accepted"),
    # the smallest budgets hold "[CLS] x [SEP]" (3) and one answer token + eos (2); one less in either is refused
    [(3, 2, True), (2, 2, False), (3, 1, False), (2, 1, False)],
)
def test_collator_refuses_budgets_below_the_special_tokens(prompt: int, answer: int, accepted: bool):
    build = functools.partial(Collator, processor("instructblip"), "instructblip", False, prompt, answer)
    if accepted:
        assert (build().max_prompt_tokens, build().max_answer_tokens) == (prompt, answer)
        return
    with pytest.raises(ValueError) as caught:
        build()
    assert str(caught.value) == "max_prompt_tokens must be >= 3 and max_answer_tokens >= 2"


def test_collator_names_an_unknown_family_and_the_known_ones():
    with pytest.raises(ValueError) as caught:
        Collator(processor("blip2"), "llava", decoder_only=True)
    assert str(caught.value) == "unknown family 'llava'; expected one of ('instructblip', 'blip2')"


# --------------------------------------------------------------------------- widths, warnings, errors (issue 22)
# Every fixture word used below is one token in both tiny vocabularies (the LM's is word-level; the
# Q-Former's WordPiece holds each word whole): test_every_word_below_is_one_token checks it, so the
# widths and counts below are word counts.
SHORT, LONG = "what colour", "what colour is the shape"  # 2 and 5 words


def test_every_word_below_is_one_token():
    proc = processor("instructblip")
    for tokenizer in (proc.tokenizer, proc.qformer_tokenizer):
        for text in (SHORT, LONG, "red", "red circle", "what " * 50, "red " * 30):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert len(ids) == len(text.split()), f"{type(tokenizer).__name__}: {text!r} -> {ids}"


@pytest.mark.parametrize("family,decoder_only", CONFIGS)
def test_padding_width_is_the_longest_row_or_with_static_shapes_the_budget(family: str, decoder_only: bool):
    """Rows ("what colour", "red") and ("what colour is the shape", "red circle"), budgets 10 / 6.

    Per batch (static_shapes=False), each text is padded to its longest row: encoder prompt 5 + eos = 6,
    labels "red circle" + eos = 3, decoder-only sequence 5 + 2 + eos = 8 (input_ids and labels alike),
    Q-Former [CLS] + 5 + [SEP] = 7. With static_shapes=True every text is padded to its budget: encoder
    prompt 10, labels 6, decoder-only sequence 10 + 6 = 16, Q-Former 10; the first columns are the
    per-batch ones and the rest padding (pad id, -100 in labels, mask 0)."""
    proc = processor(family)
    examples = [Example(tiny_image(), SHORT, "red", "a"), Example(tiny_image(), LONG, "red circle", "b")]

    def collate(static: bool) -> dict:
        return Collator(proc, family, decoder_only, 10, 6, static_shapes=static)(examples)

    dynamic, static = collate(False), collate(True)
    widths = {"input_ids": (8, 16), "labels": (8, 16)} if decoder_only else {"input_ids": (6, 10), "labels": (3, 6)}
    pads = {"input_ids": proc.tokenizer.pad_token_id, "labels": IGNORE_INDEX}
    masks = {"input_ids": "attention_mask"}
    if family == "instructblip":
        widths["qformer_input_ids"] = (7, 10)
        pads["qformer_input_ids"] = proc.qformer_tokenizer.pad_token_id
        masks["qformer_input_ids"] = "qformer_attention_mask"
    for key, (per_batch, budget) in widths.items():
        got = (dynamic[key].shape[1], static[key].shape[1])
        assert got == (per_batch, budget), f"{key}: widths {got} (per batch, static), expected {(per_batch, budget)}"
        assert torch.equal(static[key][:, :per_batch], dynamic[key]), f"{key}: static rows differ before the padding"
        assert (static[key][:, per_batch:] == pads[key]).all(), f"{key}: the static extra columns are not padding"
        if key in masks:
            assert torch.equal(static[masks[key]][:, :per_batch], dynamic[masks[key]]), masks[key]
            assert not static[masks[key]][:, per_batch:].any(), f"{masks[key]}: the static extra columns are unmasked"


@pytest.mark.parametrize("decoder_only", [True, False])
def test_generation_prompts_are_left_padded_for_decoder_only_models_and_right_padded_otherwise(decoder_only: bool):
    """prompts() of "what colour" (ids 7, 15) and "what colour is the shape" (7, 15, 6, 8, 9 in the tiny LM
    vocabulary; pad 0, eos 1). Decoder-only: no eos, the short row left-padded so it ends with its last
    prompt token: [0, 0, 0, 7, 15]. Encoder-decoder: eos appended, right-padded: [7, 15, 1, 0, 0, 0]."""
    proc = processor("blip2")
    tok = proc.tokenizer
    assert tok.convert_tokens_to_ids(LONG.split()) == [7, 15, 6, 8, 9] and (tok.pad_token_id, tok.eos_token_id) == (
        0,
        1,
    )
    examples = [Example(tiny_image(), SHORT, "red", "a"), Example(tiny_image(), LONG, "red", "b")]
    batch = Collator(proc, "blip2", decoder_only).prompts(examples)
    if decoder_only:
        ids, mask = [[0, 0, 0, 7, 15], [7, 15, 6, 8, 9]], [[0, 0, 0, 1, 1], [1] * 5]
    else:
        ids, mask = [[7, 15, 1, 0, 0, 0], [7, 15, 6, 8, 9, 1]], [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert batch["input_ids"].tolist() == ids, f"prompt ids {batch['input_ids'].tolist()}, expected {ids}"
    assert batch["attention_mask"].tolist() == mask, f"mask {batch['attention_mask'].tolist()}, expected {mask}"


def truncated(collate, examples) -> list[warnings.WarningMessage]:
    """The warnings collate(examples) issues, every one kept ("always")."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        collate(examples)
    return caught


def test_truncation_warnings_name_the_sample_the_part_and_both_lengths():
    """Budgets 10 / 4 and a sample 'too-long' of 50 words of instruction and 30 of answer (one token each):
    the Q-Former keeps 10 - 2 = 8 (room for [CLS] and [SEP]), the encoder prompt 10 - 1 = 9 (room for eos),
    the answer 4 - 1 = 3 (room for eos), in the order the batch is built; the short sample is not named."""
    collate = Collator(processor("instructblip"), "instructblip", False, max_prompt_tokens=10, max_answer_tokens=4)
    examples = [Example(tiny_image(), "what " * 50, "red " * 30, "too-long"), shapes_batch(1)[0]]
    caught = truncated(collate, examples)
    assert [(w.category, str(w.message)) for w in caught] == [
        (UserWarning, "sample 'too-long': Q-Former instruction has 50 tokens, truncated to 8"),
        (UserWarning, "sample 'too-long': instruction has 50 tokens, truncated to 9"),
        (UserWarning, "sample 'too-long': answer has 30 tokens, truncated to 3"),
    ], [str(w.message) for w in caught]


def test_truncation_warnings_point_at_the_caller_of_prompt_ids_and_answer_ids():
    """A truncation warning is attributed (stacklevel=3: the warn in _truncate, prompt_ids / answer_ids, their
    caller) to the line that asked for the ids: the caller's own line when it calls prompt_ids / answer_ids
    directly, the line of Collator.__call__ that builds the prompts or the answers when it collates a batch;
    never the helper every warning passes through. The message checks run everywhere; the line checks not
    under mutmut, whose trampolines add frames between the calls (the stacklevel line is left out of the
    mutation run: "# pragma: no mutate" in inputs.Collator._truncate)."""
    collate = Collator(processor("blip2"), "blip2", True, max_prompt_tokens=4, max_answer_tokens=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        here = inspect.currentframe().f_lineno
        collate.prompt_ids("what " * 6, "s1")  # line here + 1
        collate.answer_ids("red " * 3, "s1")  # line here + 2
        collate([Example(tiny_image(), "what " * 6, "red " * 3, "s1")])
    # budgets: the decoder-only prompt keeps 4 (no eos), the answer 2 - 1 = 1 (room for eos)
    assert [str(w.message) for w in caught] == 2 * [
        "sample 's1': instruction has 6 tokens, truncated to 4",
        "sample 's1': answer has 3 tokens, truncated to 1",
    ], [str(w.message) for w in caught]
    if "MUTANT_UNDER_TEST" in os.environ:
        return
    lines, first = inspect.getsourcelines(Collator.__call__)
    builds = [
        first + next(i for i, line in enumerate(lines) if call in line) for call in ("prompt_ids(", "answer_ids(")
    ]
    expected = [(__file__, here + 1), (__file__, here + 2)] + [(inputs.__file__, line) for line in builds]
    at = [(w.filename, w.lineno) for w in caught]
    assert at == expected, f"warnings attributed to {at}, expected {expected}"


@pytest.mark.parametrize(
    ("family", "decoder_only", "words"),
    # the instruction exactly fills one budget: the Q-Former's 10 - 2 = 8, the encoder prompt's 10 - 1 = 9
    # (its eos makes 10), the decoder-only prompt's 10; the answer's 3 words fill 4 - 1 = 3 (eos makes 4)
    [("instructblip", False, 8), ("blip2", False, 9), ("blip2", True, 10)],
)
def test_text_exactly_at_its_budget_is_kept_whole_without_a_warning(family: str, decoder_only: bool, words: int):
    collate = Collator(processor(family), family, decoder_only, max_prompt_tokens=10, max_answer_tokens=4)
    examples = [Example(tiny_image(), "what " * words, "red " * 3, "fits")]
    caught = truncated(collate, examples)
    assert not caught, [str(w.message) for w in caught]
    batch = collate(examples)
    prompt = words if decoder_only else words + 1  # + eos
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == 4, batch["labels"].tolist()
    assert int(batch["attention_mask"].sum()) == prompt + (4 if decoder_only else 0), batch["attention_mask"].tolist()
    if family == "instructblip":
        assert int(batch["qformer_attention_mask"].sum()) == words + 2, batch["qformer_attention_mask"].tolist()


def test_an_empty_batch_is_refused_by_name():
    collate = Collator(processor("instructblip"), "instructblip", False)
    for build in (collate, collate.prompts):
        with pytest.raises(ValueError) as caught:
            build([])
        assert str(caught.value) == "cannot collate an empty batch"


def test_pixel_values_are_float32_whatever_the_image_processor_gives():
    """An image processor that returns float64 (NumPy arithmetic defaults to double) still
    yields float32 pixel values, the dtype the vision tower's weights and the docstring promise; the
    values themselves are unchanged (0.25 is exact in both)."""
    real = processor("blip2")

    def image_processor(images, return_tensors):
        return {"pixel_values": torch.full((len(images), 3, 32, 32), 0.25, dtype=torch.float64)}

    proc = SimpleNamespace(image_processor=image_processor, tokenizer=real.tokenizer)
    for batch in (
        Collator(proc, "blip2", True)(shapes_batch(2)),
        Collator(proc, "blip2", True).prompts(shapes_batch(2)),
    ):
        pv = batch["pixel_values"]
        assert pv.dtype == torch.float32, f"pixel_values {pv.dtype}, expected torch.float32"
        assert torch.equal(pv, torch.full((2, 3, 32, 32), 0.25)), "pixel values changed"


@pytest.mark.parametrize(
    "tokenizer",
    # an attribute that is missing and one that is None both mean "no such id"
    [SimpleNamespace(pad_token_id=0), SimpleNamespace(pad_token_id=0, eos_token_id=None)],
)
def test_a_tokenizer_without_an_id_the_collator_needs_is_named(tokenizer):
    proc = SimpleNamespace(image_processor=processor("blip2").image_processor, tokenizer=tokenizer)
    with pytest.raises(ValueError) as caught:
        Collator(proc, "blip2", decoder_only=True)
    assert str(caught.value) == (
        "tokenizer SimpleNamespace has no eos_token_id; the collator needs it for padding/targets"
    )


@pytest.mark.parametrize(
    ("model_type", "family", "decoder_only"), [("instructblip", "instructblip", False), ("blip-2", "blip2", True)]
)
def test_for_model_takes_family_and_lm_kind_from_the_model_and_budgets_from_the_run(model_type, family, decoder_only):
    """The model config decides the family (model_type "instructblip", anything else blip2) and the LM kind;
    the run's budgets come from a dict (a checkpoint's saved config) or an object's fields (a TrainConfig);
    static_shapes is off unless asked."""
    model_config = SimpleNamespace(model_type=model_type, use_decoder_only_language_model=decoder_only)
    budgets = {"max_prompt_tokens": 12, "max_answer_tokens": 5}
    proc = processor(family)
    for config, static in ((budgets, None), (SimpleNamespace(**budgets), True)):
        kwargs = {} if static is None else {"static_shapes": static}
        collate = Collator.for_model(proc, model_config, config, **kwargs)
        got = (collate.family, collate.decoder_only, collate.max_prompt_tokens, collate.max_answer_tokens)
        assert got == (family, decoder_only, 12, 5), got
        assert collate.static_shapes is bool(static), f"static_shapes {collate.static_shapes!r}, asked {static!r}"
