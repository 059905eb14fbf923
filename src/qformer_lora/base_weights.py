"""The weight files of a local base checkpoint: which layout, whether they may be loaded, conversion.

Hub checkpoints of InstructBLIP / BLIP-2 come in four weight layouts: one ``model.safetensors``;
safetensors shards with ``model.safetensors.index.json``; one ``pytorch_model.bin``; ``.bin``
shards with ``pytorch_model.bin.index.json`` (the 2023 repositories; some carry ``.bin`` only).
A ``.bin`` file is a pickle. It is read here only with torch's ``weights_only`` unpickler, which
rebuilds tensors and refuses any other object without running it, and handed to transformers only
where transformers reads it the same way (``compat.bin_weights_unsafe_reason``); otherwise it is
refused with the conversion command below. Nothing here fully unpickles a file.

Convert a ``.bin`` checkpoint to safetensors (reads with weights_only=True, writes the shards and an
index, copies the other files)::

    python -m qformer_lora.base_weights SRC_DIR OUT_DIR
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import compat, jsonio

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
CONVERT_COMMAND = "python -m qformer_lora.base_weights {src} {src}-safetensors"


class WeightsError(ValueError):
    """A checkpoint's weight files are missing, inconsistent or unsafe to load (the message names the file)."""


def layout(directory: str | os.PathLike) -> dict:
    """The weight layout of ``directory``, as transformers picks it (safetensors before .bin).

    Returns {"format": "safetensors" | "bin", "sharded": bool, "index": file name or None,
    "files": [weight file names], "bytes": their total size}. Raises WeightsError when there
    are no weights, or when an index names a shard that is not there (naming both)."""
    directory = Path(directory)
    for fmt, single, index in (("safetensors", SAFETENSORS, SAFETENSORS_INDEX), ("bin", BIN, BIN_INDEX)):
        if (directory / index).is_file():
            files = sorted(set(_weight_map(directory / index).values()))
            missing = [f for f in files if not (directory / f).is_file()]
            if missing:
                raise WeightsError(f"{directory / index}: names shard(s) {missing} that are not in {directory}")
            return _described(directory, fmt, True, index, files)
        if (directory / single).is_file():
            return _described(directory, fmt, False, None, [single])
    raise WeightsError(
        f"{directory}: no weights ({SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} or {BIN_INDEX}); "
        f"expected a saved InstructBLIP / BLIP-2 checkpoint directory"
    )


def _described(directory: Path, fmt: str, sharded: bool, index: str | None, files: list[str]) -> dict:
    size = sum((directory / f).stat().st_size for f in files)
    return {"format": fmt, "sharded": sharded, "index": index, "files": files, "bytes": size}


def _weight_map(index_file: Path) -> dict:
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
    except json.JSONDecodeError as err:
        raise WeightsError(f"{index_file}:{err.lineno}: invalid JSON: {err.msg}") from err
    except (KeyError, TypeError):
        raise WeightsError(f"{index_file}: field 'weight_map' (tensor name -> shard file) is missing") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(f"{index_file}: field 'weight_map' must map tensor names to shard file names")
    return weight_map


def read_bin(path: str | os.PathLike, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of one ``.bin`` file, read with ``torch.load(weights_only=True)``.

    Raises WeightsError naming the file when it holds anything but a dict of tensors (a pickled
    object is refused by the weights_only unpickler before it is built, so nothing in it runs)."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message wraps the one line that names what the file asked for ("Unsupported global:
        # GLOBAL posix.system ...") in advice to pass weights_only=False, which is not ours to give
        lines = [line for line in str(err).splitlines() if "GLOBAL" in line or "global" in line]
        raise WeightsError(
            f"{path}: not a plain tensor file, refused without unpickling it "
            f"({lines[0].strip() if lines else type(err).__name__}); "
            f"if you trust it, convert it to safetensors yourself"
        ) from None
    except (RuntimeError, EOFError) as err:
        raise WeightsError(f"{path}: unreadable as torch weights: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a dict of tensor name -> tensor, found {type(state).__name__}")
    return state


def check_loadable(directory: str | os.PathLike) -> dict:
    """:func:`layout` of ``directory``, after making sure transformers may read its weights.

    ``.bin`` weights: refused with the conversion command where the installed transformers would
    unpickle them without weights_only; elsewhere each shard is read once with weights_only=True
    on the meta device (no tensor data is loaded), so a file holding other objects is refused here,
    named, before transformers opens it."""
    found = layout(directory)
    if found["format"] != "bin":
        return found
    unsafe = compat.bin_weights_unsafe_reason()
    if unsafe is not None:
        raise WeightsError(
            f"{directory}: .bin weights only ({', '.join(found['files'])}), and {unsafe}: refused rather "
            f"than unpickled. Convert them to safetensors: {CONVERT_COMMAND.format(src=directory)}"
        )
    for name in found["files"]:
        read_bin(Path(directory) / name, map_location="meta")
    return found


def to_safetensors(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write ``src`` (a .bin checkpoint) to the new directory ``out`` with safetensors weights.

    One safetensors shard per .bin shard and model.safetensors.index.json (or one model.safetensors);
    every non-weight file is copied. Staged in ``out``.tmp and renamed, so a failure leaves no
    ``out``. Tensors sharing storage (tied embeddings) are copied apart, as safetensors requires."""
    src, out = Path(src), Path(out)
    found = layout(src)
    if found["format"] != "bin":
        raise WeightsError(f"{src}: already has safetensors weights ({', '.join(found['files'])})")
    if out.exists():
        raise WeightsError(f"{out}: already exists; name a new directory")
    stage = out.with_name(out.name + ".tmp")
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(src, stage, ignore=shutil.ignore_patterns("*.bin", BIN_INDEX))
    weight_map, total = {}, 0
    for i, name in enumerate(found["files"], start=1):
        tensors = {k: v.contiguous().clone() for k, v in read_bin(src / name).items()}
        shard = f"model-{i:05d}-of-{len(found['files']):05d}.safetensors" if found["sharded"] else SAFETENSORS
        save_file(tensors, str(stage / shard), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, shard)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if found["sharded"]:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (stage / SAFETENSORS_INDEX).write_text(jsonio.dumps(index, indent=2) + "\n", encoding="utf-8")
    os.replace(stage, out)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    try:
        print(to_safetensors(*args))
    except (WeightsError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
