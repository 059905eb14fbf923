"""--batch-size auto (issue 19, item 4): the decision against peaks from a known line, the back-off,
the refusals, and a CPU run with a fake device whose steps are real.

The fake peaks are ``a + b * batch`` with A = 10 GiB and B = 0.5 GiB per sample and a 40 GiB
budget, so with the 0.9 margin the target is 36 GiB and the largest batch within it is
(36 - 10) / 0.5 = 52 (batch 53 would peak at 36.5 GiB).
"""

from __future__ import annotations

import argparse
import json
from fractions import Fraction
from pathlib import Path

import pytest

from qformer_lora import cli, cli_options, data
from qformer_lora.training import auto_batch, distributed, run_config, summary, train
from qformer_lora.training.run_config import ConfigError, TrainConfig

GIB = 1024**3
A, B, BUDGET = 10 * GIB, GIB // 2, 40 * GIB


class Line:
    """peak_of for choose: ``a + b * n`` bytes up to ``fits_up_to`` (None above it: out of memory),
    ``over`` bytes more above ``clean_up_to`` (a peak the line did not predict); records each call."""

    def __init__(self, fits_up_to=None, clean_up_to=None, over=0):
        self.fits_up_to, self.clean_up_to, self.over, self.calls = fits_up_to, clean_up_to, over, []

    def __call__(self, n: int):
        self.calls.append(n)
        if self.fits_up_to is not None and n > self.fits_up_to:
            return None
        return A + B * n + (self.over if self.clean_up_to is not None and n > self.clean_up_to else 0)


def test_the_margin_is_the_stated_nine_tenths():
    assert auto_batch.MARGIN == Fraction(9, 10) and auto_batch.PROBE_BATCHES == (2, 8)


def test_two_probes_a_fitted_line_and_one_confirming_step_give_the_hand_computed_batch():
    peaks = Line()
    chosen = auto_batch.choose(peaks, BUDGET, budget_from="free memory on cuda:0")
    assert peaks.calls == [2, 8, 52]  # two probes, one confirmation
    assert chosen.batch_size == chosen.predicted == 52 and not chosen.backed_off
    assert chosen.fit == {"a_bytes": A, "b_bytes_per_sample": B}
    assert chosen.probes == [[2, 11 * GIB], [8, 14 * GIB]] and chosen.confirmations == [[52, 36 * GIB]]
    assert chosen.describe() == (
        "--batch-size auto chose 52: peak = 10.00 GiB + 0.50 GiB x batch from probe steps at 2 and 8; "
        "predicted 52; budget 0.9 x 40.00 GiB (free memory on cuda:0) = 36.00 GiB; "
        "confirmed by a step at 52 peaking at 36.00 GiB"
    )
    record = chosen.record()
    assert record["type"] == "auto_batch" and record["margin"] == 0.9 and record["why"] == chosen.describe()
    json.dumps(record, allow_nan=False)  # a log record: plain JSON


@pytest.mark.parametrize(
    "peaks",
    [Line(fits_up_to=40), Line(clean_up_to=40, over=GIB)],  # out of memory above 40 / peaks 1 GiB above the line
    ids=["out-of-memory", "over-budget"],
)
def test_a_confirmation_that_does_not_fit_backs_off_by_bisection_and_says_so(peaks):
    """Bisection between 8 (the probe that fit) and 52 (predicted, did not fit).

    Out of memory above 40: 30 fits, 41 not, 35, 38, 39 and 40 fit: 40.
    1 GiB above the line beyond 40 (what the line did not predict): 52 peaks at 10 + 26 + 1 =
    37 GiB > 36; 30, 41 (31.5 GiB), 46 (34), 49 (35.5) and 50 (36) fit, 51 (36.5) not: 50."""
    chosen = auto_batch.choose(peaks, BUDGET, budget_from="test")
    if peaks.fits_up_to is not None:
        assert peaks.calls == [2, 8, 52, 30, 41, 35, 38, 39, 40] and chosen.batch_size == 40
        assert "batch 41 did not fit, backed off by bisection to 40 (7 confirming steps)" in chosen.describe()
    else:
        assert peaks.calls == [2, 8, 52, 30, 41, 46, 49, 50, 51] and chosen.batch_size == 50
        assert "batch 51 did not fit, backed off by bisection to 50" in chosen.describe()
    assert chosen.backed_off and chosen.predicted == 52


def test_a_probe_that_does_not_fit_bisects_below_it_without_a_fit():
    """Out of memory above 5: probe 2 fits, probe 8 does not; 5 fits, 6 does not."""
    peaks = Line(fits_up_to=5)
    chosen = auto_batch.choose(peaks, BUDGET)
    assert peaks.calls == [2, 8, 5, 6] and chosen.batch_size == 5
    assert chosen.fit is None and chosen.predicted is None and chosen.backed_off
    assert "did not both fit" in chosen.describe() and "batch 6 did not fit" in chosen.describe()


@pytest.mark.parametrize(
    ("limit", "calls"),
    [(20, [2, 8, 20]), (5, [2, 5]), (2, [2]), (1, [1])],
)
def test_no_batch_is_larger_than_the_training_set(limit, calls):
    peaks = Line()
    chosen = auto_batch.choose(peaks, BUDGET, limit=limit)
    assert peaks.calls == calls and chosen.batch_size == limit and not chosen.backed_off
    if limit == 20:
        assert "predicted 52, capped at the 20 training samples" in chosen.describe()


def test_nothing_fitting_is_refused_with_the_budget_named():
    peaks = Line(fits_up_to=0)
    with pytest.raises(ConfigError, match=r"not even batch 1 fits in 0\.9 x 40\.00 GiB \(test\)") as err:
        auto_batch.choose(peaks, BUDGET, budget_from="test")
    assert peaks.calls == [2, 1] and "batch 2: out of memory" in str(err.value)


def test_memory_that_does_not_grow_is_refused():
    with pytest.raises(ConfigError, match="did not grow from batch 2 .* to 8"):
        auto_batch.choose(lambda n: A, BUDGET)


def test_cpu_is_refused_with_the_reason_and_a_started_run_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    flags = ["--image-root", str(data.SHAPES_DIR), "--output-dir", str(run), "--progress", "false"]
    for split in ("train", "val"):
        flags += [f"--{split}-manifest", str(data.shapes_subset(tmp_path, split, 4))]
    assert cli.main(["train", "--batch-size", "auto", "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err
    assert "--batch-size auto needs a CUDA device (this run is on cpu)" in err
    assert "give --batch-size a number" in err and not run.exists()


def test_other_refusals_name_their_option(monkeypatch):
    with pytest.raises(ConfigError, match="--memory-budget-gib is read by --batch-size auto only"):
        auto_batch.resolve(TrainConfig(memory_budget_gib=24.0), None, None, None, None)
    with pytest.raises(ConfigError, match="--memory-budget-gib is -1; it must be positive"):
        auto_batch.resolve(TrainConfig(batch_size="auto", memory_budget_gib=-1.0), None, None, None, None)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match="not available under torchrun"):
        auto_batch.resolve(TrainConfig(batch_size="auto"), None, None, None, None)


def test_auto_is_a_word_of_batch_size_alone():
    assert run_config.coerce("batch_size", "AUTO", "--batch-size") == "auto"
    assert run_config.coerce("batch_size", "12", "--batch-size") == 12
    with pytest.raises(ConfigError, match=r"expects int or 'auto', got 'big'"):
        run_config.coerce("batch_size", "big", "--batch-size")
    with pytest.raises(ConfigError, match="expects int"):
        run_config.coerce("grad_accum", "auto", "--grad-accum")
    assert run_config.load_run_config(None, {"batch_size": "auto"}).batch_size == "auto"
    with pytest.raises(ConfigError, match="at least 1"):
        run_config.load_run_config(None, {"batch_size": "0"})
    args = argparse.Namespace(batch_size="auto", max_new_tokens=None, num_beams=1, length_penalty=1.0)
    with pytest.raises(ConfigError, match="sizes training batches only"):
        cli_options.generation_options(args)


def test_toml_takes_auto(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('batch_size = "auto"\nmemory_budget_gib = 24\n')
    loaded = run_config.load_run_config(config)
    assert (loaded.batch_size, loaded.memory_budget_gib) == ("auto", 24.0)


class FakeDevice:
    """A device memory for the CPU: the real probe step runs, its peak is A + B x the samples it took."""

    def __init__(self, budget: int):
        self.budget_bytes, self.batches = budget, []

    def budget(self):
        return self.budget_bytes, "fake"

    def peak_of_step(self, run_step):
        n = run_step().samples  # the step's StepResult: the batch it really trained on
        self.batches.append(n)
        return A + B * n


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_an_auto_run_trains_exactly_as_one_given_its_batch_and_resumes_with_it(tmp_path, monkeypatch):
    """Budget 20 GiB: target 18 GiB, (18 - 10) / 0.5 = 16, under the 24 training samples. The probe
    steps (2, 8, then 16) are real steps on the run's model; the run then matches batch 16 bitwise,
    so they left the adapter as it was. A resume with auto takes the checkpoint's 16, probing nothing."""
    data_options = {"image_root": str(data.SHAPES_DIR)}
    for split, n in (("train", 24), ("val", 8)):
        data_options[f"{split}_manifest"] = str(data.shapes_subset(tmp_path, split, n))
    common = dict(progress=False, epochs=2, save_every=1, **data_options)
    fake = FakeDevice(20 * GIB)
    monkeypatch.setattr(auto_batch, "device_memory", lambda device, config: fake)
    train.train(TrainConfig(output_dir=str(tmp_path / "auto"), batch_size="auto", stop_after_epochs=1, **common))
    assert fake.batches == [2, 8, 16]
    [record] = records(tmp_path / "auto", "auto_batch")
    assert record["batch_size"] == 16 and record["confirmations"] == [[16, 18 * GIB]]
    assert "--batch-size auto chose 16" in summary.format_summary(summary.summarise(tmp_path / "auto"))

    def no_probing(device, config):
        raise AssertionError("a resumed run probed")

    monkeypatch.setattr(auto_batch, "device_memory", no_probing)
    train.train(TrainConfig(output_dir=str(tmp_path / "auto"), batch_size="auto", **common), resume="latest")
    assert records(tmp_path / "auto", "auto_batch")[-1]["batch_size"] == 16
    train.train(TrainConfig(output_dir=str(tmp_path / "given"), batch_size=16, **common))
    auto, given = (
        [r["loss"] for r in records(tmp_path / name, "step")] for name in ("auto", "given")
    )  # 24 samples in batches of 16: 2 steps an epoch
    assert len(given) == 4 and auto == given  # bitwise
