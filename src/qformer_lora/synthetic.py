"""Random batches in this package's batch convention, for probes, tests and benchmarks.

Pixels and token ids are random; what matters is that shapes, padding and labels
follow the convention documented in forward.py, so the custom forward and the
library's native forward (via compat.native_inputs) see the same sample.
"""

from __future__ import annotations

import torch

from . import compat
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
