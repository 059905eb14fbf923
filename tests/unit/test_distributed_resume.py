"""Mid-epoch resume under torchrun with 2 processes: bitwise equal to an uninterrupted 2-process run.

torchrun starts this file (its ``__main__`` below): each rank runs ``qformer-lora train``,
optionally made to fail just before a given optimizer step on every rank (as when a node
dies between steps), and the run is resumed with ``--resume latest`` by a new torchrun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qformer_lora import checkpoint
from qformer_lora.training import train

if __name__ != "__main__":  # torchrun runs this file as a script: the worker needs none of these
    from .test_distributed import GRAD_ACCUM, PER_RANK_BATCH, RANKS, _adapter, _free_port, _options
    from .test_step_resume import log_records

# 21 samples on 2 ranks of batch 2, groups of 2 micro-batches: 3 optimizer steps an epoch, 6 in
# 2 epochs. --save-steps 2 saves steps 2, 4 and 6; killed before step 5, the newest checkpoint is
# step-00000004: epoch 2 with one group (2 micro-batches a rank) consumed.
EPOCHS, SAVE_STEPS, KILL_AT = 2, 2, 5


def torchrun(tmp: Path, out: Path, kill_at: int, *extra: str) -> subprocess.CompletedProcess:
    options = _options(tmp) | {"epochs": EPOCHS, "save_steps": SAVE_STEPS, "save_every": 1, "keep_last": 0}
    flags = [f"--{k.replace('_', '-')}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items()]
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={RANKS}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", __file__, str(kill_at),
        "train", f"--output-dir={out}", f"--batch-size={PER_RANK_BATCH}", *flags, *extra,
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.long  # three torchrun starts with 2 processes: about 40 s on 2 cores
def test_two_process_mid_epoch_resume_is_bitwise_identical(tmp_path):
    assert GRAD_ACCUM == 2
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = torchrun(tmp_path, straight, 0)
    assert done.returncode == 0, done.stderr[-6000:]
    killed = torchrun(tmp_path, resumed, KILL_AT)
    assert killed.returncode != 0 and f"killed before step {KILL_AT}" in killed.stderr, killed.stderr[-3000:]
    assert checkpoint.latest_checkpoint(resumed).name == "step-00000004"
    state = json.loads((checkpoint.latest_checkpoint(resumed) / checkpoint.STATE_FILE).read_text())
    assert (state["epoch"], state["position"]["batches"]) == (2, GRAD_ACCUM)
    again = torchrun(tmp_path, resumed, 0, "--resume=latest")
    assert again.returncode == 0, again.stderr[-6000:]
    a = _adapter_at(straight)
    b = _adapter_at(resumed)
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]
    assert log_records(resumed) == log_records(straight)
    assert _adapter(straight).keys() == a.keys()  # epoch 1's checkpoint is there too


def _adapter_at(run: Path) -> dict[str, torch.Tensor]:
    path = checkpoint.checkpoint_dir(run, EPOCHS) / checkpoint.ADAPTER_DIR / "adapter_model.safetensors"
    return checkpoint.load_file(str(path))


class Killed(Exception):
    pass


def _worker(kill_at: int, argv: list[str]) -> int:
    from qformer_lora import cli

    torch.set_num_threads(1)  # 2 ranks on 2 shared cores (see tests/conftest.py)
    real = train.training_step

    def step_or_die(parts, group, index):
        if index + 1 == kill_at:  # every rank, before the step's first collective
            raise Killed(f"killed before step {kill_at}")
        return real(parts, group, index)

    train.training_step = step_or_die
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(_worker(int(sys.argv[1]), sys.argv[2:]))
