"""The vision-feature cache: exact, invalidated by whatever changes the features, refused when unsafe."""

from __future__ import annotations

import copy
import functools
import os
import types

import pytest
import torch
from safetensors import safe_open

from qformer_lora import compat, data, forward, images, lora, presets, synthetic
from qformer_lora.training import feature_cache
from qformer_lora.training.feature_cache import FeatureCache, FeatureCacheError, attach_cached_features

T5, OPT = "tiny-instructblip-flan-t5", "tiny-blip2-opt"


@functools.cache
def _adapter_model(preset: str):
    torch.manual_seed(0)
    model = lora.apply_lora(presets.build_model(preset), lora.LoraSpec(r=2, alpha=4, dropout=0.0))
    # lora_B starts at zero, which makes every lora_A gradient zero: nudge it so that the
    # gradient comparison covers all adapter tensors
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    return model.eval()


def adapter_model(preset: str = T5):
    return copy.deepcopy(_adapter_model(preset))


def loss_and_grads(model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    params = lora.adapter_parameters(model)
    for p in params:
        p.grad = None
    out = forward.custom_forward(model, batch)
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in params]


def assert_identical(reference, observed, what: str):
    (ref_loss, ref_grads), (loss, grads) = reference, observed
    assert torch.equal(loss, ref_loss), f"{what}: loss {loss.item()!r} vs {ref_loss.item()!r} without the cache"
    gaps = [(g - r).abs().max().item() for g, r in zip(grads, ref_grads)]
    assert max(gaps) == 0.0, f"{what}: adapter gradients differ by up to {max(gaps):.3e} (expected bitwise equal)"
    assert any(g.abs().sum() > 0 for g in ref_grads), "the comparison is vacuous: all gradients are zero"


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("preset", [T5, OPT])
def test_loss_and_gradients_identical_with_memory_cache(preset):
    model = adapter_model(preset)
    batch = synthetic.random_batch(model, batch_size=3, pad_rows=1, seed=1)
    reference = loss_and_grads(model, batch)
    cache = FeatureCache(model)
    first = loss_and_grads(model, attach_cached_features(model, batch, cache))  # computes and stores
    second = loss_and_grads(model, attach_cached_features(model, batch, cache))  # served from memory
    assert cache.stats.misses == 3 and cache.stats.memory_hits == 3, cache.stats
    assert_identical(reference, first, f"{preset}, first pass (misses)")
    assert_identical(reference, second, f"{preset}, second pass (hits)")


def test_loss_and_gradients_identical_from_disk_in_a_new_process_state(tmp_path):
    model = adapter_model()
    batch = synthetic.random_batch(model, batch_size=2, seed=2)
    reference = loss_and_grads(model, batch)
    attach_cached_features(model, batch, FeatureCache(model, directory=tmp_path))
    # a second cache object knows nothing in memory: everything must come from the files
    fresh = FeatureCache(model, directory=tmp_path)
    observed = loss_and_grads(model, attach_cached_features(model, batch, fresh))
    assert fresh.stats.disk_hits == 2 and fresh.stats.misses == 0, fresh.stats
    assert_identical(reference, observed, "features read back from safetensors")


def test_second_pass_does_not_run_the_vision_encoder():
    model = adapter_model()
    calls = []
    compat.unwrap(model).vision_model.register_forward_hook(lambda *args: calls.append(1))
    batch = synthetic.random_batch(model, batch_size=2)
    cache = FeatureCache(model)
    forward.custom_forward(model, attach_cached_features(model, batch, cache))
    forward.custom_forward(model, attach_cached_features(model, batch, cache))
    assert len(calls) == 1, f"vision encoder ran {len(calls)} times for two passes over one batch (expected 1)"


def test_mixed_batch_keeps_row_order_and_only_computes_the_misses():
    model = adapter_model()
    cache = FeatureCache(model)
    a = synthetic.random_batch(model, batch_size=2, seed=3)["pixel_values"]
    b = synthetic.random_batch(model, batch_size=2, seed=4)["pixel_values"]
    cache.features(model, a)
    mixed = torch.stack([b[0], a[1], b[1], a[0]])
    got = cache.features(model, mixed)
    assert cache.stats.misses == 4 and cache.stats.memory_hits == 2, cache.stats
    with torch.no_grad():
        direct = forward.encode_images(compat.unwrap(model), mixed)
    # the cached rows were computed in batches of another composition, which CPU GEMMs may round
    # differently in the last bits (measured: up to 2e-7 of the feature scale); a wrong row
    # order would be off by the scale itself
    gap = ((got - direct).abs().max() / direct.abs().max()).item()
    assert gap <= 1e-5, f"cached rows differ from a direct encoder run by {gap:.2e} of the scale: wrong row order?"


def test_dropping_pixels_still_runs_and_matches():
    model = adapter_model()
    batch = synthetic.random_batch(model, batch_size=2)
    reference = loss_and_grads(model, batch)
    slim = attach_cached_features(model, batch, FeatureCache(model), drop_pixels=True)
    assert "pixel_values" not in slim and "pixel_values" in batch, "the caller's batch must not be modified"
    assert_identical(reference, loss_and_grads(model, slim), "batch without pixel_values")


# ----------------------------------------------------------------------------- invalidation


def test_a_changed_image_misses():
    model = adapter_model()
    cache = FeatureCache(model)
    pixels = synthetic.random_batch(model, batch_size=2)["pixel_values"]
    cache.features(model, pixels)
    changed = pixels.clone()
    changed[1, 0, 0, 0] += 1e-3  # one pixel of the second image
    cache.features(model, changed)
    assert cache.stats.memory_hits == 1 and cache.stats.misses == 3, (
        f"expected the unchanged image to hit and the changed one to miss: {cache.stats}"
    )


def shapes_image():
    return images.load_image(data.read_manifest(data.SHAPES_DIR / "train.jsonl")[0].image_path)


def test_changed_preprocessing_misses():
    model = adapter_model()
    cache = FeatureCache(model)
    size = compat.unwrap(model).config.vision_config.image_size
    standard = data.build_processor("instructblip", image_size=size).image_processor
    renormalised = copy.deepcopy(standard)
    renormalised.image_mean = [0.5, 0.5, 0.5]
    image = shapes_image()
    cache.features(model, standard(image, return_tensors="pt")["pixel_values"])
    cache.features(model, renormalised(image, return_tensors="pt")["pixel_values"])
    cache.features(model, standard(image, return_tensors="pt")["pixel_values"])
    assert (cache.stats.misses, cache.stats.memory_hits) == (2, 1), (
        f"other normalisation must miss, the same settings hit: {cache.stats}"
    )


def test_file_key_covers_bytes_size_and_normalisation(tmp_path):
    processor = data.build_processor("instructblip", image_size=30).image_processor
    path = data.read_manifest(data.SHAPES_DIR / "train.jsonl")[0].image_path
    key = feature_cache.image_file_key(path, processor)
    assert key == feature_cache.image_file_key(path.read_bytes(), processor), "path and bytes must agree"
    assert key == feature_cache.image_file_key(path, copy.deepcopy(processor)), "same settings, same key"
    resized = data.build_processor("instructblip", image_size=32).image_processor
    renormalised = copy.deepcopy(processor)
    renormalised.image_std = [0.25, 0.25, 0.25]
    edited = tmp_path / "edited.png"
    edited.write_bytes(path.read_bytes() + b"\0")
    others = {
        "image size": feature_cache.image_file_key(path, resized),
        "normalisation": feature_cache.image_file_key(path, renormalised),
        "file bytes": feature_cache.image_file_key(edited, processor),
    }
    same = [what for what, other in others.items() if other == key]
    assert not same, f"the file key ignores a change of: {same}"


def test_changed_vision_weights_miss_in_memory_and_on_disk(tmp_path):
    model = adapter_model()
    cache = FeatureCache(model, directory=tmp_path)
    pixels = synthetic.random_batch(model, batch_size=2)["pixel_values"]
    before = cache.features(model, pixels)
    with torch.no_grad():  # an in-place edit, as load_state_dict would do
        compat.unwrap(model).vision_model.post_layernorm.weight.mul_(1.5)
    after = cache.features(model, pixels)
    with torch.no_grad():
        expected = forward.encode_images(compat.unwrap(model), pixels)
    assert cache.stats.fingerprint_changes == 1 and cache.stats.misses == 4, cache.stats
    assert torch.equal(after, expected), "features after a weight change are not the new encoder's"
    assert not torch.equal(after, before), "the weight change did not change the features: vacuous test"
    # a later run reads the files of its own weights only (the original weights' files are there too)
    original = adapter_model()
    for run_model, expected_disk_hits in ((original, 2), (model, 2), (adapter_model(), 2)):
        fresh = FeatureCache(run_model, directory=tmp_path)
        fresh.features(run_model, pixels)
        assert fresh.stats.disk_hits == expected_disk_hits, fresh.stats
    edited = adapter_model()
    with torch.no_grad():
        compat.unwrap(edited).vision_model.post_layernorm.bias.add_(0.25)
    fresh = FeatureCache(edited, directory=tmp_path)
    fresh.features(edited, pixels)
    assert (fresh.stats.disk_hits, fresh.stats.misses) == (0, 2), (
        f"features of other vision weights were read from disk: {fresh.stats}"
    )


def test_replaced_weight_tensor_is_noticed():
    model = adapter_model()
    cache = FeatureCache(model)
    pixels = synthetic.random_batch(model, batch_size=1)["pixel_values"]
    cache.features(model, pixels)
    layernorm = compat.unwrap(model).vision_model.post_layernorm
    layernorm.weight.data = layernorm.weight.data * 2  # new storage, version counter starts over
    cache.features(model, pixels)
    assert cache.stats.misses == 2, f"a replaced weight tensor went unnoticed: {cache.stats}"


def test_features_computed_without_autocast_are_not_served_under_autocast():
    """fp16-amp runs the encoder under autocast, which changes its arithmetic: features cached
    in another precision mode must miss, and the ones served under autocast must be exact."""
    model = adapter_model()
    batch = synthetic.random_batch(model, batch_size=2)
    cache = FeatureCache(model)
    attach_cached_features(model, batch, cache)  # fp32 features
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = loss_and_grads(model, batch)
        first = loss_and_grads(model, attach_cached_features(model, batch, cache))
        second = loss_and_grads(model, attach_cached_features(model, batch, cache))
    assert (cache.stats.misses, cache.stats.memory_hits) == (4, 2), (
        f"features from outside autocast were served under autocast: {cache.stats}"
    )
    assert_identical(reference, first, "under autocast, misses")
    assert_identical(reference, second, "under autocast, hits")


# ----------------------------------------------------------------------------- refusals


def test_refused_with_augmentation():
    with pytest.raises(FeatureCacheError, match="augmentation is on"):
        FeatureCache(adapter_model(), augment=True)


def test_refused_with_a_trainable_vision_encoder():
    model = adapter_model()
    compat.unwrap(model).vision_model.post_layernorm.weight.requires_grad_(True)
    with pytest.raises(FeatureCacheError, match=r"trainable parameter.*post_layernorm"):
        FeatureCache(model)


def test_refused_when_the_encoder_becomes_trainable_after_construction():
    model = adapter_model()
    cache = FeatureCache(model)
    batch = synthetic.random_batch(model, batch_size=1)
    attached = attach_cached_features(model, batch, cache)
    compat.unwrap(model).vision_model.embeddings.patch_embedding.weight.requires_grad_(True)
    with pytest.raises(FeatureCacheError, match="trainable"):
        cache.features(model, batch["pixel_values"])
    # and features attached earlier are refused by the forward itself
    with pytest.raises(ValueError, match="trainable"):
        forward.custom_forward(model, attached)


def test_refused_with_active_dropout_in_the_encoder():
    model = adapter_model()
    vision = compat.unwrap(model).vision_model
    vision.encoder.layers[0].self_attn.attention_dropout = 0.1
    FeatureCache(model)  # eval mode: the rate does nothing, so this is fine
    vision.train()
    with pytest.raises(FeatureCacheError, match="dropout is active"):
        FeatureCache(model)


def test_image_embeds_of_the_wrong_width_are_refused():
    model = adapter_model()
    batch = synthetic.random_batch(model, batch_size=1)
    batch["image_embeds"] = torch.zeros(1, 5, 7)
    with pytest.raises(ValueError, match=r"\(batch, tokens, 32\)"):
        forward.custom_forward(model, batch)


def vision_stub(device: str, hidden: int = 4):
    """Just what precomputed_image_embeds reads: the vision width and a vision encoder's parameters."""
    config = types.SimpleNamespace(vision_config=types.SimpleNamespace(hidden_size=hidden))
    return types.SimpleNamespace(config=config, vision_model=torch.nn.Linear(hidden, hidden, device=device))


def test_precomputed_image_embeds_move_to_the_vision_encoder_device():
    """Features cached on the CPU follow the encoder (here on the meta device, which needs no accelerator)."""
    embeds = torch.zeros(2, 5, 4)
    moved = forward.precomputed_image_embeds(vision_stub("meta"), embeds, trainable=False)
    assert moved.device.type == "meta" and moved.shape == (2, 5, 4), (moved.device, moved.shape)


def test_precomputed_image_embeds_refused_for_a_trainable_encoder_with_the_way_out():
    with pytest.raises(ValueError) as caught:
        forward.precomputed_image_embeds(vision_stub("cpu"), torch.zeros(2, 5, 4), trainable=True)
    assert str(caught.value) == (
        "the batch carries precomputed image_embeds but the vision encoder has trainable parameters: the features "
        "would be stale and get no gradient; drop image_embeds (turn the feature cache off) or freeze the "
        "vision encoder"
    ), str(caught.value)


# ----------------------------------------------------------------------------- files


def test_files_are_safetensors_with_metadata_and_no_temporaries(tmp_path):
    model = adapter_model()
    cache = FeatureCache(model, directory=tmp_path)
    pixels = synthetic.random_batch(model, batch_size=2)["pixel_values"]
    cache.features(model, pixels)
    files = sorted(tmp_path.rglob("*"))
    stored = [f for f in files if f.is_file()]
    assert len(stored) == 2 and all(f.suffix == ".safetensors" for f in stored), f"unexpected files: {files}"
    with safe_open(str(stored[0]), framework="pt") as f:
        meta = f.metadata()
        assert meta["fingerprint"] == cache.fingerprint and stored[0].stem == meta["key"], meta
        assert f.get_tensor("last_hidden_state").shape[-1] == 32


def test_an_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    import safetensors.torch

    model = adapter_model()
    cache = FeatureCache(model, directory=tmp_path)

    def dies_half_way(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        cache.features(model, synthetic.random_batch(model, batch_size=1)["pixel_values"])
    left = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not left, f"an interrupted write left {left} behind (the write is not atomic)"


def test_a_damaged_file_is_a_miss_and_is_rewritten(tmp_path):
    model = adapter_model()
    pixels = synthetic.random_batch(model, batch_size=1)["pixel_values"]
    expected = FeatureCache(model, directory=tmp_path).features(model, pixels)
    (stored,) = [p for p in tmp_path.rglob("*.safetensors")]
    stored.write_bytes(stored.read_bytes()[:40])  # truncated, e.g. by a copy tool
    fresh = FeatureCache(model, directory=tmp_path)
    with pytest.warns(UserWarning, match="unreadable"):
        got = fresh.features(model, pixels)
    assert fresh.stats.misses == 1 and torch.equal(got, expected), fresh.stats
    assert os.path.getsize(stored) > 40, "the damaged file was not rewritten"


def test_the_training_step_takes_its_vision_features_from_the_cache():
    """make_step(cache=...): the step's forward attaches the cached features, so two steps over one batch run
    the vision encoder once (the first step's misses fill the cache through the step's own model)."""
    from qformer_lora.training import step

    model = adapter_model()
    calls = []
    compat.unwrap(model).vision_model.register_forward_hook(lambda *args: calls.append(1))
    cache = FeatureCache(model)
    optimizer = torch.optim.SGD(lora.adapter_parameters(model), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    parts = step.make_step(model, optimizer, scheduler, precision_name="fp32", device="cpu", cache=cache)
    batch = synthetic.random_batch(model, batch_size=2)
    first, second = (step.training_step(parts, [batch], index=i) for i in range(2))
    assert len(calls) == 1, f"the vision encoder ran {len(calls)} times in two steps over one batch (expected 1)"
    assert first.batch_losses == second.batch_losses  # lr 0: the same adapter, the same features
