"""``--log tensorboard``: real event files, read back with TensorBoard's own reader, equal metrics.jsonl.

The runs train the tiny base on the first 32 training / 16 validation shapes samples at
batch 8: 32 / 8 = 4 optimizer steps an epoch, so 2 epochs are steps 1..8 and the epoch
records (the start, epoch 1, epoch 2) sit at steps 0, 4 and 8.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qformer_lora import checkpoint, cli
from qformer_lora.training import metrics_log, run_config, run_dir, train

from .test_train import small_data

# tensorboard is an optional extra (qformer-lora[tensorboard]); the compat sessions' venvs lack it
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

STEPS_PER_EPOCH = 4  # 32 samples / batch 8


def config(tmp_path: Path, name: str, **overrides) -> train.TrainConfig:
    options = dict(epochs=2, batch_size=8, save_every=2, keep_last=0, progress=False, **small_data(tmp_path))
    return train.TrainConfig(output_dir=str(tmp_path / name), **{**options, **overrides})


def records(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / run_dir.LOG_FILE).read_text().splitlines()]


def tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for ``directory``: tag -> [(step, value)] in file order."""
    reader = event_accumulator.EventAccumulator(
        str(directory),
        size_guidance={event_accumulator.SCALARS: 0},  # 0: keep all, no reservoir sampling
    ).Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def expected_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """What metrics.jsonl says TensorBoard should show, each value rounded to float32 as the event file stores it."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records(directory):
        for tag, value in metrics_log.scalars(record).items():
            expected.setdefault(tag, []).append((record["step"], float(np.float32(value))))
    return expected


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("tensorboard")
    train.train(config(tmp_path, "run", log="tensorboard"))
    return tmp_path / "run"


def test_event_files_hold_the_scalars_of_metrics_jsonl(tensorboard_run):
    shown, expected = tensorboard_scalars(tensorboard_run), expected_scalars(tensorboard_run)
    assert len(list(tensorboard_run.glob(run_dir.EVENT_FILES))) == 1
    # the tag scheme on this run: steps 1..8 for the per-step fields, 0, 4, 8 for the epoch ones
    steps = list(range(1, 2 * STEPS_PER_EPOCH + 1))
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_s"):
        assert [step for step, _ in shown[tag]] == steps, tag
    for tag in ("val/loss", "val/accuracy", "epoch/majority_baseline"):
        assert [step for step, _ in shown[tag]] == [0, STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH], tag
    assert [step for step, _ in shown["epoch/train_loss"]] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert shown == expected  # every tag, step and value (exact after float32 rounding), nothing else


def test_metrics_jsonl_is_the_same_with_and_without_tensorboard(tensorboard_run, tmp_path):
    train.train(config(tmp_path, "plain"))  # log="jsonl", the default
    plain = tmp_path / "plain"
    assert not list(plain.glob(run_dir.EVENT_FILES))

    def text(directory: Path) -> str:  # the wall-clock fields (throughput, seconds) are the ones that may differ
        raw = (directory / run_dir.LOG_FILE).read_text(encoding="utf-8")
        return re.sub(r'"(samples_per_s|wall_s|train_s)": [^,}]+', r'"\1": _', raw)

    # each step's and the closing end record's
    assert text(tensorboard_run).count('"samples_per_s": _') == 2 * STEPS_PER_EPOCH + 1
    assert text(tensorboard_run) == text(plain)


def test_resume_shows_each_replayed_step_once(tmp_path):
    """An interrupted run's tail is replayed on resume; TensorBoard must draw it once, from the resumed run.

    3 epochs with checkpoints at epochs 2 and 3 (save_every 2, the last always): resuming from
    epoch 2 replays steps 9..12, which the first run's event file already holds."""
    options = config(tmp_path, "run", log="tensorboard", epochs=3)
    train.train(options)
    directory = tmp_path / "run"
    before_resume = time.time()
    train.train(options, resume=str(checkpoint.checkpoint_dir(directory, 2)))
    assert len(list(directory.glob(run_dir.EVENT_FILES))) == 2  # the resumed run wrote its own file

    reader = event_accumulator.EventAccumulator(str(directory), size_guidance={event_accumulator.SCALARS: 0})
    losses = reader.Reload().Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, 3 * STEPS_PER_EPOCH + 1))  # 1..12, none twice
    replayed = [e for e in losses if e.step > 2 * STEPS_PER_EPOCH]
    assert all(e.wall_time >= before_resume for e in replayed)  # the resumed run's points, not the old ones
    assert tensorboard_scalars(directory) == expected_scalars(directory)


def test_tag_scheme():
    step = {"type": "step", "epoch": 1, "step": 3, "loss": 0.5, "lr": 1e-3, "grad_norm": 2, "skipped": True}
    epoch = {
        "type": "epoch",
        "epoch": 1,
        "step": 4,
        "train_loss": 0.25,
        "val_loss": float("nan"),  # non-finite: left out
        "val_accuracy": 0.75,
        "majority_baseline": 0.5,
        "note": "text",
        "choices": [1, 2],
    }
    assert metrics_log.scalars(step) == {"train/loss": 0.5, "train/lr": 1e-3, "train/grad_norm": 2.0}
    assert metrics_log.scalars(epoch) == {
        "epoch/train_loss": 0.25,
        "val/accuracy": 0.75,
        "epoch/majority_baseline": 0.5,
    }
    assert metrics_log.scalars({"type": "guard", "step": 3, "lr": 1e-3}) == {}
    assert metrics_log.scalars({"type": "step_options", "step": 0, "choices": []}) == {}
    assert metrics_log.scalars({**step, "loss": float("inf")}) == {"train/lr": 1e-3, "train/grad_norm": 2.0}


def test_only_rank_0_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # what a non-zero rank sees (training/distributed.rank)
    with metrics_log.MetricsLog(tmp_path, "tensorboard") as log:
        log.record({"type": "step", "epoch": 1, "step": 1, "loss": 0.5})
    assert list(tmp_path.iterdir()) == []


def test_a_missing_tensorboard_is_named_before_anything_is_built(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(run_config.ConfigError, match=r"install qformer-lora\[tensorboard\]"):
        train.train(config(tmp_path, "run", log="tensorboard"))
    assert not (tmp_path / "run").exists()
    metrics_log.summary_writer("jsonl")  # the default needs no package


def test_the_option_is_checked_on_the_command_line_and_in_run_configs(tmp_path, capsys):
    assert cli.build_parser().parse_args(["train", "--log", "tensorboard"]).log == "tensorboard"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--log", "csv"])
    assert "--log" in capsys.readouterr().err
    (tmp_path / "run.toml").write_text('log = "csv"\n')
    with pytest.raises(run_config.ConfigError, match=r"run.toml: option 'log' is 'csv'"):
        run_config.load_run_config(tmp_path / "run.toml")
    with pytest.raises(run_config.ConfigError, match="option 'log' is 'csv'"):
        metrics_log.MetricsLog(tmp_path, "csv")


def test_event_files_count_as_an_earlier_run_and_overwrite_deletes_them(tmp_path):
    with metrics_log.MetricsLog(tmp_path, "tensorboard") as log:
        log.record({"type": "step", "epoch": 1, "step": 1, "loss": 0.5})
    [events] = tmp_path.glob(run_dir.EVENT_FILES)
    assert (tmp_path / run_dir.LOG_FILE).exists()
    (tmp_path / run_dir.LOG_FILE).unlink()  # the event file alone still marks an earlier run
    with pytest.raises(run_config.ConfigError, match=re.escape(events.name)):
        run_dir.refuse_earlier_run(tmp_path)
    run_dir.clear_earlier_run(tmp_path)
    assert list(tmp_path.iterdir()) == []
