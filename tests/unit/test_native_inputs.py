"""compat.native_inputs: the library's own forward gets this package's batch in its own convention.

Written against a hand-built batch so each key can be read off: what passes through unchanged, and
what the placeholder convention (transformers >= 4.45 with an image token; always from 4.55) adds in
front -- num_query_tokens image tokens in input_ids, ones in attention_mask, ignored labels for
decoder-only models.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from qformer_lora import compat

IMAGE_TOKEN = 5


def model(model_type: str, decoder_only: bool):
    config = SimpleNamespace(
        model_type=model_type,
        num_query_tokens=2,
        use_decoder_only_language_model=decoder_only,
        image_token_index=IMAGE_TOKEN,
    )
    return SimpleNamespace(config=config)


def batch() -> dict:
    return {
        "pixel_values": torch.zeros(1, 3, 4, 4),
        "input_ids": torch.tensor([[11, 12, 13]]),
        "attention_mask": torch.tensor([[1, 1, 0]]),
        "labels": torch.tensor([[-100, 12, 13]]),
        "qformer_input_ids": torch.tensor([[21, 22]]),
        "qformer_attention_mask": torch.tensor([[1, 0]]),
        "ids": ["s0"],  # not a model input
    }


@pytest.mark.parametrize("decoder_only", [False, True])
def test_instructblip_inputs(decoder_only):
    b = batch()
    kwargs = compat.native_inputs(model("instructblip", decoder_only), b)
    assert set(kwargs) == {"pixel_values", "input_ids", "attention_mask", "labels", "qformer_input_ids",
                           "qformer_attention_mask"}  # fmt: skip
    assert kwargs["pixel_values"] is b["pixel_values"]
    assert kwargs["qformer_input_ids"] is b["qformer_input_ids"]
    assert kwargs["qformer_attention_mask"] is b["qformer_attention_mask"]
    if compat.native_convention(model("instructblip", decoder_only).config) == compat.PLACEHOLDERS:
        assert kwargs["input_ids"].tolist() == [[IMAGE_TOKEN, IMAGE_TOKEN, 11, 12, 13]]
        assert kwargs["attention_mask"].tolist() == [[1, 1, 1, 1, 0]]
        expected_labels = [[-100, -100, -100, 12, 13]] if decoder_only else [[-100, 12, 13]]
    else:
        assert kwargs["input_ids"] is b["input_ids"] and kwargs["attention_mask"] is b["attention_mask"]
        full_length = decoder_only and compat.TRANSFORMERS >= compat.INSTRUCTBLIP_FULL_LENGTH_LABELS
        expected_labels = [[-100, -100, -100, 12, 13]] if full_length else [[-100, 12, 13]]
    assert kwargs["labels"].tolist() == expected_labels


def test_blip2_has_no_qformer_text():
    b = {k: v for k, v in batch().items() if not k.startswith("qformer_")}
    kwargs = compat.native_inputs(model("blip-2", False), b)
    assert "qformer_input_ids" not in kwargs and "qformer_attention_mask" not in kwargs
    assert kwargs["labels"].tolist() == [[-100, 12, 13]]


def test_image_token_index_is_none_for_a_config_without_one():
    """Configs written before the field existed (transformers < 4.46's InstructBLIP/BLIP-2) have no
    image_token_index: the answer is None (the caller then uses the old convention), not an AttributeError."""
    assert compat.image_token_index(SimpleNamespace()) is None
    assert compat.image_token_index(SimpleNamespace(image_token_index=32100)) == 32100
