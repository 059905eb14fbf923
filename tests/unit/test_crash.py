"""The crash test: ``qformer-lora train`` killed with SIGKILL at seeded random moments, resumed each time.

Kills land two ways. At a pause point (qformer_lora/pause_points.py): the process stops for good
at the n-th arrival at a named point (inside a checkpoint write: adapter written, everything
staged, renamed, mid-prune; after an optimizer step; inside validation) and is killed there,
deterministically. Timed: killed a random 0-0.4 s after its first new log record, wherever it is
(a step, validation, a save). After every kill each checkpoint the run lists must verify
(sizes and sha256s: never a torn one), and the next start resumes from the newest. The final
adapter and the step log must equal an uninterrupted run's, bit for bit.

The figures of the last run (kills, where they landed, wall time) are printed; run with -s.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qformer_lora import checkpoint, pause_points

from .test_step_resume import log_records
from .test_train import adapter_state, small_data

SEED, KILLS, TIMED = 18, 24, 8
# 16 samples, batch 4: 4 steps an epoch, 80 in 20 epochs; a step checkpoint every 2 steps, an
# epoch checkpoint every epoch, the newest 3 kept (so most saves prune). A resumed process
# gets a few steps further before its kill (a short delay, a low arrival count), so the 24
# kills spread over the first half of the run or more and the last process finishes it.
EPOCHS = 20
DELAY = 0.4  # the longest timed delay, s: about 4 steps of the tiny model on one core
ARRIVALS = {  # the n-th arrival a kill may pick per point, 1..max
    "step": 4,
    "eval": 2,  # 8 val samples, batch 4: 2 batches a validation
    "checkpoint.adapter": 2,
    "checkpoint.staged": 2,
    "checkpoint.renamed": 2,
    "checkpoint.pruning": 2,
}


def command(run: Path, options: dict, resume: bool) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    tail = ["--resume", "latest"] if resume else ["--overwrite", "true"]
    return [sys.executable, "-m", "qformer_lora.cli", "train", f"--output-dir={run}", "--progress=false", *flags, *tail]


def start(run: Path, options: dict, env: dict) -> subprocess.Popen:
    resume = bool(checkpoint.list_checkpoints(run))  # killed before its first save: start afresh
    return subprocess.Popen(command(run, options, resume), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def log_lines(run: Path) -> int:
    log = run / "metrics.jsonl"
    return len(log.read_bytes().splitlines()) if log.exists() else 0


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> bool:
    """Poll ``condition`` until true (True) or the process ended first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.02)
    raise AssertionError(f"nothing happened in {timeout} s")


def kill_once(run: Path, options: dict, env: dict, plan: tuple, pause_file: Path) -> str:
    """Start (or resume) the run, kill it per ``plan``; returns where the kill landed ("" if it finished first)."""
    kind, what = plan
    if kind == "point":
        env = env | {"QFORMER_LORA_PAUSE_AT": what, "QFORMER_LORA_PAUSE_FILE": str(pause_file)}
        pause_file.unlink(missing_ok=True)
        process = start(run, options, env)
        reached = wait_for(pause_file.exists, process)
        landed = f"at {what}"
    else:
        before = log_lines(run)
        process = start(run, options, env)
        reached = wait_for(lambda: log_lines(run) > before + 1, process)  # step_options, then real work
        time.sleep(what)
        landed = f"{what:.2f} s into training (after its first records)"
    if not reached or process.poll() is not None:
        _, err = process.communicate()
        assert process.returncode == 0, err.decode()[-3000:]
        return ""
    process.send_signal(signal.SIGKILL)
    _, err = process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert b"skipping" not in err, err.decode()[-3000:]  # never a torn checkpoint to fall back from
    return landed


@pytest.mark.long  # 24 SIGKILLs and resumes of a subprocess train, minutes on 2 cores
def test_sigkill_at_random_moments_resumes_bitwise(tmp_path):
    started = time.monotonic()
    options = dict(epochs=EPOCHS, batch_size=4, save_steps=2, save_every=1, keep_last=3, **small_data(tmp_path, 16, 8))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    subprocess.run(command(straight, options, resume=False), env=env, check=True, capture_output=True)

    rng = random.Random(SEED)
    plans = [("timed", rng.uniform(0, DELAY)) for _ in range(TIMED)]
    points = [*pause_points.POINTS, *pause_points.POINTS]  # each point twice, the rest drawn
    points += rng.choices(pause_points.POINTS, k=KILLS - TIMED - len(points))
    plans += [("point", f"{p}:{rng.randint(1, ARRIVALS[p])}") for p in points]
    rng.shuffle(plans)
    landings = []
    for plan in plans:
        landed = kill_once(crashed, options, env, plan, tmp_path / "paused")
        if not landed:
            break  # the run finished before this kill
        found = checkpoint.list_checkpoints(crashed)
        for path in found:
            checkpoint.verify(path)  # raises naming a torn or corrupt file
        landings.append(f"{landed}; newest checkpoint then {found[-1].name if found else None}")
    assert len(landings) >= 20, f"only {len(landings)} kills before the run finished:\n" + "\n".join(landings)
    final = subprocess.run(command(crashed, options, resume=True), env=env, capture_output=True)
    assert final.returncode == 0, final.stderr.decode()[-3000:]

    a, b = adapter_state(straight, EPOCHS), adapter_state(crashed, EPOCHS)
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])], "adapters differ"
    assert log_records(crashed) == log_records(straight)
    print(f"\n{len(landings)} SIGKILLs in {time.monotonic() - started:.0f} s:\n" + "\n".join(landings))
