"""CPU proxy for issue 19's "host overhead out of the step": aten ops, host reads and host
milliseconds per training step, the default step against deferred host reads (``sync_every``).

    pytest -m long tests/unit/test_sync_benchmark.py -s --benchmark-columns=median,iqr,rounds

The trainer's own step (training/step.py, fused AdamW both ways, clipping on, fp32, batch 2)
on InstructBLIP-FlanT5-XL's depth at width 64 (test_compile_benchmark's preset), where
almost all of a CPU step is per-op host cost. Aten ops are counted with a TorchDispatchMode
(every op below autograd, the backward's too: the CPU autograd engine runs them under the
mode); host reads are the syncing ops of test_deferred_reads.HostReads. On a CPU nothing waits
for a device, so the milliseconds show what the deferred step's extra device-side ops cost
on the host, not the GPU's saved waits (those need the H200 run).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qformer_lora import lora, synthetic
from qformer_lora.training.step import linear_warmup_decay, make_step, read_steps, training_step

from ..timing import interleaved_medians
from .test_compile_benchmark import _adapter_model
from .test_deferred_reads import HostReads

BATCH = 2
READ_EVERY = 10  # the deferred variant reads its results once per 10 steps, as sync_every=10 does
ROUNDS = 10  # per variant in the pytest-benchmark table
RATIO_ROUNDS = 15
MODES = ("default", "deferred")

pytestmark = pytest.mark.long  # builds a 100-layer model and times it: run by .ci/run (pytest -m long)


class AtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def make_runner(mode: str):
    """A closure taking one training step (and, deferred, reading every READ_EVERY-th call)."""
    model = copy.deepcopy(_adapter_model())
    optimizer = torch.optim.AdamW(lora.adapter_parameters(model), lr=1e-4, fused=True)
    parts = make_step(
        model, optimizer, linear_warmup_decay(optimizer, 0, 10_000), precision_name="fp32", device="cpu",
        guard="skip", max_grad_norm=1.0, deferred=mode == "deferred",
    )  # fmt: skip
    group = [synthetic.random_batch(model, batch_size=BATCH, prompt_len=16, answer_len=8, instruction_len=16)]
    state = {"index": 0, "pending": []}

    def step():
        result = training_step(parts, group, state["index"])
        state["index"] += 1
        if mode == "deferred":
            state["pending"].append(result)
            if len(state["pending"]) == READ_EVERY:
                read_steps(parts, state["pending"])
                state["pending"] = []

    return step


def per_step_counts(step) -> dict:
    """aten ops and host reads of one step (a deferred one reads nothing: its read is counted apart)."""
    ops, reads = AtenOps(), HostReads()
    with ops:
        step()
    with reads:
        step()
    return {"aten_ops_per_step": ops.count, "host_reads_per_step": sum(reads.counts.values())}


@pytest.fixture(scope="module")
def runners():
    made = {mode: make_runner(mode) for mode in MODES}
    counts = {mode: per_step_counts(step) for mode, step in made.items()}
    return made, counts


@pytest.mark.parametrize("mode", MODES)
def test_step_host_overhead(benchmark, runners, mode):
    made, counts = runners
    benchmark.group = f"training_step, InstructBLIP-FlanT5-XL depth at width 64, batch {BATCH}, fused AdamW"
    benchmark.extra_info.update(counts[mode])
    benchmark.pedantic(made[mode], rounds=ROUNDS, iterations=1, warmup_rounds=2)
    benchmark.extra_info["host_ms_per_step"] = benchmark.stats.stats.median * 1e3  # all host on a CPU


def test_deferred_reads_remove_the_steps_host_reads(runners):
    """Interleaved medians, so load changes on a shared machine hit both alike. The deferred step
    keeps only the model's own reads (transformers' mask checks) and adds a handful of device ops
    (the flags, the stacked results) to the ~10^4 of a step."""
    made, counts = runners
    medians = interleaved_medians(made, rounds=RATIO_ROUNDS, warmup=2)
    default, deferred = counts["default"], counts["deferred"]
    print(
        f"\nhost overhead per training step, interleaved medians of {RATIO_ROUNDS}: "
        + ", ".join(
            f"{m} {medians[m] * 1e3:.1f} ms, {counts[m]['aten_ops_per_step']} aten ops, "
            f"{counts[m]['host_reads_per_step']} host reads"
            for m in MODES
        )
    )
    assert deferred["host_reads_per_step"] < default["host_reads_per_step"], counts
    # a few dozen extra ops at most: more would mean the deferred step does real extra work
    assert deferred["aten_ops_per_step"] < default["aten_ops_per_step"] * 1.01, counts
