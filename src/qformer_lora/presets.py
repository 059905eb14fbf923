"""Architecture presets: resources/configs/*.json -> transformers configs -> models.

A preset is a small JSON file holding the keyword arguments of
``InstructBlipConfig`` / ``Blip2Config`` plus a name, a family and where the values
come from. Building from a preset never touches the network: weights are randomly
initialised, on ``meta`` (for parameter counts of full-size models), ``cpu`` or
``cuda``. Real checkpoints load from a local directory with :func:`load_model`.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
)

from . import base_weights, compat

# The data the package ships (presets, the tiny base checkpoint, the shapes data, tokenizers,
# per-release expectations) lives inside the package, so a wheel works from any directory.
# importlib.resources gives a real directory for every installed form (wheel, editable, checkout);
# transformers' from_pretrained needs one, so the Traversable becomes a Path here, once.
RESOURCES_DIR = Path(str(importlib.resources.files("qformer_lora") / "resources"))
CONFIGS_DIR = RESOURCES_DIR / "configs"
DEFAULT_PRESET = "instructblip-flan-t5-xl"

FAMILIES = {
    "instructblip": (InstructBlipConfig, InstructBlipForConditionalGeneration),
    "blip2": (Blip2Config, Blip2ForConditionalGeneration),
}
# config.json "model_type" of a saved checkpoint -> family
MODEL_TYPES = {"instructblip": "instructblip", "blip-2": "blip2"}
REQUIRED_KEYS = ("name", "family", "source", "config")
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


class PresetError(ValueError):
    """A preset file is missing, unreadable or malformed (the message names the file)."""


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    source: str
    config: dict
    path: Path

    @property
    def text_model_type(self) -> str:
        return self.config["text_config"]["model_type"]


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def load_preset(name_or_path: str | os.PathLike) -> Preset:
    """Read a preset by name (resources/configs/<name>.json) or by path."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = CONFIGS_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise PresetError(
            f"no preset {str(name_or_path)!r}: {path} does not exist; shipped presets: {', '.join(list_presets())}"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PresetError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from err
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise PresetError(f"{path}: missing field(s) {missing}")
    if data["family"] not in FAMILIES:
        raise PresetError(f"{path}: field 'family' is {data['family']!r}; expected one of {sorted(FAMILIES)}")
    text_config = data["config"].get("text_config", {})
    if "model_type" not in text_config:
        raise PresetError(f"{path}: field 'config.text_config.model_type' is required (t5, opt, llama, ...)")
    return Preset(name=data["name"], family=data["family"], source=data["source"], config=data["config"], path=path)


def build_config(preset: Preset):
    config_cls, _ = FAMILIES[preset.family]
    try:
        return config_cls(**preset.config)
    except (TypeError, ValueError) as err:
        raise PresetError(f"{preset.path}: field 'config' rejected by {config_cls.__name__}: {err}") from err


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    # Constructing under the target default dtype avoids materialising a full fp32
    # copy first (16 GB for a 4B-parameter model) before casting down.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}") from None


def build_model(
    preset: Preset | str,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    seed: int | None = 0,
):
    """A randomly initialised model for ``preset`` on ``device`` in ``dtype``, no network.

    ``device="meta"`` allocates nothing, which is how full-size parameter counts are
    taken on a laptop. ``seed`` makes the random init reproducible on real devices.
    """
    if isinstance(preset, str):
        preset = load_preset(preset)
    config = build_config(preset)
    _, model_cls = FAMILIES[preset.family]
    if seed is not None:
        torch.manual_seed(seed)
    with _default_dtype(resolve_dtype(dtype)), torch.device(device):
        model = model_cls(config)
    return compat.finish_meta_model(model).eval()  # 5.0.0 leaves tied weights untied on meta


def family_of_checkpoint(checkpoint_dir: str | os.PathLike) -> str:
    config_path = Path(checkpoint_dir) / "config.json"
    if not config_path.is_file():
        raise PresetError(
            f"{checkpoint_dir}: no config.json; expected a saved InstructBLIP or BLIP-2 checkpoint directory"
        )
    model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    if model_type not in MODEL_TYPES:
        raise PresetError(f"{config_path}: field 'model_type' is {model_type!r}; expected one of {sorted(MODEL_TYPES)}")
    return MODEL_TYPES[model_type]


def load_model(
    checkpoint_dir: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = torch.float32
):
    """Load a real checkpoint from a local directory (never from a hub).

    Its weight files are checked first (base_weights.check_loadable): ``.bin`` weights load only
    where they are read with weights_only=True, and a shard holding anything but tensors is refused
    (base_weights.WeightsError, naming the file)."""
    family = family_of_checkpoint(checkpoint_dir)
    base_weights.check_loadable(checkpoint_dir)
    _, model_cls = FAMILIES[family]
    model = model_cls.from_pretrained(
        str(checkpoint_dir), local_files_only=True, **compat.from_pretrained_dtype_kwarg(resolve_dtype(dtype))
    )
    return model.to(device).eval()


def build_from_checkpoint_config(checkpoint_dir: str | os.PathLike, *, device: str | torch.device = "meta"):
    """The model a checkpoint's config.json describes, without its weights: on ``meta`` nothing is
    allocated (parameter counts and LoRA scope of a full-size checkpoint on any machine)."""
    config_cls, model_cls = FAMILIES[family_of_checkpoint(checkpoint_dir)]
    config = config_cls.from_pretrained(str(checkpoint_dir), local_files_only=True)
    with _default_dtype(torch.float32), torch.device(device):
        model = model_cls(config)
    return compat.finish_meta_model(model).eval()
