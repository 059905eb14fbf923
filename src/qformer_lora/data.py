"""Data: manifests, processors and datasets.

Everything a training step needs between "a JSONL file on disk" and "a dict of
tensors", and nothing else. Read top to bottom:

1. ``read_manifest``   JSONL -> validated ``Sample`` list (``ManifestError`` on bad input)
2. ``build_processor`` offline InstructBLIP/BLIP-2 processor (local checkpoint or the shipped tokenizers)
3. ``ManifestDataset`` samples -> ``Example`` (image, instruction, answer, id); images decoded by
   ``images.load_image`` (``ImageLoadError`` on bad files)

Examples become tensors in inputs.py (``Collator``), the one builder of model inputs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from PIL import Image

from . import compat
from .images import ImageLoadError, load_image
from .presets import RESOURCES_DIR  # the one place that locates the shipped data

SHAPES_DIR = RESOURCES_DIR / "data" / "shapes"
LM_TOKENIZER_DIR = RESOURCES_DIR / "tokenizers" / "lm"
QFORMER_TOKENIZER_DIR = RESOURCES_DIR / "tokenizers" / "qformer"

FAMILIES = ("instructblip", "blip2")


# --------------------------------------------------------------------------- 1. manifests


class ManifestError(ValueError):
    """A manifest line is unusable; the message names file, line and field."""


class ImageRef(Protocol):
    """An image that is not a file of its own (e.g. bytes inside a dataset): ``load()`` decodes it.

    Implementations must pickle small (DataLoader workers receive the dataset pickled): a
    reference reopened in the worker, never the decoded image or its bytes."""

    def load(self, draft_size: int | None = None) -> Image.Image: ...


@dataclass(frozen=True)
class Sample:
    """One (image, instruction, answer) training sample; the fields after ``manifest`` are optional.

    Other formats than the JSONL manifest (``qformer_lora.formats``) fill in what they know:
    every reference answer, the options of a multiple-choice question, where the record was.
    """

    id: str
    image_path: Path  # resolved, inside image_root and existing at read time (image_ref: the dataset's path)
    instruction: str
    answer: str
    line: int  # 1-based line in the manifest (other formats: 1-based record number), for error messages
    manifest: Path  # the manifest (or annotation / dataset file) it came from, likewise
    answers: tuple[str, ...] = ()  # every reference answer (VQAv2's ten, all COCO captions of the image)
    choices: tuple[str, ...] = ()  # a multiple-choice question's options (ScienceQA), for rank scoring
    answer_index: int | None = None  # the index of ``answer`` in ``choices``
    image_ref: ImageRef | None = None  # an image embedded in a dataset; None: the file at image_path
    record: str = ""  # where in ``manifest`` for error messages when not a line, e.g. "row 3", "question 42"


REQUIRED_KEYS = ("image", "instruction", "answer")
OPTIONAL_KEYS = ("id",)


def shapes_subset(directory: str | Path, split: str, n: int) -> Path:
    """The first ``n`` samples of the shipped shapes manifest ``split`` ("train" / "val"), written to
    ``directory/<split>-subset.jsonl`` (image paths stay relative to SHAPES_DIR): a run of a few steps
    for reproduce's items and the tests."""
    lines = (SHAPES_DIR / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    path = Path(directory) / f"{split}-subset.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def read_manifest(path: str | Path, image_root: str | Path | None = None) -> list[Sample]:
    """Read and validate a JSONL manifest.

    Each non-blank line is an object with ``image`` (a path relative to
    ``image_root``), ``instruction`` and ``answer`` (non-empty strings) and an
    optional ``id`` (default ``"<manifest-stem>:<line>"``). ``image_root``
    defaults to the manifest's directory. Every problem raises
    ``ManifestError`` naming ``file:line`` and the field, so a bad line in a
    large manifest is found without bisecting.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    # Resolve the root once so containment is checked against the real
    # directory (a symlinked root is fine; symlinks *out of* it are not).
    root_resolved = root.resolve()

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read manifest: {exc}") from exc
    except UnicodeDecodeError as exc:  # a manifest is UTF-8 JSON lines (RFC 8259); say where it is not
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ManifestError(f"{path}:{line}: not UTF-8 (byte {exc.start}: {exc.reason})") from None

    samples: list[Sample] = []
    first_line_of_id: dict[str, int] = {}
    for line_no, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue  # blank lines (e.g. a trailing newline) carry no sample
        where = f"{path}:{line_no}"

        record = _manifest_record(raw, where)
        image_path = _resolve_inside(root, root_resolved, record["image"], where)

        sample_id = record.get("id", f"{path.stem}:{line_no}")
        if sample_id in first_line_of_id:
            raise ManifestError(
                f"{where}: field 'id': duplicate id {sample_id!r} (first used on line {first_line_of_id[sample_id]})"
            )
        first_line_of_id[sample_id] = line_no

        samples.append(Sample(sample_id, image_path, record["instruction"], record["answer"], line_no, path))

    if not samples:
        raise ManifestError(f"{path}: manifest contains no samples")
    return samples


def _manifest_record(raw: str, where: str) -> dict:
    """One manifest line as a checked dict; ManifestError naming ``where`` (file:line) and the field."""
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{where}: malformed JSON: {exc.msg} (column {exc.colno})") from exc
    if not isinstance(record, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(record).__name__}")
    # Unknown keys are rejected rather than ignored: a typo such as
    # "answers" would otherwise silently train on nothing.
    for key in record:
        if key not in REQUIRED_KEYS and key not in OPTIONAL_KEYS:
            allowed = ", ".join(REQUIRED_KEYS + OPTIONAL_KEYS)
            raise ManifestError(f"{where}: field '{key}': unknown key (allowed: {allowed})")
    for key in REQUIRED_KEYS:
        if key not in record:
            raise ManifestError(f"{where}: field '{key}': missing required key")
    for key in (*REQUIRED_KEYS, *(k for k in OPTIONAL_KEYS if k in record)):
        value = record[key]
        if not isinstance(value, str):
            raise ManifestError(f"{where}: field '{key}': expected a string, got {type(value).__name__}")
        if not value.strip():
            raise ManifestError(f"{where}: field '{key}': must not be empty or whitespace")
    return record


def _resolve_inside(root: Path, root_resolved: Path, rel: str, where: str) -> Path:
    """Resolve an image path, refusing anything outside the image root.

    A manifest is data, possibly from elsewhere; it must not be able to make
    the trainer read arbitrary files. Absolute paths are refused outright;
    relative ones are resolved (following ``..`` and symlinks) and must land
    inside the resolved root.
    """
    candidate = Path(rel)
    if candidate.is_absolute() or candidate.anchor:
        raise ManifestError(
            f"{where}: field 'image': absolute path {rel!r} not allowed (use a path relative to {root})"
        )
    resolved = (root / candidate).resolve()
    if not resolved.is_relative_to(root_resolved):
        raise ManifestError(
            f"{where}: field 'image': path {rel!r} escapes the image root {root_resolved} (-> {resolved})"
        )
    if not resolved.is_file():
        raise ManifestError(f"{where}: field 'image': image file {resolved} does not exist or is not a file")
    return resolved


# --------------------------------------------------------------------------- 2. processors


def build_processor(family: str, checkpoint_dir: str | Path | None = None, image_size: int = 224) -> Any:
    """Build the transformers processor for ``family`` without touching a hub.

    With ``checkpoint_dir``: ``InstructBlipProcessor``/``Blip2Processor``
    ``.from_pretrained(checkpoint_dir)`` from that local directory
    (``image_size`` is then ignored: the checkpoint's image processor decides).
    Without it: a ``BlipImageProcessor`` of ``image_size`` x ``image_size`` plus
    the fixture tokenizers in ``resources/tokenizers/``.

    Callers use ``processor.image_processor``, ``processor.tokenizer`` and
    ``processor.qformer_tokenizer`` directly, never ``processor(text=...)``:
    recent releases insert ``<image>`` placeholder tokens there, which our
    forward does not want. ``num_query_tokens`` is not passed because older
    releases do not accept it.
    """
    from transformers import AutoTokenizer, Blip2Processor, InstructBlipProcessor

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    cls = InstructBlipProcessor if family == "instructblip" else Blip2Processor

    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        # Checked here because from_pretrained would take a missing path for
        # a hub repo id and try the network.
        if not checkpoint_dir.is_dir():
            raise FileNotFoundError(f"checkpoint directory {checkpoint_dir} does not exist")
        return compat.load_processor(cls, checkpoint_dir)  # also a 5.x-saved directory on 4.x

    image_processor = _blip_image_processor(image_size)
    tokenizer = AutoTokenizer.from_pretrained(str(LM_TOKENIZER_DIR), local_files_only=True)
    if family == "instructblip":
        qformer_tokenizer = AutoTokenizer.from_pretrained(str(QFORMER_TOKENIZER_DIR), local_files_only=True)
        return cls(image_processor=image_processor, tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer)
    return cls(image_processor=image_processor, tokenizer=tokenizer)


def _blip_image_processor(image_size: int) -> Any:
    # transformers 5 splits BlipImageProcessor into a torchvision backend and
    # a PIL one, and warns when it falls back because torchvision is absent.
    # Asking for the PIL one directly gives the same result without the
    # warning; older releases only have BlipImageProcessor (PIL-based).
    import transformers

    cls = getattr(transformers, "BlipImageProcessorPil", None) or transformers.BlipImageProcessor
    return cls(size={"height": image_size, "width": image_size}, do_resize=True, do_normalize=True, do_convert_rgb=True)


# --------------------------------------------------------------------------- 3. dataset


class Example(NamedTuple):
    """One raw sample as the collator receives it."""

    image: Image.Image
    instruction: str
    answer: str
    id: str


class ManifestDataset(torch.utils.data.Dataset):
    """Samples -> ``Example``; images are loaded lazily, one per access.

    ``draft_size``: JPEGs are decoded in Pillow's draft mode down to this many pixels a side
    (``images.load_image``; ``--image-decode draft``); None decodes in full.
    """

    def __init__(self, samples: Sequence[Sample], draft_size: int | None = None):
        self.samples = list(samples)
        self.draft_size = draft_size

    @classmethod
    def from_manifest(cls, path: str | Path, image_root: str | Path | None = None) -> ManifestDataset:
        return cls(read_manifest(path, image_root))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Example:
        s = self.samples[index]
        try:
            if s.image_ref is None:
                image = load_image(s.image_path, draft_size=self.draft_size)
            else:
                image = s.image_ref.load(draft_size=self.draft_size)
        except ImageLoadError as err:  # images are decoded lazily: name the manifest line that gave the path
            where = f"{s.manifest}: {s.record}" if s.record else f"{s.manifest}:{s.line}"
            raise ImageLoadError(f"{where}: field 'image': {err}") from None
        return Example(image, s.instruction, s.answer, s.id)


class ShapesDataset(ManifestDataset):
    """The committed shapes fixture (``resources/data/shapes/{split}.jsonl``)."""

    def __init__(self, split: str = "train"):
        super().__init__(read_manifest(SHAPES_DIR / f"{split}.jsonl", SHAPES_DIR))
