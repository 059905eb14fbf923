#!/usr/bin/env python3
"""Generate the tiny dataset fixtures of every importable format (``qformer_lora.formats``).

Output (default ``fixtures/formats/``), each in its dataset's real layout::

    jsonl/      train.jsonl, val.jsonl, images/*.png                    our manifest
    llava/      llava_v1_5_mix665k.json, coco/train2017/*.jpg           LLaVA's playground/data
    hf/         train/, validation/: metadata.jsonl + *.png             a Hugging Face imagefolder
    coco/       annotations/captions_val2014.json, val2014/COCO_val2014_*.jpg
    vqav2/      v2_OpenEnded_mscoco_val2014_questions.json, v2_mscoco_val2014_annotations.json,
                val2014/COCO_val2014_*.jpg
    scienceqa/  problems.json, pid_splits.json, images/<split>/<pid>/image.png

Every picture is 32x32 pixels in four 16x16 quadrants of flat colour, and every text about it
(question, answer, caption) is derived from those colours, so a test can check a mapping by hand.

The output is bit-identical on every run and every machine, for the same reason and in the
same way as ``make_shapes.py``: no randomness, PNGs through its ``encode_png`` (stored deflate
blocks), and JPEGs encoded here rather than by Pillow's libjpeg (whose bytes depend on the
build). That is simple because every 8x8 block is one flat colour: its discrete cosine
transform has a DC term only, so a baseline JPEG (ITU T.81) of DC differences and end-of-block
codes encodes it exactly (:func:`encode_jpeg`), and any decoder returns the colour to within a
rounding step of the YCbCr conversion.

``--check`` regenerates into a temporary directory and compares every file byte for byte with
``--out``; it exits 1 naming the first difference.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

# scripts/ is on sys.path when run as a script: the PNG encoder and the tree comparison of the shapes fixture
from make_shapes import encode_png, write_or_check

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "fixtures" / "formats"

SIZE = 32  # pixels a side; quadrants of 16, i.e. 2x2 JPEG blocks of 8
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")

# The pictures: colours of (top left, top right, bottom left, bottom right), and a caption.
SCENES = {
    "red-blue": (("red", "red", "blue", "blue"), "a red half above a blue half"),
    "green-yellow": (("green", "yellow", "green", "yellow"), "a green half beside a yellow half"),
    "black-white": (("black", "white", "white", "black"), "a black and white checkerboard"),
    "all-red": (("red", "red", "red", "red"), "a plain red picture"),
    "blue-corner": (("white", "white", "white", "blue"), "a white picture with a blue corner"),
    "yellow-top": (("yellow", "yellow", "black", "black"), "a yellow half above a black half"),
}


def pixel_rows(scene: str) -> list[bytearray]:
    """RGB rows of a scene (``SCENES``)."""
    colours = [COLOURS[c] for c in SCENES[scene][0]]
    rows = []
    for y in range(SIZE):
        row = bytearray()
        for x in range(SIZE):
            row += bytes(colours[2 * (y >= SIZE // 2) + (x >= SIZE // 2)])
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- JPEG (DC only)

# The luminance DC Huffman table of T.81 Annex K.3 (code lengths, then the categories 0..11 in order).
DC_BITS = (0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0)
DC_VALUES = tuple(range(12))
# An AC table of one symbol, end-of-block (0x00), code "0": every block ends right after its DC term.
AC_BITS = (1,) + (0,) * 15
AC_VALUES = (0,)
QUANT = 8  # every quantiser step; DC = 8 x (level - 128) for a flat block, so DC / 8 is exact


def _huffman_codes(bits: tuple[int, ...], values: tuple[int, ...]) -> dict[int, tuple[int, int]]:
    """symbol -> (code, length): the canonical codes of T.81 Annex C."""
    codes, code, k = {}, 0, 0
    for length, count in enumerate(bits, start=1):
        for _ in range(count):
            codes[values[k]] = (code, length)
            code, k = code + 1, k + 1
        code <<= 1
    return codes


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">HH", 0xFF00 | marker, len(payload) + 2) + payload


class _BitWriter:
    def __init__(self):
        self.out, self.acc, self.n = bytearray(), 0, 0

    def write(self, value: int, length: int) -> None:
        for shift in range(length - 1, -1, -1):
            self.acc, self.n = (self.acc << 1) | ((value >> shift) & 1), self.n + 1
            if self.n == 8:
                self.out.append(self.acc)
                if self.acc == 0xFF:
                    self.out.append(0x00)  # byte stuffing (T.81 F.1.2.3)
                self.acc, self.n = 0, 0

    def flush(self) -> bytes:
        if self.n:
            self.write((1 << (8 - self.n)) - 1, 8 - self.n)  # pad with 1-bits
        return bytes(self.out)


def _ycbcr(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """JFIF's RGB -> YCbCr, rounded."""
    r, g, b = rgb
    return (
        round(0.299 * r + 0.587 * g + 0.114 * b),
        round(128 - 0.168736 * r - 0.331264 * g + 0.5 * b),
        round(128 + 0.5 * r - 0.418688 * g - 0.081312 * b),
    )


def encode_jpeg(rows: list[bytearray]) -> bytes:
    """A baseline JFIF JPEG (4:4:4) of an image whose every 8x8 block is one flat colour."""
    height, width = len(rows), len(rows[0]) // 3
    dc, ac = _huffman_codes(DC_BITS, DC_VALUES), _huffman_codes(AC_BITS, AC_VALUES)
    bits, previous = _BitWriter(), [0, 0, 0]
    for by in range(0, height, 8):
        for bx in range(0, width, 8):
            block = [rows[by + dy][3 * (bx + dx) : 3 * (bx + dx) + 3] for dy in range(8) for dx in range(8)]
            if len({bytes(p) for p in block}) != 1:
                raise ValueError(f"block at ({bx}, {by}) is not one flat colour")
            for component, level in enumerate(_ycbcr(tuple(block[0]))):
                coefficient = level - 128  # DC / QUANT
                diff, previous[component] = coefficient - previous[component], coefficient
                category = abs(diff).bit_length()
                bits.write(*dc[category])
                bits.write(diff if diff >= 0 else diff + (1 << category) - 1, category)  # T.81 F.1.2.1
                bits.write(*ac[0])  # end of block
    components = b"".join(bytes((i, 0x11, 0)) for i in (1, 2, 3))
    return b"".join(
        (
            b"\xff\xd8",
            _segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"),
            _segment(0xDB, b"\x00" + bytes([QUANT] * 64)),
            _segment(0xC0, struct.pack(">BHHB", 8, height, width, 3) + components),
            _segment(0xC4, b"\x00" + bytes(DC_BITS + DC_VALUES) + b"\x10" + bytes(AC_BITS + AC_VALUES)),
            _segment(0xDA, b"\x03" + b"".join(bytes((i, 0x00)) for i in (1, 2, 3)) + b"\x00\x3f\x00"),
            bits.flush(),
            b"\xff\xd9",
        )
    )


# --------------------------------------------------------------------------- texts about a scene


def colour_of(scene: str, quadrant: str) -> str:
    return SCENES[scene][0][QUADRANTS.index(quadrant)]


def caption(scene: str) -> str:
    return SCENES[scene][1]


def write(path: Path, content: bytes | str | object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_bytes(content.encode("ascii"))
    else:  # a JSON document, indented so a reader can check a test's expectation against it
        path.write_bytes((json.dumps(content, indent=1, ensure_ascii=True) + "\n").encode("ascii"))


def jsonl_lines(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in records)


def question(quadrant: str) -> str:
    return f"What colour is the {quadrant} quadrant?"


# --------------------------------------------------------------------------- the formats


def make_jsonl(out: Path) -> None:
    """Our manifest: four pictures, questions about their quadrants."""
    scenes = ("red-blue", "green-yellow", "black-white", "all-red")
    for i, scene in enumerate(scenes):
        write(out / "images" / f"img_{i:03d}.png", encode_png(pixel_rows(scene)))
    splits = {
        "train": [(0, "top left"), (1, "top right"), (2, "bottom left")],
        "val": [(3, "top left"), (0, "bottom right")],
    }
    for split, asked in splits.items():
        records = [
            {
                "id": f"{split}-{k}",
                "image": f"images/img_{i:03d}.png",
                "instruction": question(q),
                "answer": colour_of(scenes[i], q),
            }
            for k, (i, q) in enumerate(asked)
        ]
        write(out / f"{split}.jsonl", jsonl_lines(records))


def make_llava(out: Path) -> None:
    """LLaVA-1.5's mix: COCO pictures under coco/train2017, a two-turn record, a text-only record."""
    scenes = {9: "red-blue", 25: "green-yellow", 30: "black-white"}
    for image_id, scene in scenes.items():
        write(out / "coco" / "train2017" / f"{image_id:012d}.jpg", encode_jpeg(pixel_rows(scene)))

    def turns(*pairs):
        return [t for h, g in pairs for t in ({"from": "human", "value": h}, {"from": "gpt", "value": g})]

    def image(image_id):
        return f"coco/train2017/{image_id:012d}.jpg"

    records = [
        {
            "id": "000000000009",
            "image": image(9),
            "conversations": turns(("<image>\n" + question("top left"), f"It is {colour_of('red-blue', 'top left')}.")),
        },
        {
            "id": "000000000025",
            "image": image(25),
            "conversations": turns(
                (question("top left") + "\n<image>", f"It is {colour_of('green-yellow', 'top left')}."),
                (question("top right"), f"It is {colour_of('green-yellow', 'top right')}."),
            ),
        },
        {"id": "sharegpt-0", "model": "", "conversations": turns(("Name a colour.", "Blue."))},  # text only
        {
            "id": "000000000030",
            "image": image(30),
            "conversations": turns(
                ("<image>\nDescribe the picture briefly.", caption("black-white").capitalize() + ".")
            ),
        },
    ]
    write(out / "llava_v1_5_mix665k.json", records)


def make_hf(out: Path) -> None:
    """A Hugging Face imagefolder: one folder per split, metadata.jsonl beside the images."""
    splits = {
        "train": [("red-blue", "top left"), ("green-yellow", "top right"), ("yellow-top", "bottom left")],
        "validation": [("blue-corner", "bottom right"), ("all-red", "top left")],
    }
    for split, rows in splits.items():
        records = []
        for i, (scene, quadrant) in enumerate(rows):
            write(out / split / f"{i:04d}.png", encode_png(pixel_rows(scene)))
            records.append(
                {"file_name": f"{i:04d}.png", "question": question(quadrant), "answer": colour_of(scene, quadrant)}
            )
        write(out / split / "metadata.jsonl", jsonl_lines(records))


VAL2014 = {42: "red-blue", 73: "all-red", 74: "blue-corner"}  # COCO val2014 image ids of the fixtures


def coco_name(image_id: int) -> str:
    return f"COCO_val2014_{image_id:012d}.jpg"


def make_coco(out: Path) -> None:
    """COCO Captions 2014: two captions per picture, annotations in COCO's interleaved order."""
    for image_id, scene in VAL2014.items():
        write(out / "val2014" / coco_name(image_id), encode_jpeg(pixel_rows(scene)))
    images = [
        {"license": 1, "file_name": coco_name(i), "coco_url": "", "height": SIZE, "width": SIZE,
         "date_captured": "2013-11-14 11:18:45", "flickr_url": "", "id": i}
        for i in VAL2014
    ]  # fmt: skip
    annotations = []
    for round_ in range(2):  # COCO lists captions image after image, not grouped by image
        for image_id, scene in VAL2014.items():
            colours = " and ".join(sorted(set(SCENES[scene][0])))
            text = caption(scene).capitalize() + ". " if round_ == 0 else f"A picture in {colours}.\n"
            annotations.append({"image_id": image_id, "id": 100 * (round_ + 1) + image_id, "caption": text})
    document = {
        "info": {"description": "qformer-lora fixture in the layout of COCO 2014", "version": "1.0", "year": 2014},
        "images": images,
        "licenses": [{"url": "", "id": 1, "name": "fixture"}],
        "annotations": annotations,
    }
    write(out / "annotations" / "captions_val2014.json", document)


def make_vqav2(out: Path) -> None:
    """VQAv2 val2014: questions and annotations files, ten answers each, COCO pictures."""
    for image_id, scene in VAL2014.items():
        write(out / "val2014" / coco_name(image_id), encode_jpeg(pixel_rows(scene)))
    asked = [(42, "top left"), (42, "bottom right"), (73, "top right"), (74, "bottom right")]
    questions, annotations = [], []
    for k, (image_id, quadrant) in enumerate(asked):
        question_id = image_id * 1000 + sum(1 for i, _ in asked[:k] if i == image_id)  # VQA's numbering
        truth = colour_of(VAL2014[image_id], quadrant)
        # eight annotators agree; two say the colour of the opposite quadrant
        other = colour_of(VAL2014[image_id], QUADRANTS[3 - QUADRANTS.index(quadrant)])
        answers = [truth] * 8 + [other] * 2
        questions.append({"image_id": image_id, "question": question(quadrant), "question_id": question_id})
        annotations.append(
            {
                "question_type": "what color is the",
                "multiple_choice_answer": truth,
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": n} for n, a in enumerate(answers, 1)
                ],
                "image_id": image_id,
                "answer_type": "other",
                "question_id": question_id,
            }
        )
    info = {"description": "qformer-lora fixture in the layout of VQA v2", "version": "2.0", "year": 2017}
    license_ = {"url": "", "name": "fixture"}
    write(
        out / "v2_OpenEnded_mscoco_val2014_questions.json",
        {"info": info, "task_type": "Open-Ended", "data_type": "mscoco", "license": license_,
         "data_subtype": "val2014", "questions": questions},
    )  # fmt: skip
    write(
        out / "v2_mscoco_val2014_annotations.json",
        {"info": info, "license": license_, "data_subtype": "val2014", "annotations": annotations},
    )


def make_scienceqa(out: Path) -> None:
    """ScienceQA's data/scienceqa: problems.json (two splits, two problems without a picture), images."""

    def problem(split, q, choices, answer, image=None, hint=""):
        return {
            "question": q, "choices": choices, "answer": answer, "hint": hint,
            "image": "image.png" if image else None, "task": "closed choice", "grade": "grade1",
            "subject": "natural science", "topic": "colours", "category": "Identify colours",
            "skill": "Identify colours", "lecture": "", "solution": "", "split": split,
        }  # fmt: skip

    problems = {
        "1": problem("train", "Which colour is the top left quadrant?", ["blue", "red"], 1, "red-blue"),
        "2": problem("train", "Which word names a colour?", ["table", "green"], 1),
        "3": problem(
            "train",
            "Which colour is it?",
            ["yellow", "black", "white"],
            1,
            "yellow-top",
            hint="Look at the bottom right quadrant.",
        ),  # fmt: skip
        "4": problem("val", "Which colour is the bottom right quadrant?", ["blue", "white"], 0, "blue-corner"),
        "5": problem("val", "Which word names a colour?", ["yellow", "chair"], 0),
    }
    for pid, entry in problems.items():
        scene = {"1": "red-blue", "3": "yellow-top", "4": "blue-corner"}.get(pid)
        if scene:
            write(out / "images" / entry["split"] / pid / "image.png", encode_png(pixel_rows(scene)))
    write(out / "problems.json", problems)
    splits = {s: [p for p, e in problems.items() if e["split"] == s] for s in ("train", "val", "test")}
    write(out / "pid_splits.json", splits)


MAKERS = {
    "jsonl": make_jsonl,
    "llava": make_llava,
    "hf": make_hf,
    "coco": make_coco,
    "vqav2": make_vqav2,
    "scienceqa": make_scienceqa,
}


def generate(out: Path) -> None:
    for name, make in MAKERS.items():
        make(out / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="regenerate to a temp dir and compare with --out")
    args = parser.parse_args(argv)
    return write_or_check("make_format_fixtures", generate, args.out, args.check, what="format fixtures")


if __name__ == "__main__":
    sys.exit(main())
