"""--batch-size auto on a real card, the tiny shapes base (seconds): the CUDA probe, the budget and the hook.

tests/unit/test_auto_batch.py checks the decision with fake peaks on the CPU; here the peaks are
the allocator's. The budget is set from two measured peaks so that the margined line lands on
batch 100 of the 192 training samples: the choice must come out near it, and its confirming step
must have peaked within the margin.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qformer_lora.training import auto_batch, train
from qformer_lora.training.run_config import TrainConfig

pytestmark = pytest.mark.gpu
GIB = 1024**3


def test_the_margined_line_lands_where_the_measured_peaks_put_it(tmp_path):
    device = torch.device("cuda")
    config = TrainConfig(batch_size="auto", progress=False, output_dir=str(tmp_path / "run"))
    model, _ = train.build_adapter_model(config, device)
    collator, train_set, _ = train._datasets(config, model)
    memory = auto_batch.CudaMemory(device)
    with auto_batch.throwaway_steps(config, model, collator, train_set, device) as prepare:
        p2, p8 = (memory.peak_of_step(prepare(n)) for n in (2, 8))
    assert p8 > p2 > 0
    b = (p8 - p2) / 6
    budget = (p2 - 2 * b + 100.5 * b) / float(auto_batch.MARGIN)  # 0.9 x budget = a + 100.5 b
    resolved, record = auto_batch.resolve(
        dataclasses.replace(config, memory_budget_gib=budget / GIB), model, collator, train_set, device
    )
    assert 90 <= resolved.batch_size <= 110, record["why"]
    _, last_peak = record["confirmations"][-1]
    assert last_peak is not None and last_peak <= float(auto_batch.MARGIN) * record["budget_bytes"], record["why"]
    assert record["budget_from"] == "--memory-budget-gib"


def test_a_run_on_the_whole_free_card_takes_the_whole_training_set(tmp_path):
    """The tiny base needs far less than an H200 holds: the 192 training samples cap the batch."""
    run = tmp_path / "run"
    train.train(TrainConfig(batch_size="auto", epochs=1, progress=False, output_dir=str(run)), device="cuda")
    text = (run / "metrics.jsonl").read_text()
    assert '"type": "auto_batch"' in text and "capped at the 192 training samples" in text
    assert "free memory on cuda" in text
