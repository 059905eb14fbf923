"""COCO Captions -> Samples: one sample per caption, every caption of the image kept for evaluation.

The official layout (cocodataset.org, "2014/2017 Train/Val annotations")::

    coco/annotations/captions_val2014.json   {"images": [{"id", "file_name", ...}],
                                              "annotations": [{"id", "image_id", "caption"}], ...}
    coco/val2014/COCO_val2014_000000000042.jpg

The image folder defaults to ``<folder above annotations/>/<split>`` for a file named
``captions_<split>.json`` in a folder ``annotations`` (otherwise ``<its folder>/<split>``, or its
folder when the name has no split); ``--image-root`` names another.

Mapping, per caption annotation: instruction = ``CAPTION_INSTRUCTION``, answer = the caption
(surrounding whitespace stripped: COCO captions carry stray spaces and newlines),
``answers`` = every caption of that image in file order (for caption metrics later),
id = the annotation id. Images without a caption give no sample.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from .. import data
from .common import FormatError, ImageRoot, field, load_json, records

# InstructBLIP's captioning instruction: one of its caption templates and the one it evaluates
# NoCaps / Flickr30K with (Dai et al. 2023, arXiv:2305.06500, appendix: instruction templates).
CAPTION_INSTRUCTION = "A short image description:"
NAME = re.compile(r"captions_(?P<split>\w+)\.json")


def default_image_root(path: Path) -> Path:
    """Where the official layout puts the images of the annotations file ``path`` (module docstring)."""
    match = NAME.fullmatch(path.name)
    if match is None:
        return path.parent
    base = path.parent.parent if path.parent.name == "annotations" else path.parent
    return base / match["split"]


def read(path: str | Path, image_root: str | Path | None = None, split: str | None = None) -> list[data.Sample]:
    """Samples of a COCO captions file (one per caption); ``split`` is ignored (a file is one split).

    Raises FormatError (a data.ManifestError) naming the file, the image or annotation and the field."""
    path = Path(path)
    document = load_json(path)
    root = ImageRoot(image_root if image_root is not None else default_image_root(path), f"images of {path.name}")
    file_names = _file_names(document, path)
    annotations = _captions(document, path, file_names)
    if not annotations:
        raise FormatError(f"{path}: field 'annotations': no captions")
    answers: dict[int, list[str]] = defaultdict(list)
    for _, _, image_id, caption in annotations:
        answers[image_id].append(caption)
    files: dict[int, Path] = {}  # only images with a caption need to exist
    samples = []
    for number, annotation_id, image_id, caption in annotations:
        if image_id not in files:
            where = f"{path}: image {image_id} (file_name {file_names[image_id]!r})"
            files[image_id] = root.resolve(file_names[image_id], where)
        samples.append(
            data.Sample(
                str(annotation_id),
                files[image_id],
                CAPTION_INSTRUCTION,
                caption,
                number,
                path,
                answers=tuple(answers[image_id]),
                record=f"annotation {number} (id {annotation_id})",
            )
        )
    return samples


def _file_names(document: dict, path: Path) -> dict[int, str]:
    """Image id -> file name, from the ``images`` table; FormatError naming the entry and field."""
    names: dict[int, str] = {}
    for index, image in enumerate(records(document, "images", path)):
        where = f"{path}: images[{index}]"
        image_id = field(image, "id", int, where)
        if image_id in names:
            raise FormatError(f"{where} (id {image_id}): field 'id': duplicate image id")
        names[image_id] = field(image, "file_name", str, f"{where} (id {image_id})")
    return names


def _captions(document: dict, path: Path, file_names: dict[int, str]) -> list[tuple[int, int, int, str]]:
    """(annotation number, annotation id, image id, caption) in file order, checked."""
    found, first = [], {}
    for number, annotation in enumerate(records(document, "annotations", path), start=1):
        where = f"{path}: annotation {number}"
        annotation_id = field(annotation, "id", int, where)
        where = f"{where} (id {annotation_id})"
        if annotation_id in first:
            raise FormatError(f"{where}: field 'id': duplicate id (first used by annotation {first[annotation_id]})")
        first[annotation_id] = number
        image_id = field(annotation, "image_id", int, where)
        if image_id not in file_names:
            raise FormatError(f"{where}: field 'image_id': {image_id} is not in the file's 'images'")
        found.append((number, annotation_id, image_id, field(annotation, "caption", str, where).strip()))
    return found
