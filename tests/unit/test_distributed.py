"""Two processes under torchrun (gloo, CPU) train the adapter one process trains with the same global batch.

The distributed run goes through the documented entry point, ``torchrun ... -m qformer_lora.cli
train``, except that torchrun starts this file (its ``__main__`` below) so each rank can report
what it did: the metrics ``train`` returned and whether it wrote a checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qformer_lora import checkpoint, data
from qformer_lora.training import distributed, train

RANKS = 2
PER_RANK_BATCH = 2
GRAD_ACCUM = 2
# 21 samples = 5 global micro-batches of 4 and one of a single sample, in 3 optimizer steps
# (groups of 2 micro-batches). Rank 1's last micro-batch is therefore padding only: the case
# where sharding could give the ranks different step counts (a hang) or count a sample twice.
TRAIN_SAMPLES, VAL_SAMPLES, STEPS = 21, 6, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _head(manifest: Path, n: int, out: Path) -> Path:
    out.write_text("".join(manifest.read_text().splitlines(keepends=True)[:n]))
    return out


def _options(tmp: Path) -> dict:
    return dict(
        train_manifest=str(_head(data.SHAPES_DIR / "train.jsonl", TRAIN_SAMPLES, tmp / "train.jsonl")),
        val_manifest=str(_head(data.SHAPES_DIR / "val.jsonl", VAL_SAMPLES, tmp / "val.jsonl")),
        image_root=str(data.SHAPES_DIR),
        epochs=1,
        grad_accum=GRAD_ACCUM,
        progress=False,
    )


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint.checkpoint_dir(run_dir, 1) / checkpoint.ADAPTER_DIR / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    options = _options(tmp)
    reports, two = tmp / "reports", tmp / "two"
    reports.mkdir()
    flags = [f"--{k.replace('_', '-')}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items()]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={RANKS}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        __file__,
        str(reports),
        "train",
        f"--output-dir={two}",
        f"--batch-size={PER_RANK_BATCH}",
        *flags,
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    distributed_s = time.perf_counter() - started

    one = tmp / "one"
    train.train(train.TrainConfig(output_dir=str(one), batch_size=PER_RANK_BATCH * RANKS, **options))
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in range(RANKS)]
    return {"one": one, "two": two, "ranks": ranks, "stdout": done.stdout, "distributed_s": distributed_s}


@pytest.mark.long  # starts torchrun with 2 processes and a single-process run: about 13 s on 2 cores
def test_two_ranks_train_the_single_process_adapter(runs):
    one, two = _adapter(runs["one"]), _adapter(runs["two"])
    assert one.keys() == two.keys() and one
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    moved = max(float(one[k].abs().max()) for k in one if "lora_B" in k)  # PEFT starts lora_B at zero
    # Not bitwise: 2 ranks x batch 2 sum the gradient in another order than 1 x batch 4 (per-rank
    # GEMMs over other row counts, padding widths, then gloo's float32 all-reduce): the gradients
    # differ in their last bits.
    # Measured after 3 AdamW steps: 1.5e-8 absolute (entries up to 1.6e-3). 1e-6 leaves room for
    # other CPUs and BLAS builds, while a wrong shard moves entries by 2.9e-3 and a missing
    # x world-size factor (half the gradient; AdamW's scale invariance hides most of it, the
    # grad_norm check below does not) by 2.2e-4: more than 100x the tolerance.
    print(
        f"2 ranks vs 1 process: max abs adapter difference {worst:.2e} (largest lora_B entry {moved:.2e}); "
        f"torchrun took {runs['distributed_s']:.1f} s"
    )
    assert worst <= 1e-6, f"2-rank adapter departs from the single-process one by {worst:.2e}"
    assert moved > 1e-4, "the adapter did not train: the comparison would prove nothing"
    steps = [r for r in _log(runs["two"]) if r["type"] == "step"]
    reference = [r for r in _log(runs["one"]) if r["type"] == "step"]
    assert len(steps) == len(reference) == STEPS
    for got, want in zip(steps, reference):  # the logged loss is the global one, not rank 0's share
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.long  # shares the torchrun fixture above
def test_only_rank_zero_writes_and_every_rank_agrees(runs):
    ranks = runs["ranks"]
    assert [r["saved"] for r in ranks] == [[1], []], "checkpoints must come from rank 0 only"
    # a second writer would duplicate every line of the log
    kinds = [r["type"] for r in _log(runs["two"]) if r["type"] != "warning"]
    assert kinds == ["step_options", "epoch"] + ["step"] * STEPS + ["epoch", "end"], kinds
    warned = [r["name"] for r in _log(runs["two"]) if r["type"] == "warning"]  # known upstream ones: once each
    assert len(warned) == len(set(warned)), warned
    assert runs["stdout"].count("validation loss: best") == 1, "the CLI printed the run's summary more than once"
    # validation runs on every rank over the whole validation set with identical adapters; the
    # train loss is all-reduced: the same numbers everywhere, bitwise
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    # DDP syncs exactly the adapter: frozen parameters are neither broadcast nor all-reduced
    for r in ranks:
        assert r["synced"] == r["trainable"] and r["synced"] > 0
        assert r["ddp_parameters"] == r["trainable"], "DDP holds frozen parameters (broadcast at start-up)"


@pytest.mark.parametrize("size", [1, 5, 8, 21])
@pytest.mark.parametrize("world, batch", [(2, 2), (3, 2), (4, 1)])
def test_shards_rebuild_the_single_process_batches(size, world, batch):
    order = torch.randperm(size, generator=torch.Generator().manual_seed(size)).tolist()
    shards = [list(distributed.ShardSampler(order, r, world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1, "ranks would run different step counts and hang"
    for k in range(0, len(shards[0]), batch):  # k-th micro-batch of every rank = k-th global one
        together = sorted(i for s in shards for i, real in s[k : k + batch] if real)
        assert together == sorted(order[k * world : (k + batch) * world])


# ----------------------------------------------------------------------------- the torchrun worker


def _worker(reports: Path, argv: list[str]) -> int:
    """One rank: run the CLI, then write what this rank returned, saved and synced to rank<R>.json."""
    from qformer_lora import cli

    torch.set_num_threads(1)  # 2 ranks on 2 shared cores (see tests/conftest.py)
    report: dict = {"saved": []}
    save, run, wrap = checkpoint.save, train.train, distributed.wrap

    def recording_save(run_dir, epoch, **kwargs):
        report["saved"].append(epoch)
        return save(run_dir, epoch, **kwargs)

    def recording_train(*args, **kwargs):
        report["metrics"] = run(*args, **kwargs)
        return report["metrics"]

    def recording_wrap(model, device):
        trainer = wrap(model, device)
        report["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        report["synced"] = sum(p.numel() for p in distributed.synced_parameters(trainer))
        # what DDP broadcasts at start-up and hands to its reducer (private, hence checked only here)
        report["ddp_parameters"] = sum(p.numel() for p in getattr(trainer, "_module_parameters", []))
        return trainer

    checkpoint.save, train.train, distributed.wrap = recording_save, recording_train, recording_wrap
    code = cli.main(argv)
    (reports / f"rank{os.environ['RANK']}.json").write_text(json.dumps(report))
    return code


if __name__ == "__main__":
    sys.exit(_worker(Path(sys.argv[1]), sys.argv[2:]))
