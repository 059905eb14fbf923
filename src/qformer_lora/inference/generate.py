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

import torch
from peft import PeftModel

from .. import checkpoint, data, forward, presets


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
    family = "instructblip" if base.config.model_type == "instructblip" else "blip2"
    processor = data.build_processor(
        family, config.get("base_checkpoint"), image_size=base.config.vision_config.image_size
    )
    return model, processor, family, config


def prompt_batch(processor, family: str, images, instructions, max_prompt_tokens: int = 32) -> dict:
    """Prompt-only inputs for generation. Decoder-only prompts are left-padded, so every row
    ends with its last prompt token (the collator right-pads for training)."""
    tokenizer = processor.tokenizer
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(torch.float32)
    previous_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        text = tokenizer(
            list(instructions), padding=True, truncation=True, max_length=max_prompt_tokens, return_tensors="pt"
        )
    finally:
        tokenizer.padding_side = previous_side
    batch = {"pixel_values": pixel_values, "input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}
    if family == "instructblip":
        qformer = processor.qformer_tokenizer(
            list(instructions), padding=True, truncation=True, max_length=max_prompt_tokens, return_tensors="pt"
        )
        batch["qformer_input_ids"], batch["qformer_attention_mask"] = qformer["input_ids"], qformer["attention_mask"]
    return batch


def answer(model, processor, family: str, images, instructions, max_new_tokens: int = 8) -> list[str]:
    batch = prompt_batch(processor, family, images, instructions)
    new_tokens = forward.generate(model, batch, max_new_tokens=max_new_tokens)
    return [text.strip() for text in processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


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
