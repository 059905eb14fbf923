"""LLaVA-style conversation JSON -> Samples.

The layout of LLaVA's instruction data (``llava_v1_5_mix665k.json``, ``llava_instruct_150k.json``;
github.com/haotian-liu/LLaVA, docs/Finetune_Custom_Data.md): one JSON list of records ::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

``image`` is relative to the image root (default: the JSON file's directory, as LLaVA's
``--image_folder`` next to its data file). Mapping:

* every (human, gpt) pair of turns is one sample: instruction = the human turn with the
  ``<image>`` token (and the whitespace around it) removed, answer = the gpt turn;
  id = ``<record id>:<pair index>`` (``#<record number>`` is added after the record id when an
  earlier record had the same id: LLaVA-Instruct-150K reuses the COCO image id for up to three
  records).
  Why every pair and not the first only: a multi-turn record is several questions about one image,
  and the later ones are training data too. Why without the earlier turns in the instruction: the
  model sees the image in every sample, most follow-up questions stand alone, and the collator
  truncates long prompts keeping their beginning, so a prepended history would cut off the very
  question being answered.
* records without ``image`` (LLaVA mixes in text-only ShareGPT conversations) are skipped, with
  one warning counting them: this model always conditions on an image.

Turns must alternate human, gpt, starting with human and ending with gpt; anything else is an
error naming the file, the record and the turn.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from .. import data
from .common import FormatError, ImageRoot, field, load_json, records

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_AND_SPACE = re.compile(r"\s*" + re.escape(IMAGE_TOKEN) + r"\s*")  # "<image>\nWhat ..." -> "What ..."
ROLES = ("human", "gpt")  # the roles of the (question, answer) turns, in that order


def read(path: str | Path, image_root: str | Path | None = None, split: str | None = None) -> list[data.Sample]:
    """Samples of a LLaVA JSON file (one per human/gpt pair); ``split`` is ignored (a file is one split).

    Raises FormatError (a data.ManifestError) naming the file, record and field on bad input."""
    path = Path(path)
    root = ImageRoot(image_root if image_root is not None else path.parent, f"images of {path.name}")
    samples: list[data.Sample] = []
    seen_ids: set[str] = set()
    entries = records(load_json(path), None, path)
    text_only = 0
    for number, record in enumerate(entries, start=1):
        record_id = field(record, "id", (str, int), f"{path}: record {number}")
        locator = f"record {number} (id {record_id!r})"
        where = f"{path}: {locator}"
        if "image" not in record:
            text_only += 1
            continue
        image_path = root.resolve(field(record, "image", str, where), where)
        label = f"{record_id}" if str(record_id) not in seen_ids else f"{record_id}#{number}"
        seen_ids.add(str(record_id))
        for pair, (instruction, answer) in enumerate(_pairs(record, where)):
            samples.append(
                data.Sample(f"{label}:{pair}", image_path, instruction, answer, number, path, record=locator)
            )
    if text_only:  # stacklevel 3: the caller of formats.read
        warnings.warn(f"{path}: {text_only} of {len(entries)} records have no image and were skipped", stacklevel=3)
    if not samples:
        raise FormatError(f"{path}: no samples (no record with an image and a conversation)")
    return samples


def _pairs(record: dict, where: str) -> list[tuple[str, str]]:
    """The (instruction, answer) pairs of a record's conversation, checked."""
    turns = field(record, "conversations", list, where)
    if not turns:
        raise FormatError(f"{where}: field 'conversations': empty")
    if len(turns) % 2:
        raise FormatError(
            f"{where}: field 'conversations': {len(turns)} turns; expected human/gpt pairs (the last is unanswered)"
        )
    texts = []
    for index, turn in enumerate(turns):
        turn_where = f"{where}: conversations[{index}]"
        role = field(turn, "from", str, turn_where)
        if role != ROLES[index % 2]:
            raise FormatError(f"{turn_where}: field 'from': {role!r}, expected {ROLES[index % 2]!r} (turns alternate)")
        text = field(turn, "value", str, turn_where)
        if role == "human":
            text = IMAGE_TOKEN_AND_SPACE.sub(" ", text).strip()
            if not text:
                raise FormatError(f"{turn_where}: field 'value': nothing but the {IMAGE_TOKEN} token")
        texts.append(text)
    return list(zip(texts[::2], texts[1::2]))
