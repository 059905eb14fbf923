#!/usr/bin/env python3
"""Generate the tiny "shapes" visual-question-answering fixture.

Output (default ``src/qformer_lora/resources/data/shapes/``)::

    images/train_000.png ... images/val_015.png   32x32 RGB PNGs, 1-3 shapes each
    train.jsonl                                    192 samples (64 images x 3 questions)
    val.jsonl                                      48 samples  (16 images x 3 questions)

Each manifest line is ``{"id", "image", "instruction", "answer"}`` with a
single-word lowercase answer (a colour, a shape, a count word, yes/no).

The output is bit-identical on every run and on every machine:

* all randomness comes from ``random.Random(SEED)``;
* shapes are rasterised here with exact pixel-centre inside tests, not with a
  drawing library whose anti-aliasing/rounding could change between versions;
* PNGs are encoded here with *stored* (uncompressed) deflate blocks. Pillow
  links zlib or zlib-ng depending on the wheel, and their compressed bytes
  differ; stored blocks are specified byte-for-byte by RFC 1951, so
  ``--check`` stays meaningful across Pillow/zlib upgrades. The cost is size
  (~3.2 kB per 32x32 image, ~260 kB in all), well inside the 2 MB budget.
* PNGs carry no timestamp, text or gamma chunks.

``--check`` regenerates into a temporary directory and compares every file
byte-for-byte with ``--out``; it exits 1 naming the first difference.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import tempfile
import zlib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "src" / "qformer_lora" / "resources" / "data" / "shapes"

SEED = 20240611
IMAGE_SIZE = 32
BACKGROUND = (240, 240, 240)
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
SPLITS = (("train", 64), ("val", 16))
QUESTIONS_PER_IMAGE = 3

# The image is split into a 2x2 grid of 16px cells; each shape gets its own
# cell so shapes never overlap and every one stays countable.
CELL = IMAGE_SIZE // 2
CELL_CENTRES = [(CELL // 2 + CELL * col, CELL // 2 + CELL * row) for row in range(2) for col in range(2)]
RADIUS = 6


# --------------------------------------------------------------------------- drawing


def _inside(kind: str, cx: int, cy: int, r: int, x: float, y: float) -> bool:
    """Exact inside test at the pixel centre (x, y)."""
    dx, dy = x - cx, y - cy
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        half = r * 0.8  # a square of the same "radius" looks larger than a circle
        return abs(dx) <= half and abs(dy) <= half
    if kind == "triangle":
        # Upward isosceles triangle: apex at (cx, cy - r), base on y = cy + r.
        if dy < -r or dy > r:
            return False
        half_width = r * (dy + r) / (2 * r)
        return abs(dx) <= half_width
    raise ValueError(f"unknown shape {kind!r}")


def render(shapes: list[tuple[str, str, int, int]]) -> list[bytearray]:
    """Rows of RGB bytes for a list of (colour, kind, cx, cy)."""
    rows = [bytearray(bytes(BACKGROUND) * IMAGE_SIZE) for _ in range(IMAGE_SIZE)]
    for colour, kind, cx, cy in shapes:
        rgb = bytes(COLOURS[colour])
        for y in range(IMAGE_SIZE):
            for x in range(IMAGE_SIZE):
                if _inside(kind, cx, cy, RADIUS, x + 0.5, y + 0.5):
                    rows[y][3 * x : 3 * x + 3] = rgb
    return rows


# --------------------------------------------------------------------------- PNG


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _stored_zlib(raw: bytes) -> bytes:
    """A zlib stream made of stored deflate blocks (RFC 1950/1951), fully specified bytes."""
    out = bytearray(b"\x78\x01")  # CMF/FLG: deflate, 32K window, no dict, fastest
    max_block = 0xFFFF
    for start in range(0, max(len(raw), 1), max_block):
        block = raw[start : start + max_block]
        final = 1 if start + max_block >= len(raw) else 0
        out += bytes([final]) + struct.pack("<HH", len(block), len(block) ^ 0xFFFF) + block
    out += struct.pack(">I", zlib.adler32(raw) & 0xFFFFFFFF)
    return bytes(out)


def encode_png(rows: list[bytearray]) -> bytes:
    height, width = len(rows), len(rows[0]) // 3
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    raw = b"".join(b"\x00" + bytes(row) for row in rows)  # filter type 0 on every row
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", _stored_zlib(raw)) + _chunk(b"IEND", b"")


# --------------------------------------------------------------------------- questions


def questions_for(rng: random.Random, shapes: list[tuple[str, str, int, int]]) -> list[tuple[str, str]]:
    """Three (instruction, answer) pairs that the image answers unambiguously."""
    colours = [c for c, _, _, _ in shapes]
    kinds = [k for _, k, _, _ in shapes]
    count_q = ("How many shapes are there?", COUNT_WORDS[len(shapes)])

    candidates: list[tuple[str, str]] = []
    if len(shapes) == 1:
        candidates.append(("What colour is the shape?", colours[0]))
        candidates.append(("What shape is it?", kinds[0]))
    else:
        # Only ask about a shape kind / colour that occurs exactly once, so the
        # answer is not ambiguous.
        for kind in sorted(set(kinds)):
            if kinds.count(kind) == 1:
                candidates.append((f"What colour is the {kind}?", colours[kinds.index(kind)]))
        for colour in sorted(set(colours)):
            if colours.count(colour) == 1:
                candidates.append((f"What shape is the {colour} one?", kinds[colours.index(colour)]))
    chosen = rng.sample(candidates, min(2, len(candidates)))

    # Fill up with yes/no questions (half of them true) when too few
    # unambiguous colour/shape questions exist.
    present = set(zip(colours, kinds))
    while len(chosen) < QUESTIONS_PER_IMAGE - 1:
        if rng.random() < 0.5:
            colour, kind = rng.choice(sorted(present))
        else:
            colour, kind = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        q = (f"Is there a {colour} {kind}?", "yes" if (colour, kind) in present else "no")
        if q not in chosen:
            chosen.append(q)

    qs = [count_q, *chosen]
    rng.shuffle(qs)
    return qs


# --------------------------------------------------------------------------- generation


def generate(out: Path) -> None:
    rng = random.Random(SEED)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for split, n_images in SPLITS:
        lines = []
        for i in range(n_images):
            n_shapes = rng.choice((1, 2, 3))
            cells = rng.sample(CELL_CENTRES, n_shapes)
            shapes = []
            for cx, cy in cells:
                jitter_x, jitter_y = rng.randint(-1, 1), rng.randint(-1, 1)
                shapes.append((rng.choice(sorted(COLOURS)), rng.choice(SHAPES), cx + jitter_x, cy + jitter_y))
            image_rel = f"images/{split}_{i:03d}.png"
            (out / image_rel).write_bytes(encode_png(render(shapes)))
            for q, (instruction, answer) in enumerate(questions_for(rng, shapes)):
                record = {
                    "id": f"{split}-{i:03d}-{q}",
                    "image": image_rel,
                    "instruction": instruction,
                    "answer": answer,
                }
                lines.append(json.dumps(record, ensure_ascii=True))
        (out / f"{split}.jsonl").write_bytes(("\n".join(lines) + "\n").encode("ascii"))


def first_difference(expected: Path, actual: Path) -> str | None:
    """Name the first file that differs between two trees, or None if identical."""
    exp = {p.relative_to(expected).as_posix() for p in expected.rglob("*") if p.is_file()}
    act = {p.relative_to(actual).as_posix() for p in actual.rglob("*") if p.is_file()}
    for rel in sorted(exp | act):
        if rel not in act:
            return f"{actual / rel}: missing (the generator produces it)"
        if rel not in exp:
            return f"{actual / rel}: unexpected file (the generator does not produce it)"
        if (expected / rel).read_bytes() != (actual / rel).read_bytes():
            return f"{actual / rel}: content differs from a fresh regeneration"
    return None


def write_or_check(script: str, generate, out: Path, check: bool, what: str) -> int:
    """``generate(directory)`` into ``out``; with ``check``, into a temporary directory compared
    file by file with ``out`` instead (exit status 1 naming the first difference)."""
    if check:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            diff = first_difference(Path(tmp), out)
        if diff:
            print(f"{script} --check FAILED: {diff}", file=sys.stderr)
            return 1
        print(f"{script} --check OK: {out} matches a fresh regeneration")
        return 0
    generate(out)
    print(f"wrote {what} to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="regenerate to a temp dir and compare with --out")
    args = parser.parse_args(argv)

    return write_or_check("make_shapes", generate, args.out, args.check, what="shapes fixture")


if __name__ == "__main__":
    sys.exit(main())
