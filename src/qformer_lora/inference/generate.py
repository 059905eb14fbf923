"""Use a trained adapter: load it on its base, answer questions, merge it for export.

The adapter directory is PEFT's own format (checkpoint.ADAPTER_DIR), so everything
here goes through PeftModel.from_pretrained and merge_and_unload; the base model is
rebuilt from the run's saved config (preset or local checkpoint, same seed).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from peft import PeftModel

from .. import checkpoint, compat, data, inputs, presets


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


def load_untrained(base_checkpoint: str | os.PathLike):
    """(model in eval mode, processor, family) of a bare base checkpoint: its zero-shot baseline."""
    base = presets.load_model(base_checkpoint).eval()
    family, processor = _processor_of(base, base_checkpoint)
    return base, processor, family


def _processor_of(base, base_checkpoint) -> tuple[str, object]:
    family = "instructblip" if base.config.model_type == "instructblip" else "blip2"
    return family, data.build_processor(family, base_checkpoint, image_size=base.config.vision_config.image_size)


def collator(model, processor, config: dict) -> inputs.Collator:
    """The run's input builder (inputs.Collator with its saved budgets): inference sees what training saw."""
    return inputs.Collator.for_model(processor, compat.unwrap(model).config, config)


def export_merged(checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Merge the adapter into the base (merge_and_unload) and save model + processor atomically."""
    out_dir = Path(out_dir)
    if out_dir.exists():  # before loading and merging, which take minutes on a full-size model
        raise FileExistsError(f"{out_dir} already exists; choose a new directory")
    model, processor, _, _ = load_trained(checkpoint_path)
    merged = model.merge_and_unload()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        merged.save_pretrained(str(staging), safe_serialization=True)
        processor.save_pretrained(str(staging))
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
