"""Random batches in this package's batch convention, for probes, tests and benchmarks.

Pixels and token ids are random; what matters is that shapes, padding and labels
follow the convention documented in forward.py, so the custom forward and the
library's native forward (via compat.native_inputs) see the same sample.
"""

from __future__ import annotations

import torch

from . import compat, jsonio
from .forward import IGNORE_INDEX, is_instructblip

FIRST_ORDINARY_TOKEN = 5  # ids below are special (pad/eos/unk/bos/<image>) in the fixture tokenizer


def _packed(prompt, answer, prompt_lengths, answer_lengths, pad_id: int) -> dict:
    """Decoder-only rows: prompt then answer, packed to the left of each row, padding on the right;
    labels only on the answer."""
    rows, labels = [], []
    width = prompt.shape[1] + answer.shape[1]
    for i in range(prompt.shape[0]):
        p, a = prompt[i, : prompt_lengths[i]], answer[i, : answer_lengths[i]]
        row = torch.cat([p, a])
        rows.append(torch.cat([row, row.new_full((width - len(row),), pad_id)]))
        label = torch.cat([torch.full_like(p, IGNORE_INDEX), a])
        labels.append(torch.cat([label, label.new_full((width - len(label),), IGNORE_INDEX)]))
    mask = torch.arange(width).unsqueeze(0) < (prompt_lengths + answer_lengths).unsqueeze(1)
    return {"input_ids": torch.stack(rows), "attention_mask": mask.long(), "labels": torch.stack(labels)}


def random_batch(
    model,
    *,
    batch_size: int = 2,
    prompt_len: int = 5,
    answer_len: int = 3,
    instruction_len: int = 6,
    pad_rows: int = 0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict:
    """A batch of ``batch_size`` samples; the first ``pad_rows`` rows are shorter (right-padded)."""
    model = compat.unwrap(model)
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    high = config.text_config.vocab_size
    image_size = config.vision_config.image_size

    image_token = compat.image_token_index(config)

    def tokens(length: int, vocab_high: int) -> torch.Tensor:
        ids = torch.randint(FIRST_ORDINARY_TOKEN, vocab_high, (batch_size, length), generator=generator)
        # a stray image token would count as a placeholder in the native forward
        return ids.masked_fill(ids == image_token, FIRST_ORDINARY_TOKEN) if image_token is not None else ids

    def right_pad(ids: torch.Tensor, lengths: torch.Tensor, fill: int) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.arange(ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
        return ids.masked_fill(~mask, fill), mask.long()

    pad_id = config.text_config.pad_token_id or 0
    prompt_lengths = torch.full((batch_size,), prompt_len)
    answer_lengths = torch.full((batch_size,), answer_len)
    shrink = torch.arange(batch_size) < pad_rows
    if prompt_len > 1:
        prompt_lengths = torch.where(shrink, prompt_len - 1, prompt_lengths)
    if answer_len > 1:
        answer_lengths = torch.where(shrink, answer_len - 1, answer_lengths)

    batch = {"pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=generator)}
    prompt = tokens(prompt_len, high)
    answer = tokens(answer_len, high)
    if config.use_decoder_only_language_model:
        batch |= _packed(prompt, answer, prompt_lengths, answer_lengths, pad_id)
    else:
        batch["input_ids"], batch["attention_mask"] = right_pad(prompt, prompt_lengths, pad_id)
        batch["labels"], _ = right_pad(answer, answer_lengths, IGNORE_INDEX)
    if is_instructblip(model):
        qformer_high = config.qformer_config.vocab_size
        batch["qformer_input_ids"], batch["qformer_attention_mask"] = right_pad(
            tokens(instruction_len, qformer_high), torch.full((batch_size,), instruction_len), 0
        )
    return {k: v.to(device) for k, v in batch.items()}


# COCO's images are about 640 x 480 (the median of train2017 is 640 x 480), JPEG at roughly quality 90.
COCO_SIZE = (640, 480)


def write_photo_jpegs(directory, count: int, size: tuple[int, int] = COCO_SIZE, seed: int = 0) -> list:
    """``count`` photo-like JPEGs (``size`` = (width, height) pixels, quality 90) in ``directory``,
    plus ``manifest.jsonl`` naming them, for the data-pipeline benchmarks; returns the image paths.

    Smooth colour gradients, sensor-like noise (sigma 12 levels) and a dozen filled ellipses:
    flat random noise would defeat JPEG's compression and make decoding unrepresentatively
    slow, flat colour would make it unrepresentatively fast. Deterministic for a given seed.
    """
    from pathlib import Path

    import numpy as np
    from PIL import Image, ImageDraw

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    rows, columns = np.mgrid[0:height, 0:width]
    paths = []
    for i in range(count):
        waves = [np.sin(columns / rng.uniform(20, 120) + rng.uniform(0, 6)) * np.cos(rows / rng.uniform(20, 120))]
        pixels = np.stack([127 + 100 * waves[0] * rng.uniform(0.5, 1) for _ in range(3)], axis=-1)
        pixels += rng.normal(0, 12, pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x, y, r = rng.integers(0, width - 40), rng.integers(0, height - 40), int(rng.integers(10, 120))
            draw.ellipse([x, y, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        paths.append(directory / f"photo_{i:04d}.jpg")
        image.save(paths[-1], quality=90)
    records = [{"image": p.name, "instruction": "What is in the picture?", "answer": "shapes"} for p in paths]
    (directory / "manifest.jsonl").write_text("".join(jsonio.dumps(r) + "\n" for r in records), encoding="utf-8")
    return paths
