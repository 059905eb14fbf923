"""Weight files of a base checkpoint: the 2023 layouts hold the base's tensors, .bin is never unpickled."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from qformer_lora import base_weights, cli, compat, presets
from qformer_lora.repro import era_layouts
from qformer_lora.training.run_config import TINY_BASE_CHECKPOINT


def _tensors(directory) -> dict:
    found = base_weights.layout(directory)
    read = base_weights.read_bin if found["format"] == "bin" else lambda p: load_file(str(p))
    tensors = {}
    for name in found["files"]:
        tensors |= read(directory / name)
    return tensors


@pytest.mark.parametrize("weights", era_layouts.WEIGHTS)
def test_a_2023_layout_holds_the_base_tensors_bitwise(tmp_path, weights):
    out = era_layouts.write(tmp_path / weights, weights)
    base = load_file(str(TINY_BASE_CHECKPOINT / "model.safetensors"))
    got = _tensors(out)
    assert got.keys() == base.keys() and all(torch.equal(got[k], base[k]) for k in base)
    config = era_layouts._json(out / "config.json")
    # the era's config: no image token, the query count kept (4, the tiny base's), torch_dtype
    assert "image_token_index" not in config and config["num_query_tokens"] == 4 and config["torch_dtype"] == "float32"
    assert not (out / "processor_config.json").exists() and (out / "special_tokens_map.json").is_file()


class Payload:
    """Pickles to a call of os.system: what a hostile .bin does when fully unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_bin_holding_a_pickled_object_is_refused_not_executed(tmp_path):
    directory = era_layouts.write(tmp_path / "ckpt", "bin-sharded")
    marker = tmp_path / "executed"
    shard = directory / "pytorch_model-00002-of-00002.bin"
    torch.save(base_weights.read_bin(shard) | {"payload": Payload(marker)}, shard)
    with pytest.raises(
        base_weights.WeightsError, match=r"pytorch_model-00002-of-00002\.bin: not a plain tensor file.*system"
    ):
        presets.load_model(directory)
    assert cli.main(["doctor", "--base-checkpoint", str(directory)]) == 1  # fatal: weights-refused
    assert not marker.exists()


def test_bin_weights_are_refused_with_the_conversion_command_where_transformers_would_unpickle(tmp_path, monkeypatch):
    directory = era_layouts.write(tmp_path / "ckpt", "bin-sharded")
    monkeypatch.setattr(compat, "TRANSFORMERS", compat.Version("4.36.2"))
    monkeypatch.setattr(compat, "TORCH", compat.Version("2.5.1"))
    assert "without weights_only" in compat.bin_weights_unsafe_reason()
    with pytest.raises(base_weights.WeightsError, match=r"python -m qformer_lora\.base_weights"):
        presets.load_model(directory)
    monkeypatch.setattr(compat, "TORCH", compat.Version("2.6.0"))  # torch defaults to weights_only=True
    assert compat.bin_weights_unsafe_reason() is None
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # unless forced off
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" in compat.bin_weights_unsafe_reason()
    monkeypatch.setattr(compat, "TRANSFORMERS", compat.Version("4.37.0"))  # transformers passes weights_only=True
    assert compat.bin_weights_unsafe_reason() is None


def test_conversion_to_safetensors_keeps_every_tensor(tmp_path):
    src = era_layouts.write(tmp_path / "bin", "bin-sharded")
    out = base_weights.to_safetensors(src, tmp_path / "converted")
    assert base_weights.layout(out)["format"] == "safetensors" and base_weights.layout(out)["sharded"]
    a, b = _tensors(src), _tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(base_weights.WeightsError, match="already exists"):
        base_weights.to_safetensors(src, out)


def test_an_index_naming_a_missing_shard_is_named(tmp_path):
    directory = era_layouts.write(tmp_path / "ckpt", "safetensors-sharded")
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        base_weights.WeightsError, match=r"model\.safetensors\.index\.json: names shard\(s\) \['model-00002"
    ):
        presets.load_model(directory)
