"""Every shipped preset parses, builds, and says where its values come from."""

from __future__ import annotations

import json

import pytest
import torch

from qformer_lora import forward, presets, synthetic

from ..conftest import FULL_PRESETS, TINY_PRESETS


def test_shipped_presets_are_the_documented_set():
    assert set(presets.list_presets()) == set(FULL_PRESETS) | set(TINY_PRESETS)


@pytest.mark.parametrize("name", FULL_PRESETS + TINY_PRESETS)
def test_preset_parses_and_builds_a_config(name):
    preset = presets.load_preset(name)
    assert preset.name == name and preset.source.strip()
    config = presets.build_config(preset)
    assert config.num_query_tokens == preset.config["num_query_tokens"]
    # every field written in the file must land in the built config (config classes
    # silently accept unknown keys, so a typo would otherwise go unnoticed)
    for section in ("vision_config", "qformer_config", "text_config"):
        built = getattr(config, section)
        for key, value in preset.config[section].items():
            if key in ("tie_word_embeddings",):  # T5 in transformers >= 5 overrides it; see compat
                continue
            assert getattr(built, key) == value, f"{preset.path}: {section}.{key}"


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_tiny_preset_is_tiny_and_runs(name):
    model = presets.build_model(name)
    assert model.config.text_config.hidden_size <= 64  # T5 maps hidden_size to d_model
    assert model.config.qformer_config.num_hidden_layers == 2
    batch = synthetic.random_batch(model)
    with torch.no_grad():
        loss = forward.custom_forward(model, batch).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_build_model_honours_dtype_and_device(dtype):
    model = presets.build_model("tiny-blip2-opt", dtype=dtype)
    assert {p.dtype for p in model.language_model.parameters()} == {dtype}
    meta = presets.build_model("tiny-blip2-opt", device="meta")
    assert {p.device.type for p in meta.parameters()} == {"meta"}


def test_build_model_is_reproducible_for_a_seed():
    a = presets.build_model("tiny-instructblip-flan-t5", seed=1)
    b = presets.build_model("tiny-instructblip-flan-t5", seed=1)
    c = presets.build_model("tiny-instructblip-flan-t5", seed=2)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_bad_presets_name_the_file(tmp_path):
    with pytest.raises(presets.PresetError, match="no preset 'nope'"):
        presets.load_preset("nope")
    broken = tmp_path / "broken.json"
    broken.write_text('{"name": "x",\n "family": }')
    with pytest.raises(presets.PresetError, match=r"broken\.json:2: invalid JSON"):
        presets.load_preset(broken)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"name": "w", "family": "llava", "source": "-", "config": {"text_config": {}}}))
    with pytest.raises(presets.PresetError, match=r"wrong\.json: field 'family' is 'llava'"):
        presets.load_preset(wrong)


def test_load_model_reads_a_local_checkpoint(tmp_path):
    model = presets.build_model("tiny-instructblip-flan-t5", seed=5)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = presets.load_model(tmp_path / "ckpt")
    batch = synthetic.random_batch(model)
    with torch.no_grad():
        assert torch.allclose(
            forward.custom_forward(model, batch).logits, forward.custom_forward(loaded, batch).logits, atol=1e-6
        )
    with pytest.raises(presets.PresetError, match="no config.json"):
        presets.load_model(tmp_path)
