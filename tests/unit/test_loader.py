"""The data pipeline (training/loader.py): the same batches, bitwise, whatever the worker count."""

from __future__ import annotations

import json

import pytest
import torch

from qformer_lora import data, inputs
from qformer_lora.training import loader as loader_module
from qformer_lora.training.loader import EpochLoader, EpochOrder
from qformer_lora.training.run_config import ConfigError, TrainConfig, load_run_config
from qformer_lora.training.train import train


@pytest.fixture(scope="module")
def shapes():
    processor = data.build_processor("instructblip", image_size=32)
    collator = inputs.Collator(processor, family="instructblip", decoder_only=False, max_prompt_tokens=16)
    return data.ShapesDataset("train"), collator


def epochs_of_batches(dataset, collator, workers: int, epochs=(1, 2)) -> list[dict]:
    loader = EpochLoader(dataset, collator, batch_size=16, seed=3, shuffle=True, num_workers=workers)
    return [batch for epoch in epochs for batch in loader.epoch(epoch)]


def assert_same_batches(left: list[dict], right: list[dict]) -> None:
    assert len(left) == len(right)
    for i, (a, b) in enumerate(zip(left, right)):
        assert a.keys() == b.keys(), i
        for key in a:
            same = torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key]
            assert same, f"batch {i}: {key!r} differs between worker counts"


@pytest.mark.parametrize("workers", [1, 2])
def test_batches_are_bitwise_equal_for_any_worker_count(shapes, workers):
    """Two epochs of batches (96 samples, batch 16: 12 batches) with workers equal those without."""
    dataset, collator = shapes
    assert_same_batches(epochs_of_batches(dataset, collator, 0), epochs_of_batches(dataset, collator, workers))


def test_epochs_differ_and_repeat(shapes):
    """Epoch 1 and 2 are different permutations; asking for epoch 1 again gives epoch 1's order."""
    order = EpochOrder(96, seed=3, shuffle=True)
    first = list(order)
    order.set_epoch(1)
    second = list(order)
    order.set_epoch(0)
    assert list(order) == first and second != first and sorted(second) == list(range(96))


def test_shuffled_order_is_the_one_earlier_runs_drew():
    """Runs before this module used RandomSampler with a generator seeded seed * 1000 + epoch;
    the same permutation keeps their logs reproducible."""
    for seed, epoch in [(0, 1), (3, 7)]:
        order = EpochOrder(50, seed, shuffle=True)
        order.set_epoch(epoch)
        earlier = torch.utils.data.RandomSampler(
            range(50), generator=torch.Generator().manual_seed(seed * 1000 + epoch)
        )
        assert list(order) == list(earlier)


@pytest.mark.parametrize("workers", [0, 2])
def test_loading_leaves_the_global_rng_alone(shapes, workers):
    """The loader's worker seed comes from its own generator: the global RNG (LoRA dropout, the
    checkpoint's RNG state) advances the same with or without workers, and here not at all."""
    dataset, collator = shapes
    torch.manual_seed(11)
    before = torch.get_rng_state()
    epochs_of_batches(dataset, collator, workers, epochs=(1,))
    assert torch.equal(torch.get_rng_state(), before)


def test_default_workers_by_device(monkeypatch):
    monkeypatch.setattr(loader_module.os, "cpu_count", lambda: 16)
    assert loader_module.default_workers(torch.device("cpu")) == 0
    assert loader_module.default_workers(torch.device("cuda")) == 8
    monkeypatch.setattr(loader_module.os, "cpu_count", lambda: 2)
    assert loader_module.default_workers(torch.device("cuda")) == 1


def test_negative_workers_are_refused_by_name():
    with pytest.raises(ConfigError, match="num_workers.*at least 0"):
        load_run_config(None, {"num_workers": -1})


@pytest.mark.slow
def test_training_log_is_the_same_with_workers(tmp_path):
    """One epoch of the default run with 2 workers writes the losses of the run without."""
    logs = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        train(TrainConfig(output_dir=str(out), epochs=1, num_workers=workers, progress=False))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        logs.append([(r["step"], r.get("loss"), r.get("val_loss")) for r in records if r["type"] in ("step", "epoch")])
    assert logs[0] == logs[1] and len(logs[0]) > 2
