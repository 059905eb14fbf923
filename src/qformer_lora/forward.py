"""The custom forward: vision encoder -> Q-Former -> projection -> language model.

Why it exists: wrapping InstructBLIP in a PEFT task model (SEQ_2_SEQ_LM, CAUSAL_LM)
makes PEFT call the model with keywords it refuses (``inputs_embeds``, ...), and the
library's own input convention changed across releases (query embeddings prepended
by the model in old releases, image placeholder tokens in ``input_ids`` in new ones).
This forward drives the submodules directly and calls the language model with
``inputs_embeds`` only, so it works the same on every release.

Batch convention (see data.py): ``input_ids`` hold text only, no image tokens.
Encoder-decoder LMs: ``input_ids`` is the prompt and ``labels`` the answer.
Decoder-only LMs: ``input_ids`` is prompt + answer and ``labels`` has the same length,
-100 on prompt and padding positions; the query positions are added here as -100.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import compat

IGNORE_INDEX = -100


@dataclass
class ForwardOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor
    query_output: torch.Tensor  # Q-Former output at the query positions
    language_model_inputs: torch.Tensor  # projected query output, fed to the LM


def is_instructblip(model) -> bool:
    return compat.unwrap(model).config.model_type == "instructblip"


def encode_images(model, images: torch.Tensor | dict) -> torch.Tensor:
    """Vision encoder output; runs without autograd when the encoder has nothing to train.

    ``images`` is a pixel_values tensor or a batch; a batch carrying ``image_embeds``
    (precomputed features, see training/feature_cache.py) skips the encoder.
    """
    vision = model.vision_model
    trainable = any(p.requires_grad for p in vision.parameters())
    if isinstance(images, dict):
        if "image_embeds" in images:
            return precomputed_image_embeds(model, images["image_embeds"], trainable)
        images = images["pixel_values"]
    dtype = next(vision.parameters()).dtype
    with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
        return vision(pixel_values=images.to(dtype), return_dict=True).last_hidden_state


def precomputed_image_embeds(model, image_embeds: torch.Tensor, trainable: bool) -> torch.Tensor:
    """Precomputed vision features on the encoder's device, checked against the model.

    Refused for a trainable encoder: the features would be stale and no gradient
    would reach it. The dtype is left as computed (casting would break exactness).
    """
    if trainable:
        raise ValueError(
            "the batch carries precomputed image_embeds but the vision encoder has trainable "
            "parameters: the features would be stale and get no gradient; drop image_embeds "
            "(turn the feature cache off) or freeze the vision encoder"
        )
    hidden = model.config.vision_config.hidden_size
    if image_embeds.dim() != 3 or image_embeds.shape[-1] != hidden:
        raise ValueError(
            f"image_embeds of shape {tuple(image_embeds.shape)} do not fit this vision encoder: "
            f"expected (batch, tokens, {hidden})"
        )
    return image_embeds.to(next(model.vision_model.parameters()).device)


def query_features(model, image_embeds: torch.Tensor, batch: dict) -> torch.Tensor:
    """Q-Former output at the query positions (with the instruction for InstructBLIP)."""
    batch_size = image_embeds.shape[0]
    query_tokens = model.query_tokens.expand(batch_size, -1, -1)
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    kwargs = dict(
        query_embeds=query_tokens,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_mask,
        return_dict=True,
    )
    if "qformer_input_ids" in batch:
        query_mask = torch.ones(query_tokens.shape[:-1], dtype=torch.long, device=image_embeds.device)
        kwargs["input_ids"] = batch["qformer_input_ids"]
        kwargs["attention_mask"] = torch.cat([query_mask, batch["qformer_attention_mask"]], dim=1)
    hidden = model.qformer(**kwargs).last_hidden_state
    return hidden[:, : query_tokens.shape[1], :]


def embed_inputs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs_embeds, attention_mask, query_output, language_model_inputs) for the language model."""
    model = compat.unwrap(model)
    image_embeds = encode_images(model, batch)  # precomputed batch["image_embeds"] when present
    query_output = query_features(model, image_embeds, batch)
    # query_tokens may be kept in fp32 by transformers while the projection is bf16/fp16
    projection = model.language_projection
    language_model_inputs = projection(query_output.to(projection.weight.dtype))

    text_embeds = model.language_model.get_input_embeddings()(batch["input_ids"])
    language_model_inputs = language_model_inputs.to(text_embeds.dtype)
    inputs_embeds = torch.cat([language_model_inputs, text_embeds], dim=1)
    batch_size, num_queries = language_model_inputs.shape[:2]
    query_mask = batch["attention_mask"].new_ones((batch_size, num_queries))
    attention_mask = torch.cat([query_mask, batch["attention_mask"]], dim=1)
    return inputs_embeds, attention_mask, query_output, language_model_inputs


def custom_forward(model, batch: dict, reduction: str = "mean") -> ForwardOutput:
    """Loss and logits for ``batch``; ``model`` may be a PeftModel or the bare model.

    ``reduction="sum"`` gives the summed token loss, which the training loop divides by
    the target count of the whole accumulation group (batch-size invariant).
    """
    model = compat.unwrap(model)
    inputs_embeds, attention_mask, query_output, language_model_inputs = embed_inputs(model, batch)
    labels = batch.get("labels")
    if model.config.use_decoder_only_language_model:
        logits = model.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False, return_dict=True
        ).logits
        if labels is not None:
            num_queries = language_model_inputs.shape[1]
            labels = torch.cat([labels.new_full((labels.shape[0], num_queries), IGNORE_INDEX), labels], dim=1)
            labels = labels[:, 1:]  # next-token targets
            logits_for_loss = logits[:, :-1, :]
    else:
        # labels make the LM build decoder_input_ids (labels shifted right); its own loss is unused
        logits = model.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, use_cache=False, return_dict=True
        ).logits
        logits_for_loss = logits
    loss = token_cross_entropy(logits_for_loss, labels, reduction) if labels is not None else None
    return ForwardOutput(
        loss=loss, logits=logits, query_output=query_output, language_model_inputs=language_model_inputs
    )


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over non-ignored targets, computed in fp32 (as the libraries do)."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.to(logits.device).reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


@torch.no_grad()
def answer_log_likelihood(model, batch: dict) -> torch.Tensor:
    """Per row (B,): the summed log-probability (nats) of its answer tokens given image and prompt.

    Rank scoring of multiple-choice options (InstructBLIP's ScienceQA / IconQA evaluation, Dai et
    al. 2023, sec. 3.3: each candidate answer's likelihood under the model, the highest chosen):
    a training batch whose answers are the candidates, scored with the loss's own alignment.
    """
    batch_size = batch["input_ids"].shape[0]
    token_losses = custom_forward(model, batch, reduction="none").loss  # 0 at ignored positions
    return -token_losses.view(batch_size, -1).sum(dim=1)


def target_count(batch: dict) -> int:
    """Number of tokens the loss is taken over (decoder-only targets are shifted by one, not lost:
    the first text position is always a prompt token)."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


def generation_inputs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_embeds, attention_mask) for the language model's generate().

    A decoder-only prompt batch is left-padded (inputs.Collator.prompts), so after the query
    tokens are prepended the padding sits between them and the prompt. It is moved to the front
    of each row: generate() numbers positions from the attention mask, which then gives every
    query and prompt token the position it had in training, and a release that numbers them
    0, 1, ... regardless shifts a whole row alike (relative positions, as in RoPE, unchanged).
    """
    model = compat.unwrap(model)
    inputs_embeds, attention_mask, _, _ = embed_inputs(model, batch)
    if model.config.use_decoder_only_language_model:
        order = torch.argsort(attention_mask, dim=1, stable=True)  # padding (0) first, the rest in order
        inputs_embeds = inputs_embeds.gather(1, order.unsqueeze(-1).expand_as(inputs_embeds))
        attention_mask = attention_mask.gather(1, order)
    return inputs_embeds, attention_mask


@torch.no_grad()
def generate(model, batch: dict, max_new_tokens: int = 8, num_beams: int = 1, length_penalty: float = 1.0):
    """Answers by the language model's own generate() on the custom inputs_embeds: greedy, or beam
    search with ``num_beams`` > 1 (``length_penalty``: transformers' exponent on the answer length).

    ``batch`` holds the prompts only (inputs.Collator.prompts); the result holds the new tokens only.
    """
    inputs_embeds, attention_mask = generation_inputs(model, batch)
    return compat.unwrap(model).language_model.generate(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=num_beams,
        length_penalty=length_penalty,
    )
