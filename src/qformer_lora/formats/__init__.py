"""Dataset formats people already have -> ``data.Sample`` lists (README "Your data").

``read(path, data_format="auto", image_root=None, split=None)`` reads one of:

========== ================================================================================
jsonl      this project's JSONL manifest (``data.read_manifest``)
llava      LLaVA conversation JSON (one sample per human/gpt pair)
hf         a Hugging Face ``datasets`` dataset on local disk (needs qformer-lora[datasets])
coco       COCO Captions (one sample per caption, every caption kept in ``answers``)
vqav2      VQAv2 questions + annotations (answer = multiple_choice_answer, the ten kept)
scienceqa  ScienceQA ``problems.json`` (options in the instruction; choices kept)
========== ================================================================================

Each module's docstring gives its layout and mapping. ``detect(path)`` names the format from
the path alone where it can, in this order:

1. a folder -> ``hf`` (a save_to_disk folder, an imagefolder, a folder of parquet/arrow/jsonl);
2. ``*.parquet``, ``*.arrow``, ``metadata.jsonl`` -> ``hf``;
3. ``*.jsonl`` -> ``hf`` (a JSON-lines table) when its first record names the instruction
   ``question``, ``prompt`` or ``query`` and not ``instruction``, else ``jsonl`` (our manifest);
4. ``*.json`` by its official name: ``v2_OpenEnded_mscoco_*_questions.json`` /
   ``v2_mscoco_*_annotations.json`` -> ``vqav2``, ``captions_*.json`` -> ``coco``,
   ``problems.json`` -> ``scienceqa``, ``llava*.json`` -> ``llava``;
5. any other ``*.json`` by its content (the file is parsed once more): a list of records with
   ``conversations`` -> ``llava``; an object with ``images`` and ``annotations`` -> ``coco``, with
   ``questions`` -> ``vqav2``; an object of objects with ``choices`` -> ``scienceqa``.

Anything else is a FormatError listing these rules; name the format (``--data-format``) to
skip detection. ``split`` picks the split of a source that holds several (a DatasetDict,
ScienceQA's problems.json); a file of one split ignores it.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import data
from . import coco, hf, jsonl, llava, scienceqa, vqav2
from .common import FormatError, load_json

FORMATS = {"jsonl": jsonl, "llava": llava, "hf": hf, "coco": coco, "vqav2": vqav2, "scienceqa": scienceqa}
AUTO = "auto"
CHOICES = (AUTO, *FORMATS)  # --data-format's values

__all__ = ["AUTO", "CHOICES", "FORMATS", "FormatError", "detect", "read"]


def read(
    path: str | Path, data_format: str = AUTO, image_root: str | Path | None = None, split: str | None = None
) -> list[data.Sample]:
    """The samples of ``path`` in ``data_format`` (``auto``: ``detect(path)``).

    ``image_root``: where the records' images are (default: each format's official place, see its
    module). ``split``: the split to read from a source of several ("train", "val", ...).
    Raises FormatError / data.ManifestError naming the file, the record and the field."""
    if data_format not in CHOICES:
        raise FormatError(f"{path}: unknown data format {data_format!r}; expected one of {', '.join(CHOICES)}")
    name = detect(path) if data_format == AUTO else data_format
    return FORMATS[name].read(Path(path), image_root, split)


def detect(path: str | Path) -> str:
    """The format of ``path`` by the rules of the module docstring; FormatError if none applies."""
    path = Path(path)
    if path.is_dir():
        return "hf"
    if not path.is_file():
        raise FormatError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".arrow") or path.name in hf.METADATA_FILES:
        return "hf"
    if suffix == ".jsonl":
        return "jsonl" if _is_manifest(path) else "hf"
    if suffix == ".json":
        return _by_name(path) or _by_content(path)
    raise FormatError(_undetected(path, "its name"))


def _is_manifest(path: Path) -> bool:
    """Whether a JSON-lines file is our manifest rather than a ``datasets`` table: its first record does
    not name the instruction by another of hf's column names (anything else, a typo or a line that
    does not parse included, is left to read_manifest, which names the line and the problem)."""
    with path.open(encoding="utf-8", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return True
    others = set(hf.INSTRUCTION_COLUMNS) - {"instruction"}
    return not (isinstance(record, dict) and "instruction" not in record and others & set(record))


def _by_name(path: Path) -> str | None:
    if vqav2.QUESTIONS.fullmatch(path.name) or vqav2.ANNOTATIONS.fullmatch(path.name):
        return "vqav2"
    if coco.NAME.fullmatch(path.name):
        return "coco"
    if path.name == "problems.json":
        return "scienceqa"
    if path.name.startswith("llava"):
        return "llava"
    return None


def _by_content(path: Path) -> str:
    document = load_json(path)
    if isinstance(document, list) and document and isinstance(document[0], dict) and "conversations" in document[0]:
        return "llava"
    if isinstance(document, dict):
        if "images" in document and "annotations" in document:
            return "coco"
        if "questions" in document:
            return "vqav2"
        first = next(iter(document.values()), None)
        if isinstance(first, dict) and "choices" in first:
            return "scienceqa"
    raise FormatError(_undetected(path, "its name or content"))


def _undetected(path: Path, by: str) -> str:
    return (
        f"{path}: cannot tell the data format from {by}; name it with --data-format "
        f"({', '.join(FORMATS)}). Detected: a folder, *.parquet, *.arrow, metadata.jsonl -> hf; "
        "*.jsonl -> jsonl (our manifest) or hf; *.json by name (v2_OpenEnded_mscoco_*_questions.json -> vqav2, "
        "captions_*.json -> coco, problems.json -> scienceqa, llava*.json -> llava) or by content"
    )
