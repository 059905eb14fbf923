"""Validation during training: the answer-token loss and teacher-forced answer accuracy.

``evaluate`` runs the custom forward under the run's precision (and feature cache) on the
validation loader; a sample counts as right when every answer token is the argmax
(teacher-forced, so it says whether the answer is the model's first choice token by token,
not what free generation would produce). ``majority_baseline`` is the accuracy of always
answering the commonest answer: the floor a trained adapter has to beat.
"""

from __future__ import annotations

from collections import Counter

import torch

from .. import forward, inputs, precision
from . import feature_cache


@torch.no_grad()
def evaluate(model, loader, precision_name: str, device, cache=None) -> dict:
    """Validation token loss and answer accuracy (all answer tokens right, teacher-forced)."""
    loss_sum, tokens, correct, total = 0.0, 0, 0, 0
    for batch in loader:
        batch = inputs.to_device(batch, device)
        with precision.autocast(precision_name, device):
            batch = feature_cache.attach_cached_features(model, batch, cache)
            out = forward.custom_forward(model, batch, reduction="sum")
        loss_sum += float(out.loss)
        tokens += forward.target_count(batch)
        correct_rows = answer_correct(model, out.logits, batch)
        correct += int(correct_rows.sum())
        total += len(correct_rows)
    return {"val_loss": loss_sum / max(tokens, 1), "val_accuracy": correct / max(total, 1)}


def answer_correct(model, logits: torch.Tensor, batch: dict) -> torch.Tensor:
    labels = batch["labels"]
    if model.config.use_decoder_only_language_model:
        # logits at position i predict token i+1; text starts after the query positions
        text_logits = logits[:, -labels.shape[1] :, :]
        predictions, labels = text_logits[:, :-1].argmax(-1), labels[:, 1:]
    else:
        predictions = logits.argmax(-1)
    target = labels != forward.IGNORE_INDEX
    return ((predictions == labels) | ~target).all(dim=1)


def majority_baseline(samples) -> float:
    counts = Counter(s.answer.strip().lower() for s in samples)
    return counts.most_common(1)[0][1] / len(samples)
