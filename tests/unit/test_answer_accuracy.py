"""Teacher-forced answer accuracy (training/validation.answer_correct) against hand-computed values.

A sample is right when the argmax at every answer position is the answer token. Where the
prediction of a token sits differs by language model:

* encoder-decoder (FlanT5): decoder position i predicts labels[i] (the decoder input is the
  labels shifted right), so predictions and labels line up as they are;
* decoder-only (OPT, LLaMA/Vicuna): position i predicts token i+1, and the logits hold the query
  positions first, so the text logits are the last ``labels.shape[1]`` positions and the
  prediction for labels[:, j] is the argmax at text position j - 1.

The logits below are one-hot rows written by hand (vocabulary of 10), so the right answer can be
read off the tensors.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from qformer_lora import forward
from qformer_lora.training import validation

IGNORE = forward.IGNORE_INDEX
VOCAB = 10


def _model(decoder_only: bool):
    return SimpleNamespace(config=SimpleNamespace(use_decoder_only_language_model=decoder_only))


def _one_hot(token_rows: list[list[int]]) -> torch.Tensor:
    """Logits whose argmax at [row, position] is token_rows[row][position]."""
    return torch.nn.functional.one_hot(torch.tensor(token_rows), VOCAB).float()


def test_decoder_only_prediction_of_a_token_is_at_the_position_before_it():
    """2 query positions, then 4 text positions: prompt tokens 5, 6, then the answer 3, 4.

    labels = [-100, -100, 3, 4] (the prompt ignored). The text logits are positions 2..5. Row 0's
    argmaxes there are [x, 3, 4, x]: position 1 predicts labels[2] = 3, position 2 predicts labels[3] = 4
    -> right. Row 1's are [x, x, 3, 4]: the answer tokens sit at their own positions, which is what an
    unshifted comparison would count as right -> wrong. Row 2 predicts [x, 3, 9, x] -> wrong (second token).
    """
    x = 0  # the argmax at positions whose prediction is not compared (query positions, last position)
    logits = _one_hot(
        [
            [x, x, x, 3, 4, x],
            [x, x, x, x, 3, 4],
            [x, x, x, 3, 9, x],
        ]
    )
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4]] * 3)
    correct = validation.answer_correct(_model(decoder_only=True), logits, {"labels": labels})
    assert correct.tolist() == [True, False, False], (
        "decoder-only logits at text position i predict token i+1: row 0 (shifted) is right, row 1 "
        f"(aligned without the shift) and row 2 (one token wrong) are not; got {correct.tolist()}"
    )


def test_decoder_only_padding_and_prompt_positions_do_not_count():
    """Right-padded rows: labels [-100, 3, -100, -100] (one answer token, then padding). Only the
    prediction at text position 0 (for labels[1] = 3) counts, whatever the argmax elsewhere."""
    logits = _one_hot([[7, 3, 8, 8, 8], [7, 2, 8, 8, 8]])  # 1 query position + 4 text positions
    labels = torch.tensor([[IGNORE, 3, IGNORE, IGNORE]] * 2)
    correct = validation.answer_correct(_model(decoder_only=True), logits, {"labels": labels})
    assert correct.tolist() == [True, False]


def test_encoder_decoder_prediction_of_a_token_is_at_its_own_position():
    """Decoder logits [3, 4, x] for labels [3, 4, -100] -> right; [x, 3, 4] (shifted) -> wrong."""
    logits = _one_hot([[3, 4, 0], [0, 3, 4]])
    labels = torch.tensor([[3, 4, IGNORE]] * 2)
    correct = validation.answer_correct(_model(decoder_only=False), logits, {"labels": labels})
    assert correct.tolist() == [True, False]


@pytest.mark.parametrize("decoder_only", [True, False])
def test_a_row_without_answer_tokens_counts_as_right(decoder_only):
    """All labels ignored: nothing to get wrong (the rule is 'every answer token right')."""
    logits = _one_hot([[1, 2, 3, 4]])
    labels = torch.full((1, 4 if not decoder_only else 3), IGNORE)
    assert validation.answer_correct(_model(decoder_only), logits, {"labels": labels}).tolist() == [True]
