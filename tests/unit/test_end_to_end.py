"""bench/end_to_end.py on CPU with the tiny preset: the files it reads, the batches the loop and the
step see, the worker count, and the arithmetic of its figures. Everything runs for real; the
timing itself is the long benchmark's (test_end_to_end_benchmark.py).
"""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from PIL import Image

from qformer_lora import cli, formats
from qformer_lora.bench import end_to_end, report_files

PRESET = "tiny-instructblip-flan-t5"
BATCH, WARMUP, STEPS = 2, 1, 2


def tiny_config(**fields):
    """fp32 (bitwise-reproducible on a CPU), answer budget 16 as on the GPU run."""
    [config] = end_to_end.configs(PRESET, ["fp32"], [BATCH], num_workers=0, max_answer_tokens=16)
    return dataclasses.replace(config, **fields)


@pytest.fixture(scope="module")
def timed():
    """One real run (both forwards, loop and step) and the wall time of the call."""
    started = time.perf_counter()
    report = end_to_end.run(tiny_config(), device="cpu", steps=STEPS, warmup=WARMUP)
    return report, time.perf_counter() - started


def test_generated_jpegs_are_coco_sized_decodable_and_seeded(tmp_path):
    manifest = end_to_end.write_images(tmp_path / "a", 3, seed=0)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(records) == 3
    for record in records:
        with Image.open(manifest.parent / record["image"]) as image:
            assert (image.format, image.size, image.mode) == ("JPEG", (640, 480), "RGB")
            image.load()  # decodes the whole file: a truncated JPEG raises here
            # photo-like, not flat: many distinct colours (a flat fill would have a handful)
            assert len(image.getcolors(maxcolors=1 << 24)) > 10_000
    again = end_to_end.write_images(tmp_path / "b", 3, seed=0).parent
    other = end_to_end.write_images(tmp_path / "c", 3, seed=1).parent
    first = (manifest.parent / records[0]["image"]).read_bytes()
    assert (again / records[0]["image"]).read_bytes() == first
    assert (other / records[0]["image"]).read_bytes() != first


def test_a_manifest_longer_than_the_distinct_files_names_them_in_turn(tmp_path):
    # 5 samples over 2 files: photo_0000, photo_0001, photo_0000, photo_0001, photo_0000
    manifest = end_to_end.write_images(tmp_path, 5, distinct=2)
    images = [json.loads(line)["image"] for line in manifest.read_text().splitlines()]
    assert images == ["photo_0000.jpg", "photo_0001.jpg"] * 2 + ["photo_0000.jpg"]
    assert sorted(p.name for p in tmp_path.glob("*.jpg")) == ["photo_0000.jpg", "photo_0001.jpg"]
    samples = formats.read(manifest, "auto", None, split="train")  # the trainer's reader takes it
    assert len({s.id for s in samples}) == 5


def test_batches_have_the_budgets_shapes(tmp_path):
    # static shapes: Q-Former instruction and LM prompt padded to max_prompt_tokens (32), labels to
    # max_answer_tokens (16); the tiny preset's images are 30 px
    config = tiny_config()
    bench = end_to_end.prepare(config, end_to_end.write_images(tmp_path, 4), torch.device("cpu"))
    batches = end_to_end.collated(bench)
    assert len(batches) == 4 // BATCH
    shapes = {k: tuple(v.shape) for k, v in batches[0].items() if torch.is_tensor(v)}
    assert shapes == {
        "pixel_values": (BATCH, 3, 30, 30),
        "qformer_input_ids": (BATCH, 32),
        "qformer_attention_mask": (BATCH, 32),
        "input_ids": (BATCH, 32),
        "attention_mask": (BATCH, 32),
        "labels": (BATCH, 16),
    }


def test_the_loop_and_the_step_see_bitwise_the_same_batches(timed):
    report, _ = timed
    for name in end_to_end.FORWARDS:
        loop, step = report["results"][name]["loop"], report["results"][name]["step"]
        assert len(loop["losses"]) == WARMUP + STEPS
        assert loop["losses"] == step["losses"], name  # files -> workers -> step == pre-collated -> step
    losses = report["results"]["custom"]["loop"]["losses"]
    assert len(set(losses)) == len(losses), "each step sees another batch (and moved the adapter)"
    # the native forward computes the same loss on the same batch from the same adapter
    torch.testing.assert_close(losses[0], report["results"]["native"]["loop"]["losses"][0], rtol=1e-5, atol=0)


def test_worker_processes_do_not_change_the_losses(timed):
    report, _ = timed
    workers = end_to_end.run(
        tiny_config(num_workers=2), device="cpu", steps=STEPS, warmup=WARMUP, forwards=("custom",), count_flops=False
    )
    assert workers["config"]["num_workers"] == 2 and report["config"]["num_workers"] == 0
    assert workers["results"]["custom"]["loop"]["losses"] == report["results"]["custom"]["loop"]["losses"]


def test_samples_per_second_is_samples_over_the_timed_seconds(timed):
    report, wall_s = timed
    for name, modes in report["results"].items():
        for mode, t in modes.items():
            assert "error" not in t, (name, mode, t)
            assert t["samples"] == BATCH * STEPS == 4  # the warm-up step's samples are not counted
            assert t["samples_per_s"] == t["samples"] / t["elapsed_s"]
            assert t["step_ms"] == 1000 * t["elapsed_s"] / STEPS
            assert 0 < t["elapsed_s"] < wall_s
    loop, step = report["results"]["custom"]["loop"], report["results"]["custom"]["step"]
    assert loop["loader_wait_ms_per_batch"] > 0 and step["loader_wait_ms_per_batch"] is None
    ratios = report["custom_vs_native"]
    assert ratios["loop"]["speedup"] == loop["samples_per_s"] / report["results"]["native"]["loop"]["samples_per_s"]
    assert ratios["loop"]["memory_ratio"] is None and report["targets"]["met"] is None  # no memory figures on CPU
    assert report["images"] == {"samples": BATCH * (WARMUP + STEPS), "files": 6, "width": 640, "height": 480}


class TickingClock:
    """perf_counter advancing by ``tick`` seconds per call: elapsed time = ticks between the reads."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


def test_the_warm_up_steps_are_not_timed(tmp_path, monkeypatch):
    # time_step reads the clock at the start, when the warm-up is over, and at the end: with a clock
    # of 0.25 s per read, 2 timed steps of batch 2 take 0.25 s (one tick), so 4 / 0.25 = 16 samples/s;
    # timing the warm-up step too would read 0.5 s and 8 samples/s
    bench = end_to_end.prepare(tiny_config(), end_to_end.write_images(tmp_path, 6), torch.device("cpu"))
    parts, _ = end_to_end.step_parts(bench, "custom")
    batches = end_to_end.collated(bench)
    monkeypatch.setattr(end_to_end, "time", TickingClock(0.25))
    timing = end_to_end.time_step(bench, parts, batches, warmup=1, steps=2)
    assert (timing["samples"], timing["elapsed_s"], timing["samples_per_s"]) == (4, 0.25, 16.0)


def test_flops_and_the_report_files(timed, tmp_path):
    report, _ = timed
    assert report["flops_per_sample"] > 0 and report["flops_error"] is None
    assert report["results"]["custom"]["loop"]["mfu"] is None  # a CPU has no 16-bit peak
    paths = report_files.write_end_to_end(report, tmp_path)
    assert paths["json"].name == f"end-to-end-cpu-{report['created'][:10]}-fp32-b{BATCH}.json"
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(report))
    text = paths["md"].read_text()
    assert "| custom | loop |" in text and "| native | step |" in text and report["paragraph"] in text


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [("compile_qformer", True, "--compile-qformer"), ("feature_cache", "memory", "--feature-cache")],
)
def test_step_options_it_does_not_measure_are_refused(field, value, flag):
    with pytest.raises(ValueError, match=flag):
        end_to_end.run(tiny_config(**{field: value}), device="cpu", steps=1)


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="steps >= 1"):
        end_to_end.run(tiny_config(), device="cpu", steps=0)
    with pytest.raises(ValueError, match="forwards"):
        end_to_end.run(tiny_config(), device="cpu", forwards=("eager",))


def test_cli_writes_the_report(tmp_path, capsys):
    argv = ["bench", "--end-to-end", "--preset", PRESET, "--device", "cpu", "--precisions", "fp32"]
    argv += ["--batch-sizes", "2", "--steps", "1", "--num-workers", "0", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    [written] = tmp_path.glob("end-to-end-cpu-*-fp32-b2.json")
    report = json.loads(written.read_text())
    assert report["config"]["preset"] == PRESET and report["settings"]["measured_steps"] == 1
    assert report["config"]["lm_checkpointing"] is True  # bench's default is train's
    assert report["paragraph"] in capsys.readouterr().out


def test_cli_refuses_sweep_only_flags(capsys):
    argv = ["bench", "--end-to-end", "true", "--preset", PRESET, "--device", "cpu", "--options-batch", "4"]
    assert cli.main(argv) == 2
    assert "--options-batch apply to the sweep only" in capsys.readouterr().err


def test_cli_honours_sync_every_with_deferred_reads(tmp_path):
    """--sync-every 2 over 1 warm-up + 2 timed steps: reads after step 2 and at the end (step 3), as
    train_epoch reads; the losses are the per-step reading's (deferred_step is bitwise training_step)."""
    argv = ["bench", "--end-to-end", "--preset", PRESET, "--device", "cpu", "--precisions", "fp32", "--batch-sizes"]
    argv += ["2", "--steps", "2", "--num-workers", "0", "--fused-optimizer", "true", "--out", str(tmp_path)]
    assert cli.main([*argv, "--sync-every", "2"]) == 0
    [written] = tmp_path.glob("end-to-end-cpu-*-fp32-b2.json")
    deferred = json.loads(written.read_text())
    written.unlink()
    assert cli.main(argv) == 0
    [written] = tmp_path.glob("end-to-end-cpu-*-fp32-b2.json")
    every_step = json.loads(written.read_text())
    assert (deferred["config"]["sync_every"], every_step["config"]["sync_every"]) == (2, 0)
    for mode in ("loop", "step"):
        custom = deferred["results"]["custom"][mode]
        assert (custom["host_reads"], custom["actions"], custom["samples"]) == (2, {"step": 3}, 2 * 2)
        assert custom["losses"] == every_step["results"]["custom"][mode]["losses"]
        assert every_step["results"]["custom"][mode]["host_reads"] is None
        assert deferred["results"]["native"][mode]["host_reads"] is None  # the baseline reads every step


def test_the_sweep_refuses_sync_every(capsys):
    argv = ["bench", "--preset", PRESET, "--device", "cpu", "--sync-every", "2"]
    assert cli.main(argv) == 2
    assert "--sync-every 2 applies to --end-to-end only" in capsys.readouterr().err
