"""Images: decode an image file into the 8-bit RGB picture the vision tower sees.

``load_image(path)`` opens a file with Pillow, decodes its first frame, turns it upright by its
EXIF orientation and converts it to 8-bit RGB by the table below (``to_rgb``). Anything it cannot
do faithfully raises ``ImageLoadError`` (an ``OSError``) naming the file and, where it is the
reason, the mode.

Conversion table: every mode in ``PIL.Image.MODES`` (Pillow 13) has a row; a mode that is not in
it (a future Pillow's, say) is refused naming the file and the mode. ``CONVERSIONS`` holds the
rules; ``tests/unit/test_image_modes.py`` writes each mode to a file, reads it back and checks the
values in the right-hand column.

=========================  ============  ==================================================================
mode                       values        becomes 8-bit RGB by
=========================  ============  ==================================================================
1                          0 / 1         0 -> (0, 0, 0), 1 -> (255, 255, 255) (Pillow's converter)
L                          0..255        v -> (v, v, v)
RGB                        0..255        as stored
RGBX                       0..255        the padding band X dropped
P                          palette       the palette colour; a transparent index or palette alpha is
                                         composited over white (below)
CMYK                       0..255        Pillow's converter: R = (255 - C)(255 - K) / 255, likewise G
                                         from M and B from Y (no ICC colour management)
YCbCr                      0..255        Pillow's converter, JPEG's full-range BT.601 (ITU-T T.871):
                                         R = Y + 1.402 (Cr - 128), G = Y - 0.344136 (Cb - 128)
                                         - 0.714136 (Cr - 128), B = Y + 1.772 (Cb - 128)
LAB                        0..255        Pillow's converter (LittleCMS, CIE L*a*b* D50 -> sRGB):
                                         L* = L / 255 * 100, a* = A - 128, b* = B - 128
HSV                        0..255        Pillow's converter; H = 0..255 is 0..360 degrees
LA, La, PA, RGBA, RGBa     0..255        composited over opaque white (below); La and RGBa are
                                         premultiplied and are un-premultiplied by Pillow first
I;16, I;16L, I;16B, I;16N  0..65535      v -> round(v / 257) on every channel (65535 / 255 = 257, so
                                         0 -> 0, 32896 -> 128, 65535 -> 255); scaled, never clipped
I                          see rule      from PNG or PPM, formats whose samples are at most 16-bit
                                         unsigned, as I;16 (Pillow's PPM reader rescales a 16-bit PGM's
                                         maxval to 65535; older Pillow releases open 16-bit grey PNG as
                                         I); from any other format (32-bit or signed 16-bit TIFF, FITS,
                                         IM) refused: the mode carries no range
F                          none          refused: 32-bit float has no defined range (0..1? 0..255?
                                         HDR radiance?), so any mapping would be a guess
=========================  ============  ==================================================================

Transparency: alpha bands, palette alpha and a file's transparent colour (PNG ``tRNS``, GIF's
transparent index: Pillow's ``info["transparency"]``) are composited over opaque white with
``PIL.Image.alpha_composite``, out = a/255 * colour + (1 - a/255) * 255, so (255, 0, 0, 128) ->
(255, 127, 127). This is what transformers does when an image with transparency reaches the BLIP
image processor: transformers 5.24's ``transformers.image_transforms.convert_to_rgb`` (called by
``BlipImageProcessorPil`` through ``image_processing_backends`` when ``do_convert_rgb``) composites
onto white with ``alpha_composite``; earlier releases' ``convert_to_rgb`` did ``image.convert("RGB")``,
keeping the colour under transparent pixels. Converting here makes the pixels the same whichever
release runs.

Other ways a reader can be unfaithful, and what this one does:

* EXIF orientation (phones write rotated JPEGs and record the rotation): applied with
  ``PIL.ImageOps.exif_transpose``, so the image is seen upright.
* Multi-frame files (animated GIF/PNG/WebP, multi-page TIFF, MPO): the first frame only, which is
  the one Pillow decodes on opening.
* Decompression bombs: Pillow's own check. An image of more than twice
  ``PIL.Image.MAX_IMAGE_PIXELS`` pixels is refused naming the file; between one and two times
  Pillow warns (``DecompressionBombWarning``) and the image loads, or, with that warning made an
  error (``-W error::PIL.Image.DecompressionBombWarning``), is refused naming the file too.
* 16-bit-per-channel colour (48-bit RGB PNG and the like): Pillow itself opens it as RGB or RGBA,
  8 bits per channel, and those rows apply.
* Embedded ICC colour profiles are not applied.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# transformers 5.24 image_transforms.convert_to_rgb composites onto (255, 255, 255, 255)
BACKGROUND = (255, 255, 255, 255)
# formats whose integer samples are at most 16-bit unsigned, so mode "I" from them means 0..65535
SIXTEEN_BIT_FORMATS = ("PNG", "PPM")
SIXTEEN_BIT_MAX = 65535


class ImageLoadError(OSError):
    """An image file cannot be decoded faithfully; the message names the file (and the mode, when that is why)."""


def load_image(path: str | Path, draft_size: int | None = None) -> Image.Image:
    """Open ``path`` and return its first frame, upright, as an 8-bit RGB PIL image.

    The image is decoded here, so a truncated file fails now and not inside the collator; it
    is turned by its EXIF orientation and converted by the module's conversion table
    (``to_rgb``). Raises ``ImageLoadError`` naming the file for a file Pillow cannot identify
    or decode, a decompression bomb (Pillow's check), and a mode the table refuses or lacks.

    ``draft_size`` (pixels; JPEG files only, others ignore it): Pillow's draft mode, in which
    libjpeg scales by 1/2, 1/4 or 1/8 while decoding, keeping both sides at least
    ``draft_size``; the image processor's resize then starts from the smaller image. Faster
    and not identical to decoding in full: ``--image-decode`` in training/run_config.py gives
    the figures and why it is not the default.
    """
    try:
        with Image.open(path) as opened:
            if draft_size is not None and opened.format == "JPEG":
                opened.draft(opened.mode, (draft_size, draft_size))  # the mode stays: to_rgb converts it
            opened.load()  # decode now (frame 0), so truncation surfaces here
            upright = ImageOps.exif_transpose(opened)  # a new image; the file's format stays on `opened`
            image_format = opened.format
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(
            f"cannot load image {path}: {exc} (Pillow's limit PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS})"
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # what Pillow's decoders raise on bad data
        raise ImageLoadError(f"cannot load image {path}: {exc}") from exc
    return to_rgb(upright, source=str(path), image_format=image_format)


def to_rgb(image: Image.Image, source: str = "<image>", image_format: str | None = None) -> Image.Image:
    """``image`` as 8-bit RGB by the module's conversion table (a new image; ``image`` is unchanged).

    ``source`` names the image in errors (``load_image`` passes the path); ``image_format`` is
    the file format it was read from (default: ``image.format``), which decides mode ``I``.
    Raises ``ImageLoadError`` naming ``source`` and the mode for a mode the table refuses or lacks.
    """
    convert = CONVERSIONS.get(image.mode)
    if convert is None:
        raise ImageLoadError(
            f"cannot load image {source}: mode {image.mode!r} is not in the conversion table of qformer_lora.images"
        )
    return convert(image, source, image_format if image_format is not None else image.format)


def has_transparency(image: Image.Image) -> bool:
    """Whether ``image`` carries alpha: an alpha band, palette alpha, or a transparent colour in ``info``.

    transformers 5.24's check (an ``"A"`` band or ``info["transparency"]``) plus premultiplied
    ``a`` bands and palettes with an alpha column.
    """
    if {"A", "a"} & set(image.getbands()) or image.info.get("transparency") is not None:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode.endswith("A")


def over_white(rgba: Image.Image) -> Image.Image:
    """An RGBA image composited over opaque white, as RGB (``PIL.Image.alpha_composite``)."""
    return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND), rgba).convert("RGB")


def _eight_bit(image: Image.Image, source: str, image_format: str | None) -> Image.Image:
    """Pillow's converter for 8-bit modes; via RGBA over white when the image carries transparency."""
    if not has_transparency(image):
        return image.convert("RGB")
    # La has no direct converter to RGBA; Pillow un-premultiplies it on the way to LA
    straight = image.convert("LA") if image.mode == "La" else image
    return over_white(straight.convert("RGBA"))


def _sixteen_bit(image: Image.Image, source: str, image_format: str | None) -> Image.Image:
    """0..65535 grey -> round(v / 257): 65535 / 255 is exactly 257, so no value falls on a tie."""
    values = np.asarray(image)  # uint16 in the mode's byte order (or int32 for mode I)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > SIXTEEN_BIT_MAX:
        raise ImageLoadError(
            f"cannot load image {source}: mode {image.mode!r} from {image_format} holds values {low}..{high},"
            f" outside the 0..{SIXTEEN_BIT_MAX} its format allows"
        )
    grey = Image.fromarray(np.rint(values / 257.0).astype(np.uint8))
    transparent = image.info.get("transparency")
    if transparent is None:
        return grey.convert("RGB")
    # PNG tRNS for 16-bit grey names a 16-bit value; compare before scaling, where it is exact
    alpha = Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8))
    return over_white(Image.merge("LA", (grey, alpha)).convert("RGBA"))


def _thirty_two_bit(image: Image.Image, source: str, image_format: str | None) -> Image.Image:
    """Mode I: 0..65535 from a format that stores at most 16-bit unsigned samples, else refused."""
    if image_format in SIXTEEN_BIT_FORMATS:
        return _sixteen_bit(image, source, image_format)
    low, high = image.getextrema()
    raise ImageLoadError(
        f"cannot load image {source}: mode 'I' (32-bit signed integer) from {image_format or 'memory'} has no"
        f" defined value range (this image holds {low}..{high}); save it as 8-bit (L, RGB) or 16-bit"
        " unsigned (I;16) PNG so that black and white are known"
    )


def _refuse_float(image: Image.Image, source: str, image_format: str | None) -> Image.Image:
    low, high = image.getextrema()
    raise ImageLoadError(
        f"cannot load image {source}: mode 'F' (32-bit float) has no defined value range (this image holds"
        f" {low:g}..{high:g}); save it as 8-bit (L, RGB) or 16-bit unsigned (I;16) PNG so that black and white"
        " are known"
    )


Converter = Callable[[Image.Image, str, str | None], Image.Image]

# mode -> rule; the module docstring's table says what each does, and the tests check both agree
CONVERSIONS: dict[str, Converter] = {
    **dict.fromkeys(
        ("1", "L", "RGB", "RGBX", "P", "CMYK", "YCbCr", "LAB", "HSV", "LA", "La", "PA", "RGBA", "RGBa"), _eight_bit
    ),
    **dict.fromkeys(("I;16", "I;16L", "I;16B", "I;16N"), _sixteen_bit),
    "I": _thirty_two_bit,
    "F": _refuse_float,
}
