"""qformer_lora.images: every image mode Pillow opens becomes the documented 8-bit RGB, or is refused by name.

Each case writes real pixels to a real file in a format that stores the mode, checks the file
opens in that mode (so the row under test is the one meant), reads it back through
``load_image`` and compares with RGB derived by hand in the case's comment. Modes that no
Pillow writer stores (``test_no_writer_stores_the_memory_only_modes`` shows it) go through
``to_rgb`` on an in-memory image instead. Each pixel is an 8 x 8 block: JPEG's DCT blocks are
8 x 8, so a constant block keeps only its DC coefficient, which quality 100 quantises with step 1,
and the JPEG cases decode exactly.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qformer_lora import images
from qformer_lora.images import ImageLoadError, load_image, to_rgb

BLOCK = 8
RED, BLUE = (255, 0, 0), (0, 0, 255)
SIXTEEN = [0, 257, 32896, 65535]  # 0, 1 x 257, 128 x 257, 255 x 257
SIXTEEN_RGB = [(0, 0, 0), (1, 1, 1), (128, 128, 128), (255, 255, 255)]  # v / 257


@dataclass(frozen=True)
class Case:
    mode: str  # the mode the file opens in: the table row under test
    suffix: str  # the format, by extension
    pixels: list  # one value per 8 x 8 block, in `written` mode
    expected: list  # RGB per block
    written: str | None = None  # the mode written, when the format opens it as another
    palette: list = field(default_factory=list)  # RGB (or RGBA) entries for P / PA
    save: dict = field(default_factory=dict)  # extra keywords for Image.save
    note: str = ""  # tells cases of one mode and format apart in the test id

    @property
    def id(self) -> str:
        return "-".join(part for part in (self.mode, self.suffix, self.note) if part)


def make(mode: str, pixels: list, palette: list = (), palette_mode: str = "RGB") -> Image.Image:
    image = Image.new(mode, (BLOCK * len(pixels), BLOCK))
    if palette:
        image.putpalette([c for entry in palette for c in entry], palette_mode)
    for i, value in enumerate(pixels):
        image.paste(value, (BLOCK * i, 0, BLOCK * (i + 1), BLOCK))
    return image


def block_centres(image: Image.Image, n: int) -> list:
    return [image.getpixel((BLOCK * i + BLOCK // 2, BLOCK // 2)) for i in range(n)]


FILE_CASES = [
    # 1: Pillow holds the bit as 0 / 255; 0 -> black, 1 -> white
    Case("1", "png", [0, 255], [(0, 0, 0), (255, 255, 255)]),
    Case("1", "tif", [0, 255], [(0, 0, 0), (255, 255, 255)]),
    Case("L", "png", [0, 77, 255], [(0, 0, 0), (77, 77, 77), (255, 255, 255)]),
    Case("L", "jpg", [77], [(77, 77, 77)], save={"quality": 100}),
    # tRNS grey 0 is transparent: over white -> white
    Case("L", "png", [0, 77], [(255, 255, 255), (77, 77, 77)], save={"transparency": 0}, note="tRNS"),
    Case("RGB", "png", [(1, 2, 3), (250, 128, 0)], [(1, 2, 3), (250, 128, 0)]),
    Case(
        "RGB",
        "png",
        [(1, 2, 3), (250, 128, 0)],
        [(1, 2, 3), (255, 255, 255)],
        save={"transparency": (250, 128, 0)},
        note="tRNS",
    ),
    # JPEG stores YCbCr; libjpeg decodes it to RGB. Cb = Cr = 128 is grey: R = G = B = Y
    Case(
        "RGB",
        "jpg",
        [(128, 128, 128)],
        [(128, 128, 128)],
        written="YCbCr",
        save={"quality": 100, "subsampling": 0},
        note="YCbCr",
    ),
    Case("P", "png", [0, 1], [RED, BLUE], palette=[RED, BLUE]),
    Case("P", "gif", [0, 1], [RED, BLUE], palette=[RED, BLUE]),
    # index 1 transparent -> white
    Case("P", "png", [0, 1], [RED, (255, 255, 255)], palette=[RED, BLUE], save={"transparency": 1}, note="index"),
    Case("P", "gif", [0, 1], [RED, (255, 255, 255)], palette=[RED, BLUE], save={"transparency": 1}, note="index"),
    # palette alpha (tRNS per index): red at 128 -> G = B = 255 * (1 - 128/255) = 127
    Case(
        "P",
        "png",
        [0, 1],
        [(255, 127, 127), BLUE],
        palette=[RED, BLUE],
        save={"transparency": bytes([128, 255])},
        note="alpha",
    ),
    # over white: c * a/255 + 255 * (1 - a/255); a = 51 = 255/5 gives 255 - (255 - c)/5: 0 -> 204
    Case("LA", "png", [(0, 51), (100, 255), (7, 0)], [(204, 204, 204), (100, 100, 100), (255, 255, 255)]),
    Case("LA", "tif", [(0, 51), (100, 255), (7, 0)], [(204, 204, 204), (100, 100, 100), (255, 255, 255)]),
    # palette index 1 = blue at alpha 51: R = G = 255 - 255/5 = 204, B = 255
    Case("PA", "tif", [(0, 255), (1, 51)], [RED, (204, 204, 255)], palette=[RED, BLUE]),
    # (255, 0, 0, 128): G = B = 255 * 127/255 = 127; alpha 255 keeps the colour; alpha 0 is white
    Case(
        "RGBA",
        "png",
        [(255, 0, 0, 128), (10, 20, 30, 255), (10, 20, 30, 0)],
        [(255, 127, 127), (10, 20, 30), (255, 255, 255)],
    ),
    Case("RGBA", "tif", [(255, 0, 0, 128), (10, 20, 30, 0)], [(255, 127, 127), (255, 255, 255)]),
    # R = (255 - C)(255 - K)/255 ...: (0,255,255,0) -> red; K = 51 -> 255 * 204/255 = 204;
    # (51, 102, 0, 51) -> (204 * 204/255, 153 * 204/255, 255 * 204/255) = (163.2, 122.4, 204)
    Case("CMYK", "tif", [(0, 255, 255, 0), (0, 0, 0, 51), (51, 102, 0, 51)], [RED, (204, 204, 204), (163, 122, 204)]),
    Case("CMYK", "jpg", [(0, 255, 255, 0), (51, 102, 0, 51)], [RED, (163, 122, 204)], save={"quality": 100}),
    # JFIF: (128, 106, 133): R = 128 + 1.402 * 5 = 135.01, G = 128 + 0.344136 * 22 - 0.714136 * 5 = 132.0003,
    # B = 128 - 1.772 * 22 = 89.016
    Case("YCbCr", "tif", [(128, 128, 128), (128, 106, 133)], [(128, 128, 128), (135, 132, 89)]),
    # L* = 128/255 * 100 = 50.196, a* = b* = 0: Y = ((L* + 16)/116)^3 = 0.18584, sRGB
    # 1.055 * Y^(1/2.4) - 0.055 = 0.46828 -> 119.4
    Case("LAB", "tif", [(128, 128, 128)], [(119, 119, 119)]),
    Case("I;16", "png", SIXTEEN, SIXTEEN_RGB),
    Case("I;16", "tif", SIXTEEN, SIXTEEN_RGB),
    # tRNS names the 16-bit value 257: that block is white
    Case(
        "I;16", "png", SIXTEEN, [(0, 0, 0), (255, 255, 255), *SIXTEEN_RGB[2:]], save={"transparency": 257}, note="tRNS"
    ),
    Case("I;16B", "tif", SIXTEEN, SIXTEEN_RGB),
    Case("I;16L", "im", SIXTEEN, SIXTEEN_RGB),
    # 16-bit PGM (maxval 65535) opens as I; PPM's range is 0..65535
    Case("I", "ppm", SIXTEEN, SIXTEEN_RGB, written="I;16"),
]


@pytest.mark.parametrize("case", FILE_CASES, ids=[c.id for c in FILE_CASES])
def test_mode_read_from_file(tmp_path: Path, case: Case):
    Image.init()  # registers every plugin, so Image.SAVE is complete
    if case.suffix == "im" and "IM" not in Image.SAVE:
        pytest.skip("this Pillow has no IM format, the one writer of I;16L (deprecated in 13); MEMORY_CASES has it")
    path = tmp_path / f"image.{case.suffix}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Pillow's palette-transparency warning
        warnings.filterwarnings("ignore", "IM image format is deprecated", DeprecationWarning)
        make(case.written or case.mode, case.pixels, case.palette).save(path, **case.save)
        with Image.open(path) as opened:
            assert opened.mode == case.mode, f"{path.name} opens as {opened.mode}, not the row under test {case.mode}"
        loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert block_centres(loaded, len(case.pixels)) == case.expected


MEMORY_CASES = [
    # H = 0..255 is 0..360 degrees: 0 -> red, 85 -> 120 degrees = green; S = 0 -> grey V
    Case("HSV", "", [(0, 255, 255), (85, 255, 255), (0, 0, 128)], [RED, (0, 255, 0), (128, 128, 128)]),
    # premultiplied 40 at alpha 51 is 40 * 255/51 = 200 straight; over white 255 - 55/5 = 244
    Case("La", "", [(40, 51)], [(244, 244, 244)]),
    # premultiplied (40, 20, 0) at 51 is (200, 100, 0); over white 255 - (255 - c)/5
    Case("RGBa", "", [(40, 20, 0, 51)], [(244, 224, 204)]),
    Case("RGBX", "", [(1, 2, 3, 99)], [(1, 2, 3)]),
    Case("I;16N", "", SIXTEEN, SIXTEEN_RGB),
    Case("I;16L", "", SIXTEEN, SIXTEEN_RGB),  # also from a file, while Pillow writes IM
    # a palette with an alpha column: red at 128 -> (255, 127, 127)
    Case("P", "", [0, 1], [(255, 127, 127), BLUE], palette=[(*RED, 128), (*BLUE, 255)], note="RGBA-palette"),
]
MEMORY_ONLY = ("HSV", "La", "RGBa", "RGBX", "I;16N")


@pytest.mark.parametrize("case", MEMORY_CASES, ids=[c.id for c in MEMORY_CASES])
def test_mode_converted_in_memory(case: Case):
    palette_mode = "RGBA" if case.palette and len(case.palette[0]) == 4 else "RGB"
    image = make(case.mode, case.pixels, case.palette, palette_mode)
    converted = to_rgb(image, source="memory")
    assert converted.mode == "RGB"
    assert block_centres(converted, len(case.pixels)) == case.expected


@pytest.mark.parametrize("mode", MEMORY_ONLY)
def test_no_writer_stores_the_memory_only_modes(mode):
    # why these rows are checked in memory: no format Pillow writes reopens in that mode. When a
    # Pillow release adds one, this fails and the row belongs in FILE_CASES.
    Image.init()
    reopens = []
    for image_format in sorted(Image.SAVE):
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # writers' deprecations (IM) are not the question here
            try:
                make(mode, [0]).save(buffer, format=image_format)
                buffer.seek(0)
                with Image.open(buffer) as opened:
                    if opened.mode == mode:
                        reopens.append(image_format)
            except Exception:  # noqa: BLE001 - most writers refuse most modes; that is the point
                continue
    assert not reopens, f"{mode} is stored by {reopens}: test it through a file"


REFUSED = [
    # 32-bit signed TIFF opens as I: no defined range
    ("I", "tif", "I", [0, 70000]),
    # 32-bit float, TIFF and PFM
    ("F", "tif", "F", [0.0, 0.5]),
    ("F", "ppm", "F", [0.0, 0.5]),
]


@pytest.mark.parametrize("mode,suffix,written,pixels", REFUSED, ids=[f"{m}-{s}" for m, s, _, _ in REFUSED])
def test_mode_without_a_range_is_refused_by_name(tmp_path: Path, mode, suffix, written, pixels):
    path = tmp_path / f"refused.{suffix}"
    make(written, pixels).save(path)
    with Image.open(path) as opened:
        assert opened.mode == mode
    with pytest.raises(ImageLoadError, match=rf"refused\.{suffix}: mode '{mode}' .*no defined value range"):
        load_image(path)


def test_every_pillow_mode_has_a_row():
    missing = sorted(set(Image.MODES) - set(images.CONVERSIONS))
    unknown = sorted(set(images.CONVERSIONS) - set(Image.MODES))
    assert not missing, f"Pillow modes with no conversion rule: {missing}"
    assert not unknown, f"rules for modes Pillow does not list: {unknown}"


def test_every_row_is_tested():
    tested = {c.mode for c in FILE_CASES + MEMORY_CASES} | {m for m, *_ in REFUSED}
    assert tested == set(images.CONVERSIONS), sorted(set(images.CONVERSIONS) ^ tested)


def test_the_docstring_table_lists_the_rules():
    lines = images.__doc__.splitlines()
    rules = [i for i, line in enumerate(lines) if re.fullmatch(r"=+( +=+)+", line)]
    assert len(rules) == 3, "the table is an RST simple table: rule, header, rule, rows, rule"
    width = lines[rules[0]].index(" ")  # the first column's width
    body = lines[rules[1] + 1 : rules[2]]
    documented = {mode for line in body if line[:1].strip() for mode in line[:width].strip().split(", ")}
    assert documented == set(images.CONVERSIONS), sorted(documented ^ set(images.CONVERSIONS))


def test_a_mode_missing_from_the_table_is_refused_by_name(monkeypatch):
    # what a mode a future Pillow adds meets: the table without HSV stands in for it
    monkeypatch.delitem(images.CONVERSIONS, "HSV")
    with pytest.raises(ImageLoadError, match=r"photo\.x: mode 'HSV' is not in the conversion table"):
        to_rgb(make("HSV", [(0, 255, 255)]), source="photo.x")


# --------------------------------------------------------------------------- orientation, frames, size

# a 2 x 1 image [A B] and how each EXIF orientation displays it (TIFF/EXIF 2.3, tag 274):
# 1 as stored; 2 mirrored; 3 rotated 180; 6 rotated 90 clockwise to display (A on top);
# 8 rotated 90 anticlockwise (B on top)
A, B = (200, 10, 10), (10, 10, 200)
ORIENTED = {1: [[A, B]], 2: [[B, A]], 3: [[B, A]], 6: [[A], [B]], 8: [[B], [A]]}


@pytest.mark.parametrize("orientation", sorted(ORIENTED))
def test_exif_orientation_is_applied(tmp_path: Path, orientation):
    path = tmp_path / "phone.png"
    exif = Image.Exif()
    exif[274] = orientation
    make("RGB", [A, B]).save(path, exif=exif)
    loaded = load_image(path)
    rows = ORIENTED[orientation]
    assert loaded.size == (BLOCK * len(rows[0]), BLOCK * len(rows))
    got = [[loaded.getpixel((BLOCK * x + 4, BLOCK * y + 4)) for x in range(len(row))] for y, row in enumerate(rows)]
    assert got == rows, f"orientation {orientation}"


def test_rotated_phone_jpeg_is_upright(tmp_path: Path):
    # the phone case: a portrait photo stored landscape with orientation 6 (black left, white right)
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[274] = 6
    make("L", [0, 255]).save(path, exif=exif, quality=100)
    loaded = load_image(path)
    assert loaded.size == (BLOCK, 2 * BLOCK)  # portrait
    assert block_column(loaded) == [(0, 0, 0), (255, 255, 255)]  # black on top


def block_column(image: Image.Image) -> list:
    return [image.getpixel((BLOCK // 2, BLOCK * y + BLOCK // 2)) for y in range(image.height // BLOCK)]


@pytest.mark.parametrize("suffix", ["gif", "tif", "png"])
def test_multi_frame_file_gives_its_first_frame(tmp_path: Path, suffix):
    path = tmp_path / f"frames.{suffix}"
    make("RGB", [RED]).save(path, save_all=True, append_images=[make("RGB", [BLUE])])
    with Image.open(path) as opened:
        assert getattr(opened, "n_frames", 1) == 2, "the writer must have stored both frames"
    assert block_centres(load_image(path), 1) == [RED]


def test_decompression_bomb_is_refused_naming_the_file(tmp_path: Path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (32, 32)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1024 pixels > 2 x 100: Pillow's error
    with pytest.raises(ImageLoadError, match=r"bomb\.png: .*MAX_IMAGE_PIXELS = 100"):
        load_image(path)


def test_decompression_bomb_warning_band(tmp_path: Path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (32, 32)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # 600 < 1024 <= 1200: Pillow warns only
    with pytest.warns(Image.DecompressionBombWarning):
        assert load_image(path).size == (32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # the user's choice to refuse
        with pytest.raises(ImageLoadError, match=r"big\.png"):
            load_image(path)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path):
    # the fault this module was written for: a 16-bit PNG that Image.convert("RGB") turns all white
    path = tmp_path / "depth.png"
    make("I;16", SIXTEEN).save(path)
    with Image.open(path) as opened:
        assert block_centres(opened.convert("RGB"), 4)[1:] == [(255, 255, 255)] * 3  # what convert() alone gives
    values = np.asarray(load_image(path))[BLOCK // 2, BLOCK // 2 :: BLOCK, 0]
    assert values.tolist() == [0, 1, 128, 255]
