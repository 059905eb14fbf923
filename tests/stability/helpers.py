"""Tiny models and batches shared by the stability tests (built once per process, copied per test)."""

from __future__ import annotations

import copy
import functools
import warnings

from qformer_lora import synthetic
from qformer_lora.training import train

SEED_PRESET = "tiny-instructblip-flan-t5"  # the seed's family: InstructBLIP + FlanT5


@functools.cache
def _adapter_model(preset: str, precision: str, r: int, seed: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation chatter while building
        config = train.TrainConfig(
            preset=preset, base_checkpoint=None, precision=precision, lora_r=r, lora_alpha=2 * r, seed=seed
        )
        model, _ = train.build_adapter_model(config)
    return model


def adapter_model(precision: str, r: int = 8, preset: str = SEED_PRESET, seed: int = 0):
    """A fresh copy of a tiny adapter model built like train.train builds it (cached original)."""
    return copy.deepcopy(_adapter_model(preset, precision, r, seed))


def shared_adapter_model(precision: str = "fp32", r: int = 8, preset: str = SEED_PRESET, seed: int = 0):
    """The cached model itself, for tests that promise to leave it as they found it."""
    return _adapter_model(preset, precision, r, seed)


def batches(model, n: int = 2, batch_size: int = 2, ids: bool = True) -> list[dict]:
    """Small synthetic batches; with ``ids`` they carry sample ids like the collator's."""
    out = []
    for i in range(n):
        batch = synthetic.random_batch(model, batch_size=batch_size, prompt_len=6, answer_len=3, seed=i)
        if ids:
            batch["ids"] = [f"sample-{i}-{row}" for row in range(batch_size)]
        out.append(batch)
    return out
