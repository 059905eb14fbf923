"""``--image-decode``: draft JPEG decoding, and the rule that keeps it off by default.

The rule (training/run_config.py, HELP["image_decode"]): draft decoding could be the default
only if the processed pixels it gives differed from full decoding by no more, on average, than
re-saving the same JPEG at quality 95 and decoding that in full does: a change the pipeline
already accepts whenever a dataset is re-saved. Measured here on COCO-sized photo-like JPEGs
at 224 px, so a change of Pillow, libjpeg or the image processor that moves the figures moves
the verdict, and this test then says which way.
"""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from qformer_lora import data, images, synthetic
from qformer_lora.training.run_config import TrainConfig

IMAGE_SIZE = 224


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return synthetic.write_photo_jpegs(tmp_path_factory.mktemp("photos"), 6)


def levels(processor, pictures) -> torch.Tensor:
    """Processed pixel values, un-normalised to 0..255 levels (the processor divides by std)."""
    values = processor(pictures, return_tensors="pt")["pixel_values"]
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    return values * std * 255


def resaved(path, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    images.load_image(path).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return images.to_rgb(Image.open(buffer))


def test_draft_decoding_scales_jpegs_only(photos, tmp_path):
    """640 x 480 at draft size 224: libjpeg's 1/2 scale (320 x 240) is the smallest with both sides >= 224."""
    assert images.load_image(photos[0], draft_size=IMAGE_SIZE).size == (320, 240)
    assert images.load_image(photos[0], draft_size=100).size == (160, 120)  # 1/4: 120 >= 100, 1/8 would give 60
    png = tmp_path / "same.png"
    images.load_image(photos[0]).save(png)
    assert images.load_image(png, draft_size=IMAGE_SIZE).size == (640, 480)


def test_default_decoding_follows_the_stated_tolerance(photos):
    processor = data.build_processor("instructblip", image_size=IMAGE_SIZE).image_processor
    exact = levels(processor, [images.load_image(p) for p in photos])
    draft = levels(processor, [images.load_image(p, draft_size=IMAGE_SIZE) for p in photos])
    reference = levels(processor, [resaved(p, 95) for p in photos])
    draft_error, resave_error = (draft - exact).abs().mean().item(), (reference - exact).abs().mean().item()
    assert draft_error > 0, "draft decoding gave the exact pixels: the draft path did not run"
    within = draft_error <= resave_error
    assert (TrainConfig().image_decode == "draft") == within, (
        f"draft decoding differs by {draft_error:.3f} levels on average, re-saving at quality 95 by "
        f"{resave_error:.3f}: the default should be {'draft' if within else 'exact'}"
    )


def test_dataset_passes_the_draft_size(photos):
    samples = data.read_manifest(photos[0].parent / "manifest.jsonl")
    assert data.ManifestDataset(samples, draft_size=IMAGE_SIZE)[0].image.size == (320, 240)
    assert data.ManifestDataset(samples)[0].image.size == (640, 480)
