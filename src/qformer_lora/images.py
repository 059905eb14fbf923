"""Images: decode an image file into the RGB picture the vision tower sees.

``load_image`` path -> RGB PIL image; ``ImageLoadError`` (an ``OSError``) names the file.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError


class ImageLoadError(OSError):
    """An image file cannot be decoded; the message names the file."""


def load_image(path: str | Path) -> Image.Image:
    """Open an image and return it as RGB.

    Grayscale, palette and RGBA files are converted (the vision tower wants 3
    channels; rejecting them would make real-world manifests brittle). RGBA's
    alpha is dropped, not composited. Truncated or non-image files raise
    ``ImageLoadError`` naming the file instead of PIL's path-less message.
    """
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so truncation surfaces here and not inside the collator
            if image.mode == "P" and "transparency" in image.info:
                # Going via RGBA avoids PIL's "palette with transparency" warning.
                image = image.convert("RGBA")
            return image.convert("RGB") if image.mode != "RGB" else image.copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageLoadError(f"cannot load image {path}: {exc}") from exc
