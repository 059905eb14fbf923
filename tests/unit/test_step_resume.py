"""Step checkpoints (--save-steps) and exact mid-epoch resume: bitwise equal to an uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from qformer_lora import checkpoint
from qformer_lora.training import train

from .test_train import adapter_state, quiet, small_data


class Interrupted(Exception):
    """Stands in for the process dying between two optimizer steps."""


def log_records(run: Path) -> list[dict]:
    """The log without what describes a process rather than the training: the records every (re)start
    writes (step_options, the hidden upstream warnings, recorded once per process) or only a process that
    ran to the end writes (end: its own wall time and sample count), and the timing field."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    per_process = ("step_options", "warning", "end")
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in records if r["type"] not in per_process]


def interrupt_at(monkeypatch, step: int) -> None:
    """Make the training step raise when asked for global step ``step`` (1-based): steps 1..step-1 happen."""
    real = train.training_step

    def step_or_die(parts, group, index):
        if index + 1 == step:
            raise Interrupted(step)
        return real(parts, group, index)

    monkeypatch.setattr(train, "training_step", step_or_die)


@pytest.mark.parametrize(
    ("batch_size", "grad_accum", "kill_at", "latest", "drop_epoch_checkpoint"),
    [
        # 32 samples, batch 4 x 2: 8 micro-batches, 4 steps an epoch; save_steps 3 saves steps 3 and 6;
        # killed before step 8, the newest is step 6: epoch 2 with 2 groups (4 micro-batches) consumed
        (4, 2, 8, "step-00000006", False),
        # batch 3 x 2: 11 micro-batches (the last of 2 samples), 6 steps an epoch (the last group of
        # one micro-batch); step 6 is the epoch's last, saved both as step-00000006 and epoch-0001.
        # With the epoch checkpoint gone (killed before it was renamed into place), the resume starts
        # from step 6 with the whole epoch consumed: it must run the epoch's end, once.
        pytest.param(3, 2, 7, "step-00000006", True, marks=pytest.mark.long),  # 10 s: out of the default run
    ],
)
def test_mid_epoch_resume_is_bitwise_identical(
    tmp_path, monkeypatch, batch_size, grad_accum, kill_at, latest, drop_epoch_checkpoint
):
    common = dict(
        epochs=2, save_every=1, keep_last=0, save_steps=3, batch_size=batch_size, grad_accum=grad_accum,
        **small_data(tmp_path),
    )  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.train(quiet(output_dir=str(straight), **common))
    interrupt_at(monkeypatch, kill_at)
    with pytest.raises(Interrupted):
        train.train(quiet(output_dir=str(resumed), **common))
    monkeypatch.undo()
    if drop_epoch_checkpoint:
        shutil.rmtree(checkpoint.checkpoint_dir(resumed, 1))
    assert checkpoint.latest_checkpoint(resumed).name == latest
    train.train(quiet(output_dir=str(resumed), **common), resume="latest")
    a, b = adapter_state(straight, 2), adapter_state(resumed, 2)
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])], "adapter tensors differ after a mid-epoch resume"
    # every step, loss, lr, grad norm, validation figure and the epochs' train loss: the same floats
    assert log_records(resumed) == log_records(straight)
    # in training order: a step checkpoint at an epoch's last step before that epoch's checkpoint
    steps_per_epoch = 8 // grad_accum if batch_size == 4 else 6
    expected = sorted(
        [(s, 0, f"step-{s:08d}") for s in range(3, 2 * steps_per_epoch + 1, 3)]
        + [(e * steps_per_epoch, 1, f"epoch-{e:04d}") for e in (1, 2)]
    )
    assert [p.name for p in checkpoint.list_checkpoints(straight)] == [name for *_, name in expected]


def test_step_checkpoints_sort_in_training_order_and_prune_together(tmp_path):
    """batch 8 x 1 on 32 samples: 4 steps an epoch; save_steps 2 saves steps 2 and 4 (the epoch's
    last, before its epoch checkpoint), 6 and 8; keep_last 3 keeps the newest three in training order."""
    run = tmp_path / "run"
    train.train(
        quiet(
            output_dir=str(run), epochs=2, save_every=1, keep_last=3, save_steps=2, batch_size=8, **small_data(tmp_path)
        )
    )
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step-00000006", "step-00000008", "epoch-0002"]
    assert checkpoint.latest_checkpoint(run).name == "epoch-0002"  # generate RUN and --resume latest use it
    state = json.loads((checkpoint.step_checkpoint_dir(run, 6) / checkpoint.STATE_FILE).read_text())
    assert (state["epoch"], state["global_step"], state["position"]["batches"]) == (2, 6, 2)
