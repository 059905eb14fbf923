"""Tests for qformer_lora.data's manifests and images, and the fixture generators
(tokenizers, processors and collation: test_collation.py).

Bad inputs are written to tmp_path; the committed fixtures are only read.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

from qformer_lora.data import (
    QFORMER_TOKENIZER_DIR,
    SHAPES_DIR,
    Example,
    ManifestDataset,
    ManifestError,
    ShapesDataset,
    read_manifest,
)
from qformer_lora.images import ImageLoadError, load_image

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = REPO_ROOT / "scripts"
TWO_MB = 2 * 1024 * 1024


# --------------------------------------------------------------------------- helpers


def write_png(path: Path, mode: str = "RGB", colour=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (8, 8), colour).save(path)
    return path


def write_manifest(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An image root containing images/ok.png."""
    write_png(tmp_path / "data" / "images" / "ok.png")
    return tmp_path / "data"


def good(**overrides) -> dict:
    record = {"image": "images/ok.png", "instruction": "What colour is the shape?", "answer": "red"}
    record.update(overrides)
    return record


# --------------------------------------------------------------------------- manifests: happy path


def test_shapes_manifests_read_cleanly():
    train = read_manifest(SHAPES_DIR / "train.jsonl", SHAPES_DIR)
    val = read_manifest(SHAPES_DIR / "val.jsonl", SHAPES_DIR)
    assert (len(train), len(val)) == (192, 48), f"expected 192/48 samples, got {len(train)}/{len(val)}"
    for s in train + val:
        assert s.image_path.is_file() and s.image_path.is_relative_to(SHAPES_DIR.resolve()), s
        assert len(s.answer.split()) == 1, f"answer {s.answer!r} of {s.id} is not a single word"
    assert len({s.id for s in train + val}) == 240, "sample ids are not unique across splits"


def test_manifest_defaults_and_blank_lines(root: Path):
    manifest = write_manifest(root / "mini.jsonl", [good(id="first"), "", good(answer="blue")])
    samples = read_manifest(manifest, root)
    assert [s.id for s in samples] == ["first", "mini:3"], "id should default to '<stem>:<line>'"
    assert [s.line for s in samples] == [1, 3]
    assert samples[1].answer == "blue"
    assert samples[0].image_path == (root / "images" / "ok.png").resolve()
    # image_root defaults to the manifest's directory
    assert read_manifest(manifest)[0].image_path == samples[0].image_path


# --------------------------------------------------------------------------- manifests: bad input


def assert_manifest_error(manifest: Path, root: Path, *fragments: str) -> str:
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest, root)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"error message {message!r} does not mention {fragment!r}"
    return message


def test_malformed_json_names_file_and_line(root: Path):
    manifest = write_manifest(root / "m.jsonl", [good(), '{"image": "images/ok.png", "instruction": '])
    assert_manifest_error(manifest, root, f"{manifest}:2", "malformed JSON")


def test_non_object_line(root: Path):
    manifest = write_manifest(root / "m.jsonl", ['["a", "b"]'])
    assert_manifest_error(manifest, root, f"{manifest}:1", "JSON object")


@pytest.mark.parametrize("field", ["image", "instruction", "answer"])
def test_missing_field(root: Path, field: str):
    record = good()
    del record[field]
    manifest = write_manifest(root / "m.jsonl", [good(), good(), record])
    assert_manifest_error(manifest, root, f"{manifest}:3", f"'{field}'", "missing")


def test_unknown_key(root: Path):
    manifest = write_manifest(root / "m.jsonl", [good(answers="red")])
    assert_manifest_error(manifest, root, f"{manifest}:1", "'answers'", "unknown")


@pytest.mark.parametrize("field,value", [("answer", 3), ("instruction", ["what"]), ("image", None), ("id", 7)])
def test_wrong_type(root: Path, field: str, value):
    manifest = write_manifest(root / "m.jsonl", [good(**{field: value})])
    assert_manifest_error(manifest, root, f"{manifest}:1", f"'{field}'", "expected a string")


@pytest.mark.parametrize(
    "field,value", [("instruction", ""), ("instruction", "  \t"), ("answer", ""), ("answer", "\n ")]
)
def test_empty_text(root: Path, field: str, value: str):
    manifest = write_manifest(root / "m.jsonl", [good(), good(**{field: value})])
    assert_manifest_error(manifest, root, f"{manifest}:2", f"'{field}'", "empty")


def test_absolute_path_rejected_even_if_inside_root(root: Path):
    absolute = str((root / "images" / "ok.png").resolve())
    manifest = write_manifest(root / "m.jsonl", [good(image=absolute)])
    assert_manifest_error(manifest, root, f"{manifest}:1", absolute, "absolute")


def test_dotdot_escape_rejected(root: Path):
    write_png(root.parent / "outside.png")  # exists, so only containment can reject it
    manifest = write_manifest(root / "m.jsonl", [good(image="images/../../outside.png")])
    assert_manifest_error(manifest, root, f"{manifest}:1", "images/../../outside.png", "escapes")


def test_dotdot_staying_inside_is_allowed(root: Path):
    manifest = write_manifest(root / "m.jsonl", [good(image="images/../images/ok.png")])
    assert read_manifest(manifest, root)[0].image_path == (root / "images" / "ok.png").resolve()


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_symlink_escape_rejected(root: Path):
    outside = write_png(root.parent / "secret.png")
    (root / "images" / "link.png").symlink_to(outside)
    manifest = write_manifest(root / "m.jsonl", [good(image="images/link.png")])
    assert_manifest_error(manifest, root, f"{manifest}:1", "images/link.png", "escapes")


def test_missing_image(root: Path):
    manifest = write_manifest(root / "m.jsonl", [good(), good(image="images/nope.png")])
    assert_manifest_error(manifest, root, f"{manifest}:2", "nope.png", "does not exist")


def test_duplicate_id(root: Path):
    manifest = write_manifest(root / "m.jsonl", [good(id="x"), good(id="x")])
    assert_manifest_error(manifest, root, f"{manifest}:2", "'id'", "line 1")


def test_empty_manifest(root: Path):
    manifest = write_manifest(root / "m.jsonl", [""])
    assert_manifest_error(manifest, root, "no samples")


# --------------------------------------------------------------------------- images


def test_corrupt_image_names_file(tmp_path: Path):
    bad = tmp_path / "garbage.png"
    bad.write_bytes(b"this is not an image at all")
    with pytest.raises(ImageLoadError, match="garbage.png"):
        load_image(bad)


def test_truncated_image_names_file(tmp_path: Path):
    full = tmp_path / "full.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(full)  # noise: incompressible, so truncation bites
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ImageLoadError, match="cut.png"):
        load_image(cut)


def test_corrupt_image_through_dataset(root: Path):
    (root / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    ds = ManifestDataset.from_manifest(
        write_manifest(root / "m.jsonl", [good(id="a"), good(id="b", image="images/bad.png")]), root
    )
    # decoded lazily, during training: the error names the manifest line as well as the file
    with pytest.raises(ImageLoadError, match=r"m\.jsonl:2: field 'image': .*bad\.png"):
        ds[1]


@pytest.mark.parametrize(
    "mode,colour,expected",
    # RGBA is composited over white (qformer_lora.images): G = B = 0 * 128/255 + 255 * (1 - 128/255) = 127.
    # Every mode: tests/unit/test_image_modes.py
    [("L", 128, (128, 128, 128)), ("RGBA", (255, 0, 0, 128), (255, 127, 127)), ("RGB", (1, 2, 3), (1, 2, 3))],
)
def test_non_rgb_converted(tmp_path: Path, mode, colour, expected):
    image = load_image(write_png(tmp_path / f"{mode}.png", mode, colour))
    assert image.mode == "RGB", f"{mode} image loaded as {image.mode}, expected RGB"
    assert image.getpixel((0, 0)) == expected


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_converted(tmp_path: Path, transparency: bool):
    path = tmp_path / "p.png"
    image = Image.new("RGB", (8, 8), (0, 0, 255)).convert("P")
    image.save(path, **({"transparency": 0} if transparency else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the palette+transparency conversion must not warn
        loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.getpixel((3, 3)) == (0, 0, 255), (loaded.mode, loaded.getpixel((3, 3)))


def test_dataset_returns_raw_examples():
    ds = ShapesDataset("val")
    ex = ds[0]
    assert len(ds) == 48
    assert isinstance(ex, Example) and ex.image.mode == "RGB" and ex.image.size == (32, 32)
    assert (ex.instruction, ex.answer, ex.id) == (ds.samples[0].instruction, ds.samples[0].answer, ds.samples[0].id)


# --------------------------------------------------------------------------- fixture generators


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )


@pytest.mark.parametrize("script", ["make_shapes.py", "make_tokenizers.py"])
def test_generator_check_passes(script: str):
    result = run_script(script, "--check")
    assert result.returncode == 0, f"{script} --check failed:\n{result.stdout}\n{result.stderr}"


def test_shapes_check_detects_a_changed_file(tmp_path: Path):
    copy = tmp_path / "shapes"
    shutil.copytree(SHAPES_DIR, copy)
    victim = copy / "images" / "val_003.png"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = run_script("make_shapes.py", "--check", "--out", str(copy))
    assert result.returncode == 1, f"tampered fixture passed --check: {result.stdout}{result.stderr}"
    assert "val_003.png" in result.stderr, result.stderr


def test_dataset_under_two_megabytes():
    size = sum(p.stat().st_size for p in SHAPES_DIR.rglob("*") if p.is_file())
    assert size < TWO_MB, f"shapes fixture is {size} bytes, {size - TWO_MB} over the 2 MB budget"
    tok_size = sum(p.stat().st_size for p in QFORMER_TOKENIZER_DIR.parent.rglob("*") if p.is_file())
    assert tok_size < 100_000, f"tokenizer fixtures are {tok_size} bytes"
