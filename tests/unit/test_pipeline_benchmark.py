"""Data-pipeline throughput on one core: decode and process COCO-sized JPEGs at 224 px.

    pytest -m long tests/unit/test_pipeline_benchmark.py --benchmark-columns=median,iqr,rounds

Each round loads a batch of 16 640 x 480 photo-like JPEGs (synthetic.write_photo_jpegs) through
the training path (ManifestDataset, then the Collator's BLIP image processor and tokenizers) in
one thread; ``images_per_s_per_core`` in the benchmark's extra_info is 16 / the round's median.
``exact`` decodes in full (the default); ``draft`` lets libjpeg scale while decoding
(``--image-decode draft``). DataLoader workers multiply the per-core figure by their count, up
to the cores left over from the step.
"""

from __future__ import annotations

import pytest
import torch

from qformer_lora import data, inputs, synthetic

BATCH = 16
IMAGE_SIZE = 224  # InstructBLIP's and BLIP-2's ViT-g input (vision_config.image_size of the full-size presets)

pytestmark = pytest.mark.long  # a benchmark, not a correctness check: run by .ci/run (pytest -m long)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    directory = tmp_path_factory.mktemp("photos")
    synthetic.write_photo_jpegs(directory, BATCH)
    return directory / "manifest.jsonl"


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("decode", ["exact", "draft"])
def test_images_per_second_per_core(benchmark, photos, one_thread, decode):
    draft_size = IMAGE_SIZE if decode == "draft" else None
    dataset = data.ManifestDataset(data.read_manifest(photos), draft_size=draft_size)
    processor = data.build_processor("instructblip", image_size=IMAGE_SIZE)
    collator = inputs.Collator(processor, family="instructblip", decoder_only=False)

    batch = benchmark.pedantic(lambda: collator([dataset[i] for i in range(BATCH)]), rounds=5, warmup_rounds=1)

    benchmark.extra_info["images_per_s_per_core"] = BATCH / benchmark.stats.stats.median
    assert batch["pixel_values"].shape == (BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
