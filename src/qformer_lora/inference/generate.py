"""Use a trained adapter: load it on its base and answer questions (export.py merges it for export).

Three sources: a training checkpoint of ours (``load_trained``: the adapter in PEFT's own
format, checkpoint.ADAPTER_DIR, on the base rebuilt from the run's saved config, preset or
local checkpoint, same seed); a LoRA adapter trained elsewhere with plain PEFT on a local base
checkpoint (``load_adapter``, with a scope report of what it touches); and a saved model with
nothing to add, e.g. a merged export (``load_merged``). Everything goes through
``PeftModel.from_pretrained`` and transformers' ``from_pretrained``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from peft import PeftModel

from .. import checkpoint, compat, data, inputs, lora, presets


def run_config(checkpoint_path: str | os.PathLike) -> dict:
    state_file = Path(checkpoint_path) / checkpoint.STATE_FILE
    if not state_file.is_file():
        raise checkpoint.CheckpointError(f"{checkpoint_path}: not a training checkpoint ({state_file.name} missing)")
    return json.loads(state_file.read_text(encoding="utf-8"))["config"]


def load_base(config: dict):
    if config.get("base_checkpoint"):
        return presets.load_model(config["base_checkpoint"])
    return presets.build_model(config["preset"], seed=config["seed"])


def load_trained(checkpoint_path: str | os.PathLike):
    """(PeftModel in eval mode, processor, family, run config) for a training checkpoint."""
    config = run_config(checkpoint_path)
    base = load_base(config)
    model = PeftModel.from_pretrained(base, str(Path(checkpoint_path) / checkpoint.ADAPTER_DIR)).eval()
    family, processor = _processor_of(base, config.get("base_checkpoint"))
    return model, processor, family, config


def _processor_of(base, base_checkpoint) -> tuple[str, object]:
    family = "instructblip" if base.config.model_type == "instructblip" else "blip2"
    return family, data.build_processor(family, base_checkpoint, image_size=base.config.vision_config.image_size)


def collator(model, processor, config: dict) -> inputs.Collator:
    """The run's input builder (inputs.Collator with its saved budgets): inference sees what training saw."""
    return inputs.Collator.for_model(processor, compat.unwrap(model).config, config)


ADAPTER_CONFIG = "adapter_config.json"  # PEFT's name for an adapter directory's config


def adapter_config_file(adapter_dir: str | os.PathLike) -> Path:
    """``adapter_dir``'s adapter_config.json; CheckpointError when the directory is no PEFT adapter."""
    config_file = Path(adapter_dir) / ADAPTER_CONFIG
    if not config_file.is_file():
        raise checkpoint.CheckpointError(f"{adapter_dir}: not a PEFT adapter directory ({ADAPTER_CONFIG} missing)")
    return config_file


def adapter_base(adapter_dir: str | os.PathLike) -> str:
    """The local base checkpoint an adapter directory records (``base_model_name_or_path``).

    CheckpointError naming the file when the directory is no PEFT adapter, or when what it records
    is not a local directory (a hub id, say: nothing here downloads; pass the base explicitly).
    """
    config_file = adapter_config_file(adapter_dir)
    recorded = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not recorded or not Path(recorded).is_dir():
        raise checkpoint.CheckpointError(
            f"{config_file}: field 'base_model_name_or_path' is {recorded!r}, not a local checkpoint directory; "
            f"name the base checkpoint the adapter was trained on (--base-checkpoint DIR)"
        )
    return recorded


def load_adapter(adapter_dir: str | os.PathLike, base_checkpoint: str | os.PathLike | None = None):
    """(PeftModel in eval mode, processor, family, scope report) for a LoRA adapter trained with plain PEFT.

    ``adapter_dir`` holds adapter_config.json and the adapter weights (``PeftModel.save_pretrained``);
    ``base_checkpoint`` is the local InstructBLIP / BLIP-2 checkpoint it was trained on (default: the
    one the adapter records, see ``adapter_base``). The scope report (lora.scope_report, with
    "base_checkpoint" and "versions" added; lora.format_scope_report prints it) shows where the
    adapter's LoRA layers are; an adapter outside the Q-Former and the language model raises
    lora.ScopeError. The adapter is loaded trainable so the report counts its parameters; outputs
    are those of eval mode.
    """
    adapter_config_file(adapter_dir)  # before the base is loaded, which takes minutes at full size
    base_checkpoint = str(base_checkpoint) if base_checkpoint is not None else adapter_base(adapter_dir)
    family = presets.family_of_checkpoint(base_checkpoint)
    base = presets.load_model(base_checkpoint)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True).eval()
    spec = lora.adapter_spec(model)
    lora.check_trainable_scope(model, spec.scope)
    report = {"base_checkpoint": base_checkpoint, "versions": compat.versions()} | lora.scope_report(model, spec)
    return model, data.build_processor(family, base_checkpoint), family, report


def load_merged(model_dir: str | os.PathLike):
    """(model in eval mode, processor, family) for a saved checkpoint used as it is: a merged export,
    or a bare base (its zero-shot baseline)."""
    model = presets.load_model(model_dir).eval()
    family, processor = _processor_of(model, model_dir)
    return model, processor, family
