"""The one builder of model inputs: examples -> padded tensors, for training, validation and generation.

``Collator`` turns ``data.Example`` lists into the batch convention the custom forward
(forward.py) reads. Conventions the model side relies on:

* right padding everywhere in training batches; ``labels`` use -100 for every position that
  is not a target;
* ``input_ids`` never contain image/placeholder tokens: the custom forward prepends the
  Q-Former query embeddings itself, so the text here is text only.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .data import FAMILIES, Example
from .forward import IGNORE_INDEX  # the label value every loss here ignores


class Collator:
    """Turn a list of ``Example`` into model inputs.

    Output keys:

    * ``pixel_values``  float32 (B, 3, H, W) from ``processor.image_processor``
    * ``qformer_input_ids``, ``qformer_attention_mask`` (instructblip only):
      the instruction as ``[CLS] ... [SEP]``, right-padded with the Q-Former pad id
    * ``input_ids``, ``attention_mask``, ``labels``:

      - encoder-decoder (``decoder_only=False``, e.g. Flan-T5):
        ``input_ids`` = instruction + eos (the encoder input), right-padded
        with the LM pad id; ``labels`` = answer + eos, right-padded with -100.
        The two have independent lengths.
      - decoder-only (``decoder_only=True``, e.g. OPT/Vicuna):
        ``input_ids`` = instruction (no eos) + answer + eos, right-padded;
        ``labels`` has the same shape, equal to ``input_ids`` on the answer
        and eos positions and -100 on prompt and padding positions. Labels are
        NOT shifted: the model shifts them for next-token prediction, and the
        forward pads them with -100 for the prepended query tokens.

    * ``ids``: list of sample ids (not a tensor).

    ``attention_mask`` is 1 exactly on non-padding positions. Prompts longer
    than ``max_prompt_tokens`` (counting special tokens) and answers longer
    than ``max_answer_tokens`` (counting eos) are truncated, keeping the
    beginning, with a ``warnings.warn`` naming the sample id.
    """

    def __init__(
        self,
        processor: Any,
        family: str,
        decoder_only: bool,
        max_prompt_tokens: int = 32,
        max_answer_tokens: int = 16,
        static_shapes: bool = False,
    ):
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
        if max_prompt_tokens < 3 or max_answer_tokens < 2:
            # Room for [CLS] x [SEP] / one answer token + eos at least.
            raise ValueError("max_prompt_tokens must be >= 3 and max_answer_tokens >= 2")
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        self.qformer_tokenizer = processor.qformer_tokenizer if family == "instructblip" else None
        self.family = family
        self.decoder_only = decoder_only
        self.max_prompt_tokens = max_prompt_tokens
        self.max_answer_tokens = max_answer_tokens
        # Every text padded to its maximum in every batch (Q-Former text to max_prompt_tokens, LM
        # input and labels to the prompt / answer budgets): a compiled Q-Former or LM block then
        # sees one shape. Padding is masked and its labels ignored, so the loss is unchanged. With
        # shapes varying per batch, dynamo recompiles with dynamic shapes, which failed in
        # inductor on the H200 run (torch 2.11).
        self.static_shapes = static_shapes

        self.pad_id = _required_id(self.tokenizer, "pad_token_id")
        self.eos_id = _required_id(self.tokenizer, "eos_token_id")
        if self.qformer_tokenizer is not None:
            self.qformer_pad_id = _required_id(self.qformer_tokenizer, "pad_token_id")
            self.qformer_cls_id = _required_id(self.qformer_tokenizer, "cls_token_id")
            self.qformer_sep_id = _required_id(self.qformer_tokenizer, "sep_token_id")

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        images = [ex.image for ex in examples]
        batch: dict[str, Any] = {
            "pixel_values": self.image_processor(images, return_tensors="pt")["pixel_values"].to(torch.float32)
        }

        # None: pad to the longest row of this batch
        prompt_width, answer_width = (
            (self.max_prompt_tokens, self.max_answer_tokens) if self.static_shapes else (None, None)
        )
        if self.qformer_tokenizer is not None:
            # Special tokens are added by hand (not by the tokenizer) so that
            # truncation keeps the closing [SEP].
            qf = [
                [self.qformer_cls_id]
                + self._truncate(
                    self._content_ids(self.qformer_tokenizer, ex.instruction),
                    self.max_prompt_tokens - 2,
                    ex.id,
                    "Q-Former instruction",
                )
                + [self.qformer_sep_id]
                for ex in examples
            ]
            batch["qformer_input_ids"], batch["qformer_attention_mask"] = _pad(qf, self.qformer_pad_id, prompt_width)

        prompts, answers = [], []
        for ex in examples:
            # Decoder-only prompts get no eos: the answer continues them.
            # Encoder-decoder prompts end with eos, as a T5 encoder expects.
            budget = self.max_prompt_tokens if self.decoder_only else self.max_prompt_tokens - 1
            prompt = self._truncate(self._content_ids(self.tokenizer, ex.instruction), budget, ex.id, "instruction")
            prompts.append(prompt if self.decoder_only else prompt + [self.eos_id])
            answer = self._truncate(
                self._content_ids(self.tokenizer, ex.answer), self.max_answer_tokens - 1, ex.id, "answer"
            )
            answers.append(answer + [self.eos_id])

        if self.decoder_only:
            sequences = [p + a for p, a in zip(prompts, answers)]
            width = prompt_width + answer_width if self.static_shapes else None
            batch["input_ids"], batch["attention_mask"] = _pad(sequences, self.pad_id, width)
            targets = [[IGNORE_INDEX] * len(p) + a for p, a in zip(prompts, answers)]
            batch["labels"], _ = _pad(targets, IGNORE_INDEX, width)
        else:
            batch["input_ids"], batch["attention_mask"] = _pad(prompts, self.pad_id, prompt_width)
            batch["labels"], _ = _pad(answers, IGNORE_INDEX, answer_width)

        batch["ids"] = [ex.id for ex in examples]
        return batch

    @staticmethod
    def _content_ids(tokenizer: Any, text: str) -> list[int]:
        # Without special tokens: each convention above adds its own, so they
        # survive truncation and do not depend on the tokenizer's post-processor.
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    @staticmethod
    def _truncate(ids: list[int], limit: int, sample_id: str, what: str) -> list[int]:
        if len(ids) > limit:
            warnings.warn(
                f"sample {sample_id!r}: {what} has {len(ids)} tokens, truncated to {limit}",
                stacklevel=3,
            )
            return ids[:limit]
        return ids


def _required_id(tokenizer: Any, attr: str) -> int:
    value = getattr(tokenizer, attr, None)
    if value is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no {attr}; the collator needs it for padding/targets"
        )
    return int(value)


def _pad(rows: list[list[int]], pad_value: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to ``width`` (default: the longest row); return (ids, mask with 1 on real tokens)."""
    width = width or max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def to_device(batch: dict, device) -> dict:
    """The batch with every tensor moved to ``device`` (other values as they are).

    Asynchronous from pinned memory (the loader pins on CUDA); the copies are queued on the
    current stream, so the step that reads them waits for them without a host sync.
    """
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
