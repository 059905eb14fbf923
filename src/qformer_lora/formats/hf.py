"""A Hugging Face ``datasets`` dataset on local disk -> Samples, read through the ``datasets`` library.

Sources (``datasets`` parses every one of them; nothing here reads their bytes):

* a ``save_to_disk`` directory (``state.json`` or ``dataset_dict.json``): ``load_from_disk``;
* ``*.parquet`` / ``*.arrow`` / ``*.jsonl`` files, or a folder of them: ``load_dataset("parquet" |
  "arrow" | "json", data_files=... | data_dir=...)``;
* an imagefolder (``metadata.jsonl`` beside the images, in the folder or in one folder per split)
  or its ``metadata.jsonl``: ``load_dataset("imagefolder", data_dir=...)``.

``load_dataset`` converts files into its cache once (``HF_DATASETS_CACHE``); later reads, and
DataLoader workers, reuse it. A source of several splits gives the one ``split`` names
(``val`` also matches ``validation``...); a single split is taken whatever its name.

Columns: the image is the column named in ``IMAGE_COLUMNS`` (first found), else the one column
of the ``datasets.Image`` type; instruction and answer are the first of ``INSTRUCTION_COLUMNS``
/ ``ANSWER_COLUMNS`` present. A string image column holds paths relative to the image root
(default: the file's folder, or the dataset folder); an ``Image`` column holds either a file
path (an imagefolder) or the encoded bytes (parquet from the Hub, ``save_to_disk``). Bytes stay
in the dataset: the Sample gets an ``HFImage`` reference (source, row, column) that reopens the
dataset in the process that loads it, so DataLoader workers receive a few strings, not images.
Mapping: instruction and answer as they are; id = ``<file or folder name>[/<split>]:<row>`` (0-based).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import data
from .common import FormatError, ImageRoot, pick_split

IMAGE_COLUMNS = ("image", "image_path", "img")
INSTRUCTION_COLUMNS = ("instruction", "question", "prompt", "query")
ANSWER_COLUMNS = ("answer", "response", "output", "caption", "text")
FILE_KINDS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json"}
SAVED_MARKERS = ("state.json", "dataset_dict.json")  # what save_to_disk writes
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")  # an imagefolder's


def require_datasets(path: Path):
    """The ``datasets`` module; FormatError saying how to install it when it is missing."""
    try:
        import datasets
    except ImportError:
        raise FormatError(
            f"{path}: reading a Hugging Face dataset needs the `datasets` library: pip install 'qformer-lora[datasets]'"
        ) from None
    return datasets


@dataclass(frozen=True)
class Source:
    """How to (re)open one split of a local dataset: what ``datasets`` call, on which path."""

    kind: str  # "disk" (load_from_disk) or a load_dataset builder: parquet, arrow, json, imagefolder
    location: str  # the file or folder, absolute
    split: str | None = None  # the split's name in a DatasetDict; None: the source is one Dataset

    def open(self) -> Any:
        """The ``datasets.Dataset`` of this split."""
        loaded = _load(self.kind, Path(self.location))
        return loaded if self.split is None else loaded[self.split]


_OPENED: dict[Source, Any] = {}  # per process: each worker opens a source once, memory-mapped


def opened(source: Source) -> Any:
    """``source`` opened, in arrow format (rows as zero-copy tables), once per process."""
    if source not in _OPENED:
        _OPENED[source] = source.open().with_format("arrow")
    return _OPENED[source]


@dataclass(frozen=True)
class HFImage:
    """An image stored as bytes in a dataset: (source, row, column); ``load()`` decodes it as RGB.

    Pickles as these few fields; the dataset is reopened (memory-mapped, not read) by ``load``."""

    source: Source
    row: int
    column: str

    def load(self, draft_size: int | None = None):
        cell = opened(self.source)[self.row].column(self.column)[0].as_py()
        try:
            return data.load_image(io.BytesIO(cell["bytes"]), draft_size=draft_size)
        except data.ImageLoadError as err:
            raise data.ImageLoadError(
                f"{self.source.location}: row {self.row}: column {self.column!r}: {err}"
            ) from None


def read(path: str | Path, image_root: str | Path | None = None, split: str | None = None) -> list[data.Sample]:
    """Samples of a local dataset (module docstring), one per row.

    Raises FormatError (a data.ManifestError) naming the file, the row and the column on bad input."""
    datasets = require_datasets(Path(path))
    source, dataset = open_split(Path(path), split)
    table = _OPENED[source] = dataset.with_format("arrow")
    where = source.location + (f" (split {source.split!r})" if source.split else "")
    image_column = _image_column(dataset.features, datasets.Image, where)
    instructions = _texts(table, _column(dataset.column_names, INSTRUCTION_COLUMNS, "instruction", where), where)
    answers = _texts(table, _column(dataset.column_names, ANSWER_COLUMNS, "answer", where), where)
    location = Path(source.location)
    root = ImageRoot(
        image_root if image_root is not None else (location if location.is_dir() else location.parent), "image root"
    )
    images = _images(
        source, table, image_column, isinstance(dataset.features[image_column], datasets.Image), root, where
    )
    if not images:
        raise FormatError(f"{where}: no rows")
    name = location.name + (f"/{source.split}" if source.split else "")
    return [
        data.Sample(
            f"{name}:{row}", image_path, instruction, answer, row + 1, location, image_ref=ref, record=f"row {row}"
        )
        for row, ((image_path, ref), instruction, answer) in enumerate(zip(images, instructions, answers))
    ]


def open_split(path: Path, split: str | None) -> tuple[Source, Any]:
    """(the Source of the split to read, that split's ``datasets.Dataset``) for a path (module docstring)."""
    datasets = require_datasets(path)
    saved = path.is_dir() and any((path / m).is_file() for m in SAVED_MARKERS)
    kind = "disk" if saved else _builder(path)
    location = path.parent if path.name in METADATA_FILES else path
    loaded = _load(kind, location)
    chosen = None
    if isinstance(loaded, datasets.DatasetDict):
        chosen = pick_split(list(loaded), split, str(path))
        loaded = loaded[chosen]
    return Source(kind, str(location.resolve()), chosen), loaded


def _load(kind: str, location: Path) -> Any:
    """``load_from_disk`` or ``load_dataset(kind, ...)`` of ``location``; FormatError naming it on failure."""
    datasets = require_datasets(location)
    try:
        if kind == "disk":
            return datasets.load_from_disk(str(location))
        where = {"data_dir": str(location)} if location.is_dir() else {"data_files": str(location)}
        return datasets.load_dataset(kind, **where)
    except (ValueError, FileNotFoundError, datasets.builder.DatasetGenerationError) as err:
        raise FormatError(f"{location}: datasets cannot read it as {kind}: {err}") from err


def _builder(path: Path) -> str:
    """The load_dataset builder for a file or folder that is not a save_to_disk directory."""
    if path.is_file():
        if path.name in METADATA_FILES:
            return "imagefolder"
        if path.suffix in FILE_KINDS:
            return FILE_KINDS[path.suffix]
        raise FormatError(f"{path}: not a dataset file (expected {', '.join(FILE_KINDS)} or {METADATA_FILES[0]})")
    if not path.is_dir():
        raise FormatError(f"{path}: no such file or folder")
    near = [*path.iterdir(), *(q for d in path.iterdir() if d.is_dir() for q in d.iterdir())]
    if any(p.name in METADATA_FILES for p in near):
        return "imagefolder"
    for suffix in sorted({p.suffix for p in near} & set(FILE_KINDS)):
        return FILE_KINDS[suffix]
    raise FormatError(
        f"{path}: no dataset here (looked for {', '.join(SAVED_MARKERS)}, {', '.join(METADATA_FILES)} and "
        f"{', '.join('*' + s for s in FILE_KINDS)} files, in the folder and one level below; a folder is read as a "
        "Hugging Face dataset: for another format name its file)"
    )


def _column(columns: list[str], candidates: tuple[str, ...], what: str, where: str) -> str:
    for name in candidates:
        if name in columns:
            return name
    raise FormatError(f"{where}: no {what} column (looked for {', '.join(candidates)}; columns: {', '.join(columns)})")


def _image_column(features: dict, image_type: type, where: str) -> str:
    for name in IMAGE_COLUMNS:
        if name in features:
            return name
    typed = [name for name, feature in features.items() if isinstance(feature, image_type)]
    if len(typed) == 1:
        return typed[0]
    raise FormatError(
        f"{where}: no image column (looked for {', '.join(IMAGE_COLUMNS)}, or the one column of type Image; "
        f"columns: {', '.join(features)})"
    )


def _texts(table: Any, column: str, where: str) -> list[str]:
    """The column's values, each checked to be a non-blank string."""
    values = table[column].to_pylist()
    for row, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            raise FormatError(f"{where}: row {row}: column {column!r}: expected a non-empty string, got {value!r:.60}")
    return values


def _images(source: Source, table: Any, column: str, typed: bool, root: ImageRoot, where: str) -> list:
    """Per row (file path, None) for an image file, (dataset path, HFImage) for bytes in the dataset."""
    values = table[column]
    if not typed:  # a string column: paths relative to the image root
        if not all(isinstance(v, str) for v in values.to_pylist()):
            raise FormatError(
                f"{where}: column {column!r}: expected an Image column or string paths, got {values.type}"
            )
        return [
            (root.resolve(rel, f"{where}: row {row}: column {column!r}"), None)
            for row, rel in enumerate(values.to_pylist())
        ]
    found, row = [], 0
    for chunk in getattr(values, "chunks", [values]):  # a ChunkedArray, or one Array on older releases
        embedded = chunk.field("bytes").is_valid().to_pylist()  # no image bytes leave the memory map
        for present, has_bytes, file in zip(chunk.is_valid().to_pylist(), embedded, chunk.field("path").to_pylist()):
            at = f"{where}: row {row}: column {column!r}"
            if present and has_bytes:
                found.append((Path(source.location), HFImage(source, row, column)))
            elif present and file:  # an image file the dataset points to (an imagefolder): inside the root
                found.append(
                    (root.resolve(os.path.relpath(file, root.root) if os.path.isabs(file) else file, at), None)
                )
            else:
                raise FormatError(f"{at}: no image (neither bytes nor a path)")
            row += 1
    return found
