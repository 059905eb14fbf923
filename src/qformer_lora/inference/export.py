"""Export: the adapter merged into its base, saved so that plain transformers loads and answers with it.

A directory we write must work with ``AutoProcessor.from_pretrained(dir)`` and
``processor(images=image, text=question, return_tensors="pt")`` as is, then with the model
class's own ``generate``. From transformers 4.45 the processors insert ``num_query_tokens``
image tokens in front of the text and the model overwrites them with the Q-Former's output,
so the saved processor needs (``complete_processor``):

* ``num_query_tokens`` equal to the model config's; a processor built from its parts has
  None there, and the call fails with "can't multiply sequence by non-int of type 'NoneType'";
* the image token in the tokenizer with the id ``config.image_token_index`` (the processor adds
  ``<image>`` at the end of the vocabulary when it is missing, an id the model does not know);
* images resized to ``config.vision_config.image_size``;
* for decoder-only language models, left padding, so a batch's prompts all end where the
  answers start (transformers' advice for batched generation with decoder-only models).

The files are written in the layout older releases read too (``save_processor``,
``compat.make_readable_by_every_release``; which releases were checked is noted there), and
the directory gets a model card (``README.md``, see model_card.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .. import compat
from . import generate, model_card

IMAGE_TOKEN = "<image>"  # what the 4.45+ processors insert, and add to a tokenizer that lacks it


class ExportError(ValueError):
    """A processor and its model disagree in a way that would make the export unusable."""


def complete_processor(processor, config, where: str = "the base checkpoint"):
    """Give ``processor`` what plain transformers needs to feed a model with ``config`` (module doc).

    Sets ``processor.num_query_tokens`` (4.45+ processors save it in processor_config.json) and,
    for decoder-only language models, ``tokenizer.padding_side = "left"`` (tokenizer_config.json;
    the training collator pads by hand and is unaffected) and a tokenizer that adds no special
    tokens (training's prompt convention, inputs.Collator). Checks the image token and the image
    size, and raises ExportError naming ``where`` when they do not fit; a config without
    ``image_token_index`` (checkpoints saved before transformers 4.45) gets the tokenizer's
    image token id when it lies inside the language model's vocabulary, as the hub's own
    InstructBLIP / BLIP-2 repositories were updated. Returns ``processor``.
    """
    tokenizer = processor.tokenizer
    token = str(getattr(processor, "image_token", None) or IMAGE_TOKEN)
    token_id = tokenizer.convert_tokens_to_ids(token)
    known = token_id is not None and token_id != tokenizer.unk_token_id
    if compat.image_token_index(config) is None and known and token_id < config.text_config.vocab_size:
        config.image_token_index = token_id
    if not known or token_id != compat.image_token_index(config):
        shown = token_id if known else "none (not in the vocabulary)"
        raise ExportError(
            f"{where}: the tokenizer's image token {token!r} has id {shown}"
            f" but config.json field 'image_token_index' is {compat.image_token_index(config)}; the processor's "
            f"placeholders would not be replaced by the Q-Former output"
        )
    side = config.vision_config.image_size
    size = processor.image_processor.size
    if (size["height"], size["width"]) != (side, side):
        raise ExportError(
            f"{where}: the image processor resizes to {size['height']} x {size['width']} but config.json field "
            f"'vision_config.image_size' is {side}"
        )
    processor.num_query_tokens = config.num_query_tokens
    if config.use_decoder_only_language_model:
        tokenizer.padding_side = "left"
        _no_special_tokens(tokenizer)
    return processor


def _no_special_tokens(tokenizer) -> None:
    """Training feeds a decoder-only LM its prompt with no special tokens (inputs.Collator.prompt_ids: the
    answer continues the prompt), so the exported tokenizer adds none either: its post-processor would
    append ``</s>`` (or prepend BOS) and the model would see a prompt it never trained on."""
    from tokenizers import processors

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"{type(tokenizer).__name__}: a slow tokenizer; the export needs a fast (tokenizers) one")
    backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])


def save_processor(processor, directory: str | os.PathLike) -> None:
    """``processor.save_pretrained(directory)``, in the layout every checked release reads (compat.py)."""
    processor.save_pretrained(str(directory))
    compat.make_readable_by_every_release(directory)


def export_merged(checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike, device: str = "cpu") -> Path:
    """Merge a training checkpoint's adapter into its base and write a directory plain transformers uses.

    ``out_dir`` (new; FileExistsError if it exists) receives the merged model (PEFT's
    ``merge_and_unload``; safetensors), its completed processor (``complete_processor``) and a
    model card README.md. Written into a temporary sibling and renamed into place, so a failure
    leaves nothing behind. ``device``: where the merge is computed (the files are the same).
    Errors: CheckpointError for a directory that is not a training
    checkpoint, ExportError for a base whose processor does not fit its model.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():  # before loading and merging, which take minutes on a full-size model
        raise FileExistsError(f"{out_dir} already exists; choose a new directory")
    model, processor, family, config = generate.load_trained(checkpoint_path)
    merged = model.to(device).merge_and_unload()  # a full-size merge is faster on a GPU
    merged.to("cpu")  # saved from the host, as loaded: the files do not depend on the device
    complete_processor(processor, merged.config, where=config.get("base_checkpoint") or f"preset {config['preset']}")
    compat.name_text_architecture(merged)  # InstructBLIP's generate reads it on older releases
    card = model_card.card_text(
        model_card.CardFacts.of_run(Path(checkpoint_path), config, merged, family, out_dir.name)
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        merged.save_pretrained(str(staging), safe_serialization=True)
        save_processor(processor, staging)
        (staging / model_card.CARD_FILE).write_text(card, encoding="utf-8")
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
