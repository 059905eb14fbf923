"""Tiny checkpoints in the file layouts the 2023 hub repositories of InstructBLIP / BLIP-2 use.

The Salesforce repositories (blip2-* from February 2023, instructblip-* from June 2023) were
written by transformers 4.27-4.31, before the image placeholder token (4.45) and before
processors saved their own config. What this module reproduces, file by file, from the shipped
tiny base (its weights and tokenizers, so a layout trains exactly as the base does):

* config.json without ``image_token_index`` (added in 4.45), with ``torch_dtype`` (renamed
  ``dtype`` in 4.56) and the era's ``transformers_version``. ``num_query_tokens`` stays: the
  era's ``Blip2Config`` / ``InstructBlipConfig.to_dict`` wrote every attribute, and the query
  count is one (read in the 4.33.3 wheel's configuration_instructblip.py); what 2023 repositories
  lack is the processor's copy of it.
* processor files of the era: preprocessor_config.json naming its processor class,
  tokenizer_config.json without the keys transformers 5 adds ("backend", "is_local",
  "local_files_only"), special_tokens_map.json, and no processor_config.json (the file that
  carries ``num_query_tokens`` and the image token from 4.45). The tokenizer classes stay the
  tiny base's (a tokenizer.json backend): the tiny vocabulary has no sentencepiece model, so the
  era's ``T5Tokenizer`` / ``spiece.model`` pair is not reproduced.
* weights in three forms (WEIGHTS): one model.safetensors; two safetensors shards with
  model.safetensors.index.json; two ``pytorch_model-0000i-of-00002.bin`` shards with
  pytorch_model.bin.index.json only, written by torch.save of plain tensor dicts.

What it is based on: the layouts transformers 4.27-4.31 wrote (save_pretrained's shard and index
names, the config keys of that release's to_dict) and the repositories' file lists as the hub
shows them; the hub itself is never contacted.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import base_weights, jsonio
from ..training.run_config import TINY_BASE_CHECKPOINT

ERA_TRANSFORMERS = "4.31.0"  # the release that added InstructBLIP (the hub files say 4.31.0.dev0)
WEIGHTS = ("safetensors", "safetensors-sharded", "bin-sharded")
SHARDS = 2
ADDED_LATER = ("image_token_index", "image_token_id")  # config keys the era did not write
TOKENIZER_KEYS_ADDED_LATER = ("backend", "is_local", "local_files_only")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token", "mask_token")


def write(out: str | os.PathLike, weights: str = "safetensors", source: str | os.PathLike = TINY_BASE_CHECKPOINT):
    """Write ``source`` (a transformers 5 InstructBLIP checkpoint) to the new directory ``out`` in the
    2023 layout with ``weights`` (one of WEIGHTS); returns ``out``. Staged and renamed into place."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights {weights!r}: expected one of {WEIGHTS}")
    source, out = Path(source), Path(out)
    stage = out.with_name(out.name + ".tmp")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    _write_config(source, stage)
    _write_processor(source, stage)
    _write_weights(load_file(str(source / base_weights.SAFETENSORS)), stage, weights)
    os.replace(stage, out)
    return out


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _dump(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(jsonio.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def era_config(config: dict) -> dict:
    """``config`` (a config.json dict) as the era wrote it: no image token, ``torch_dtype``."""
    config = {k: v for k, v in config.items() if k not in ADDED_LATER}
    config["torch_dtype"] = config.pop("dtype", "float32")
    config["transformers_version"] = ERA_TRANSFORMERS
    for key in ("qformer_config", "text_config", "vision_config"):
        if isinstance(config.get(key), dict) and "dtype" in config[key]:
            config[key] = {k: v for k, v in config[key].items() if k != "dtype"}
    return config


def _write_config(source: Path, stage: Path) -> None:
    _dump(stage / "config.json", era_config(_json(source / "config.json")))
    generation = _json(source / "generation_config.json") | {"transformers_version": ERA_TRANSFORMERS}
    _dump(stage / "generation_config.json", generation)


def _write_processor(source: Path, stage: Path) -> None:
    image = _json(source / "preprocessor_config.json")
    processor_class = _json(source / "tokenizer_config.json").get("processor_class", "InstructBlipProcessor")
    _dump(stage / "preprocessor_config.json", image | {"processor_class": processor_class})
    for folder in (Path("."), Path("qformer_tokenizer")):
        if not (source / folder / "tokenizer.json").is_file():
            continue
        (stage / folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / folder / "tokenizer.json", stage / folder / "tokenizer.json")
        config = _json(source / folder / "tokenizer_config.json")
        _dump(
            stage / folder / "tokenizer_config.json",
            {k: v for k, v in config.items() if k not in TOKENIZER_KEYS_ADDED_LATER},
        )
        _dump(stage / folder / "special_tokens_map.json", {k: config[k] for k in SPECIAL_TOKENS if k in config})


def _shards(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """SHARDS groups of whole tensors in name order, as save_pretrained splits by size."""
    names = sorted(tensors)
    cut = -(-len(names) // SHARDS)
    return [{n: tensors[n] for n in names[i : i + cut]} for i in range(0, len(names), cut)]


def _write_weights(tensors: dict[str, torch.Tensor], stage: Path, weights: str) -> None:
    if weights == "safetensors":
        save_file(tensors, str(stage / base_weights.SAFETENSORS), metadata={"format": "pt"})
        return
    shards = _shards(tensors)
    bin_shards = weights == "bin-sharded"
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = (
            f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
            if bin_shards
            else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        )
        if bin_shards:
            torch.save({k: v.clone() for k, v in shard.items()}, stage / name)  # plain tensors only
        else:
            save_file(shard, str(stage / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = base_weights.BIN_INDEX if bin_shards else base_weights.SAFETENSORS_INDEX
    _dump(stage / index, {"metadata": {"total_size": total}, "weight_map": weight_map})
