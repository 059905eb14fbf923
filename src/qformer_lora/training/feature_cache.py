"""Vision-feature cache: the frozen vision encoder runs once per image, not once per epoch.

With LoRA on the Q-Former only, the vision encoder is frozen, so its output
(``last_hidden_state``) for a given image never changes during a run. This module
stores it, in memory (a dict) or on disk (one safetensors file per image), and
hands it back through ``batch["image_embeds"]``, which forward.encode_images uses
instead of running the encoder. Read top to bottom:

1. keys: ``pixel_key`` (hash of the preprocessed pixel_values bytes) or
   ``image_file_key`` (hash of the image file bytes + the preprocessing settings);
   ``model_fingerprint`` (hash of the encoder's state_dict bytes, dtype, device type,
   config, library versions).
2. ``FeatureCache``: lookup memory -> disk -> compute the misses in one encoder call.
3. ``attach_cached_features(model, batch, cache)``: what the loop calls.

Entries are namespaced by the fingerprint and the autocast state at compute time, so
changed weights, dtype, device or precision mode miss instead of returning stale features.
Refused (``FeatureCacheError``) when features are not a function of the image: image
augmentation on, a trainable vision encoder, or active dropout in the encoder.

Exact: for a given batch, loss and gradients are bitwise those without the cache (tests;
safetensors stores the bytes unchanged). A feature is what the encoder gave in the batch
the image first appeared in; CPU and GPU GEMMs may round a batch of another composition
differently in the last bits, so a whole run matches one without the cache to that noise
(default run, 2 epochs on CPU: step losses within 1e-6 relative). Call
``attach_cached_features`` inside the forward's autocast context (training/train.py's ``run_forward``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import compat, forward, writes

FEATURE_NAME = "last_hidden_state"
FORMAT_VERSION = "1"  # bump when the key or file layout changes: old entries then simply miss


class FeatureCacheError(ValueError):
    """The cache cannot be used for this model or data (the message says why)."""


# ----------------------------------------------------------------------------- 1. keys


def _tensor_bytes(tensor: torch.Tensor):
    """The raw bytes of ``tensor`` (CPU, contiguous) as a buffer for hashlib, any dtype."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def pixel_key(pixel_values: torch.Tensor) -> str:
    """Key of one preprocessed image (C, H, W): its shape, dtype and bytes.

    Preprocessing (size, normalisation, resampling) is part of the key for free: any
    change gives other pixels, hence another key.
    """
    h = hashlib.sha256(f"pixels|{tuple(pixel_values.shape)}|{pixel_values.dtype}|".encode())
    h.update(_tensor_bytes(pixel_values))
    return h.hexdigest()


def pixel_keys(pixel_values: torch.Tensor) -> list[str]:
    """One key per row of a (B, C, H, W) batch; run it on the CPU copy (before to_device) when you can."""
    cpu = pixel_values.detach().to("cpu")
    return [pixel_key(row) for row in cpu]


def preprocessing_fingerprint(image_processor) -> str:
    """Hash of every setting of an image processor (size, mean/std, resample, rescale, ...)."""
    settings = image_processor.to_dict() if hasattr(image_processor, "to_dict") else dict(image_processor)
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def image_file_key(image: str | os.PathLike | bytes, image_processor) -> str:
    """Key of an image file before preprocessing: file bytes + preprocessing settings.

    Lets a data pipeline look features up without decoding or resizing the image.
    """
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    h = hashlib.sha256(f"file|{preprocessing_fingerprint(image_processor)}|".encode())
    h.update(data)
    return h.hexdigest()


def model_fingerprint(model) -> str:
    """Hash of what determines the vision encoder's output besides the image.

    Weights and buffers (names, dtypes, shapes, bytes), the vision config and attention
    implementation, the device type (CPU and GPU kernels round differently) and the
    library versions (a release may change the encoder's implementation). Hashing reads
    every weight once: about 2 GB, a few seconds, for the full-size ViT-g in bf16.
    """
    vision = compat.unwrap(model).vision_model
    config = vision.config.to_dict() if hasattr(vision.config, "to_dict") else {}
    described = {
        "format": FORMAT_VERSION,
        "config": config,
        "device": next(vision.parameters()).device.type,
        "attention": getattr(vision.config, "_attn_implementation", None),
        "versions": compat.versions(),
    }
    h = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vision.state_dict().items()):
        h.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(_tensor_bytes(tensor))
    return h.hexdigest()


def _weights_state(vision) -> tuple:
    """Cheap per-call proxy for "weights unchanged": each tensor's storage and in-place version
    counter (bumped by copy_, load_state_dict, optimizer steps). A change triggers a re-hash."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in vision.state_dict(keep_vars=True).values())


def refusal_reason(model, augment: bool) -> str | None:
    """Why features of this model/data are not a function of the image alone, or None."""
    if augment:
        return (
            "image augmentation is on: the same image gives different pixels, hence different features, "
            "every epoch, so a cached feature would be stale; turn augmentation or the feature cache off"
        )
    vision = compat.unwrap(model).vision_model
    trainable = [n for n, p in vision.named_parameters() if p.requires_grad]
    if trainable:
        return (
            f"the vision encoder has {len(trainable)} trainable parameter(s) (first: {trainable[0]}): its "
            f"features change every step, so cached ones would be stale; freeze it or turn the cache off"
        )
    for name, module in vision.named_modules():
        if not module.training:
            continue
        rates = (
            {"p": module.p}
            if isinstance(module, torch.nn.Dropout)
            else {k: v for k, v in vars(module).items() if "dropout" in k and isinstance(v, float)}
        )
        active = {k: v for k, v in rates.items() if v > 0}
        if active:
            return (
                f"dropout is active in the vision encoder ({name or 'vision_model'}: {active}, training "
                f"mode): its features are random; put the vision encoder in eval mode or turn the cache off"
            )
    return None


# ----------------------------------------------------------------------------- 2. the cache


@dataclass
class CacheStats:
    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    fingerprint_changes: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.memory_hits + self.disk_hits + self.misses
        return (self.memory_hits + self.disk_hits) / total if total else 0.0


class FeatureCache:
    """Vision features by (model fingerprint, autocast state, image key).

    ``directory=None`` keeps them in memory only; with a directory each feature is also
    written to ``directory/<namespace>/<key[:2]>/<key>.safetensors`` (atomically) and read
    back from there by later runs. ``memory=False`` with a directory keeps nothing in RAM.
    ``memory_device`` is where in-memory features live ("cpu" spares GPU memory; None
    keeps them where they were computed).
    """

    def __init__(
        self,
        model,
        *,
        directory: str | os.PathLike | None = None,
        augment: bool = False,
        memory: bool = True,
        memory_device: str | torch.device | None = "cpu",
    ):
        reason = refusal_reason(model, augment)
        if reason is not None:
            raise FeatureCacheError(f"feature cache refused: {reason}")
        if directory is None and not memory:
            raise FeatureCacheError("feature cache with memory=False needs a directory (it would store nothing)")
        self.directory = Path(directory) if directory is not None else None
        self.memory = memory
        self.memory_device = torch.device(memory_device) if memory_device is not None else None
        self.stats = CacheStats()
        self._entries: dict[tuple[str, str], torch.Tensor] = {}
        self._vision = compat.unwrap(model).vision_model
        self.fingerprint = model_fingerprint(model)
        self._weights = _weights_state(self._vision)

    def __len__(self) -> int:
        return len(self._entries)

    def _check_model(self, model) -> None:
        """Refuse a model that became unsuitable; re-fingerprint when weights may have changed."""
        vision = compat.unwrap(model).vision_model
        reason = refusal_reason(model, augment=False)
        if reason is not None:
            raise FeatureCacheError(f"feature cache refused: {reason}")
        weights = _weights_state(vision)
        if vision is not self._vision or weights != self._weights:
            fingerprint = model_fingerprint(model)
            if fingerprint != self.fingerprint:
                self.stats.fingerprint_changes += 1
                self._entries.clear()  # stale; disk entries live under the old namespace and just miss
            self._vision, self._weights, self.fingerprint = vision, weights, fingerprint

    def _namespace(self, device_type: str) -> str:
        # the autocast mode the features are computed in is part of the namespace: autocast
        # changes the encoder's arithmetic, so its features are not the fp32 ones
        return hashlib.sha256(f"{self.fingerprint}|{compat.autocast_state(device_type)}".encode()).hexdigest()[:32]

    def _path(self, namespace: str, key: str) -> Path:
        return self.directory / namespace / key[:2] / f"{key}.safetensors"

    def features(self, model, pixel_values: torch.Tensor, keys: list[str] | None = None) -> torch.Tensor:
        """Vision features (B, tokens, hidden) for ``pixel_values``, from the cache where possible.

        ``keys`` (one per row, e.g. from ``image_file_key``) replace the pixel hashes.
        The misses go through the encoder together, in the caller's autocast context.
        """
        self._check_model(model)
        device = next(self._vision.parameters()).device
        keys = pixel_keys(pixel_values) if keys is None else list(keys)
        if len(keys) != pixel_values.shape[0]:
            raise FeatureCacheError(f"{len(keys)} keys for a batch of {pixel_values.shape[0]} images")
        namespace = self._namespace(device.type)
        found: dict[int, torch.Tensor] = {}
        for i, key in enumerate(keys):
            hit = self._entries.get((namespace, key))
            if hit is not None:
                self.stats.memory_hits += 1
            elif self.directory is not None and (hit := self._load(namespace, key)) is not None:
                self.stats.disk_hits += 1
                if self.memory:
                    self._entries[(namespace, key)] = self._to_memory(hit)
            if hit is not None:
                found[i] = hit
        missing = [i for i in range(len(keys)) if i not in found]
        if missing:
            self.stats.misses += len(missing)
            rows = pixel_values[missing] if len(missing) < len(keys) else pixel_values
            with torch.no_grad():
                computed = forward.encode_images(compat.unwrap(model), rows.to(device))
            for i, feature in zip(missing, computed):
                found[i] = feature
                if self.memory:
                    self._entries[(namespace, keys[i])] = self._to_memory(feature)
                if self.directory is not None:
                    self._save(namespace, keys[i], feature)
        return torch.stack([found[i].to(device) for i in range(len(keys))])

    def _to_memory(self, feature: torch.Tensor) -> torch.Tensor:
        # clone: a row view would keep the whole computed batch alive
        return feature.detach().to(self.memory_device or feature.device).clone()

    def _save(self, namespace: str, key: str, feature: torch.Tensor) -> None:
        """Write one feature atomically: a temporary file in the same directory, then os.replace."""
        from safetensors.torch import save_file

        path = self._path(namespace, key)
        with writes.writing(path, "the cached feature"):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:8]}-", suffix=".tmp")
            os.close(fd)
            try:
                save_file(
                    {FEATURE_NAME: feature.detach().to("cpu").contiguous()},
                    tmp,
                    metadata={"format": FORMAT_VERSION, "fingerprint": self.fingerprint, "key": key},
                )
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)

    def _load(self, namespace: str, key: str) -> torch.Tensor | None:
        """The stored feature, or None (absent, unreadable or written for another key/model)."""
        from safetensors import safe_open

        path = self._path(namespace, key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != key or meta.get("fingerprint") != self.fingerprint:
                    return None
                return f.get_tensor(FEATURE_NAME)
        except Exception as err:  # noqa: BLE001 - a damaged file is a miss (and is rewritten), not a crash
            warnings.warn(f"feature cache: ignoring unreadable {path}: {type(err).__name__}: {err}", stacklevel=3)
            return None


# ----------------------------------------------------------------------------- 3. the loop's helper


def attach_cached_features(model, batch: dict, cache: FeatureCache | None, *, drop_pixels: bool = False) -> dict:
    """A copy of ``batch`` with ``image_embeds`` from ``cache`` (the batch itself when cache is None).

    Uses ``batch["image_keys"]`` when the data pipeline provides them, else hashes the
    pixels. pixel_values stay (the finite-input guard reads them) unless ``drop_pixels``.
    """
    if cache is None:
        return batch
    out = dict(batch)
    out["image_embeds"] = cache.features(model, batch["pixel_values"], batch.get("image_keys"))
    if drop_pixels:
        del out["pixel_values"]
    return out
