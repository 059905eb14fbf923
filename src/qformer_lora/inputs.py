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

    @classmethod
    def for_model(cls, processor: Any, model_config: Any, config: Any, static_shapes: bool = False) -> Collator:
        """The collator of a model (its transformers config decides family and LM kind) with the
        budgets of a run (``config``: a TrainConfig, or the dict a checkpoint saved it as), so
        training, validation, generation and evaluation of one run build inputs alike."""
        budgets = config if isinstance(config, dict) else vars(config)
        return cls(
            processor,
            family="instructblip" if model_config.model_type == "instructblip" else "blip2",
            decoder_only=model_config.use_decoder_only_language_model,
            max_prompt_tokens=budgets["max_prompt_tokens"],
            max_answer_tokens=budgets["max_answer_tokens"],
            static_shapes=static_shapes,
        )

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        """The training / validation batch of ``examples`` (the class docstring's keys)."""
        batch = self._image_and_qformer_inputs(examples)
        # None: pad to the longest row of this batch
        prompt_width, answer_width = (
            (self.max_prompt_tokens, self.max_answer_tokens) if self.static_shapes else (None, None)
        )
        prompts = [self.prompt_ids(ex.instruction, ex.id) for ex in examples]
        answers = [self.answer_ids(ex.answer, ex.id) for ex in examples]
        if self.decoder_only:
            sequences = [p + a for p, a in zip(prompts, answers)]
            width = prompt_width + answer_width if self.static_shapes else None
            batch["input_ids"], batch["attention_mask"] = _pad(sequences, self.pad_id, width)
            targets = [[IGNORE_INDEX] * len(p) + a for p, a in zip(prompts, answers)]
            batch["labels"], _ = _pad(targets, IGNORE_INDEX, width)
        else:
            batch["input_ids"], batch["attention_mask"] = _pad(prompts, self.pad_id, prompt_width)
            batch["labels"], _ = _pad(answers, IGNORE_INDEX, answer_width)
        return batch

    def prompts(self, examples: Sequence[Example]) -> dict[str, Any]:
        """The generation batch of ``examples``: the training batch's inputs without the answers.

        The same pixel values, Q-Former ids and prompt ids as ``__call__`` (answers are ignored),
        so the model sees at inference exactly what it saw in training. Decoder-only prompts
        are left-padded, so every row ends with its last prompt token and the first generated
        token follows it (position ids follow the attention mask, so the padding moves no
        position); encoder-decoder prompts stay right-padded, as in training.
        """
        batch = self._image_and_qformer_inputs(examples)
        prompts = [self.prompt_ids(ex.instruction, ex.id) for ex in examples]
        batch["input_ids"], batch["attention_mask"] = _pad(prompts, self.pad_id, left=self.decoder_only)
        return batch

    def prompt_ids(self, instruction: str, sample_id: str) -> list[int]:
        """The language model's prompt: the instruction's ids within the budget, no BOS; plus eos
        for an encoder-decoder LM (a T5 encoder expects it). Decoder-only prompts get no eos:
        the answer continues them."""
        budget = self.max_prompt_tokens if self.decoder_only else self.max_prompt_tokens - 1
        prompt = self._truncate(self._content_ids(self.tokenizer, instruction), budget, sample_id, "instruction")
        return prompt if self.decoder_only else prompt + [self.eos_id]

    def answer_ids(self, answer: str, sample_id: str) -> list[int]:
        """The answer's ids within the budget, then eos (what the loss is taken over)."""
        ids = self._content_ids(self.tokenizer, answer)
        return self._truncate(ids, self.max_answer_tokens - 1, sample_id, "answer") + [self.eos_id]

    def _image_and_qformer_inputs(self, examples: Sequence[Example]) -> dict[str, Any]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        images = [ex.image for ex in examples]
        batch: dict[str, Any] = {
            "pixel_values": self.image_processor(images, return_tensors="pt")["pixel_values"].to(torch.float32),
            "ids": [ex.id for ex in examples],
        }
        if self.qformer_tokenizer is not None:
            # Special tokens are added by hand (not by the tokenizer) so that truncation keeps the closing [SEP].
            qformer_rows = [
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
            width = self.max_prompt_tokens if self.static_shapes else None
            batch["qformer_input_ids"], batch["qformer_attention_mask"] = _pad(qformer_rows, self.qformer_pad_id, width)
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
                stacklevel=3,  # pragma: no mutate (mutmut's trampolines add frames: tests/unit/test_collation.py)
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


def _pad(
    rows: list[list[int]], pad_value: int, width: int | None = None, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to ``width`` (default: the longest row), on the right or ``left``; return (ids, mask
    with 1 on real tokens)."""
    width = width or max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        where = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, where] = torch.tensor(row, dtype=torch.long)
        mask[i, where] = 1
    return ids, mask


def to_device(batch: dict, device) -> dict:
    """The batch with every tensor moved to ``device`` (other values as they are).

    Asynchronous from pinned memory (the loader pins on CUDA); the copies are queued on the
    current stream, so the step that reads them waits for them without a host sync.
    """
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
