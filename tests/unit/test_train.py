"""The training loop, checkpoints and CLI on the embedded default (tiny base, shapes data)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from qformer_lora import checkpoint, cli, data, forward, inputs, presets
from qformer_lora.inference import generate
from qformer_lora.training import run_config, train

from ..conftest import check_against_release

GOLDEN_STEPS = 12  # one epoch of the default run: warm-up and the first decay steps


def quiet(**overrides) -> train.TrainConfig:
    return train.TrainConfig(progress=False, **overrides)


def small_data(tmp_path: Path, train_samples: int = 32, val_samples: int = 16) -> dict:
    """The first samples of the shapes manifests: resume and crash checks need a few steps, not the whole set."""
    options = {"image_root": str(data.SHAPES_DIR)}
    for split, n in (("train", train_samples), ("val", val_samples)):
        options[f"{split}_manifest"] = str(data.shapes_subset(tmp_path, split, n))
    return options


def losses(run_dir: Path) -> list[float]:
    return [
        r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["type"] == "step"
    ]


def epochs(run_dir: Path) -> list[dict]:
    return [
        r
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if r["type"] == "epoch" and "val_loss" in r
    ]


def adapter_state(run_dir: Path, epoch: int) -> dict[str, torch.Tensor]:
    return load_file(
        str(checkpoint.checkpoint_dir(run_dir, epoch) / checkpoint.ADAPTER_DIR / "adapter_model.safetensors")
    )


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> Path:
    """The README's default run, once, through the real CLI entry point."""
    run_dir = tmp_path_factory.mktemp("default") / "run"
    assert cli.main(["train", "--output-dir", str(run_dir), "--progress", "false"]) == 0
    return run_dir


@pytest.mark.long  # shares the README's default run (40 epochs, about 75 s on 2 cores)
def test_default_run_learns(default_run):
    history = epochs(default_run)
    start, end = history[0], history[-1]
    assert start["epoch"] == 0 and end["epoch"] == train.TrainConfig().epochs
    # Figures reached on CPU (torch 2.13, transformers 5.24, one thread): val loss 1.106 -> 0.361 (0.33 x),
    # accuracy 0.438 -> 0.625 against a majority-answer baseline of 0.208. The issue asks for
    # the loss to at least halve; accuracy must beat the majority answer by 0.30 (15 of the
    # 48 val questions), which the start (re-initialised Q-Former: 0.438, what the questions
    # alone give away) does not, so the adapter has to read the image to pass.
    assert end["val_loss"] <= 0.5 * start["val_loss"], (start["val_loss"], end["val_loss"])
    assert end["val_accuracy"] >= end["majority_baseline"] + 0.30, end
    assert end["train_loss"] < history[1]["train_loss"]


@pytest.mark.long  # shares the README's default run (40 epochs, about 75 s on 2 cores)
def test_default_run_checkpoints_the_language_model(default_run):
    # on by default since the H200 measurements (issue 8): exact, and under half the memory
    [record] = [
        r
        for r in map(json.loads, (default_run / "metrics.jsonl").read_text().splitlines())
        if r["type"] == "step_options"
    ]
    assert {c["option"]: c["used"] for c in record["choices"]}["lm_checkpointing"] == "on", record


@pytest.mark.long  # shares the README's default run (40 epochs, about 75 s on 2 cores)
def test_default_run_ends_with_its_record_and_curves(default_run):
    """The CLI's train closes the log with an end record and draws curves.png (issue 21)."""
    records = list(map(json.loads, (default_run / "metrics.jsonl").read_text().splitlines()))
    [end] = [r for r in records if r["type"] == "end"]
    # 40 epochs over the 192 shapes training samples; the wall time includes the training steps'
    assert end["train_samples"] == 40 * 192 and end["step"] == 40 * 12 and end["wall_s"] > end["train_s"] > 0
    assert end["samples_per_s"] == pytest.approx(end["train_samples"] / end["train_s"])
    pytest.importorskip("matplotlib")
    assert (default_run / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_golden_curve_is_shared_by_batch_and_accumulation_variants(tmp_path):
    """torchtune style: batch 16 x 1, 8 x 2 and 4 x 4 give one loss curve, pinned per release.

    Batch 16 x 1 is the default run's first epoch (its 40-epoch schedule, stopped after epoch 1):
    the golden curve."""
    assert train.TrainConfig().batch_size == 16 and train.TrainConfig().grad_accum == 1
    curves = {}
    for batch_size, accum in ((16, 1), (8, 2), (4, 4)):
        run = tmp_path / f"b{batch_size}x{accum}"
        train.train(quiet(output_dir=str(run), batch_size=batch_size, grad_accum=accum, stop_after_epochs=1))
        curves[(batch_size, accum)] = losses(run)[:GOLDEN_STEPS]
    reference = curves[(16, 1)]
    assert len(reference) == GOLDEN_STEPS
    for variant, curve in curves.items():
        worst = max(abs(a - b) / abs(b) for a, b in zip(curve, reference))
        assert worst <= 1e-5, f"batch x accumulation {variant} departs from 16 x 1 by {worst:.2e} (relative)"
    check_against_release("golden_loss", "default run, first epoch", reference, rel_tol=1e-4)


def test_checkpoint_cadence_and_keep_last(tmp_path):
    assert [e for e in range(1, 8) if checkpoint.should_save(e, 7, 2)] == [2, 4, 6, 7]
    run = tmp_path / "run"
    train.train(
        quiet(
            output_dir=str(run),
            epochs=5,
            save_every=2,
            keep_last=2,
            base_checkpoint=None,
            preset="tiny-blip2-opt",
            batch_size=64,
        )
    )
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["epoch-0004", "epoch-0005"]
    assert not list((run / "checkpoints").glob(".tmp-*")), "a staging directory was left behind"


def test_resume_is_bitwise_identical(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = dict(epochs=4, save_every=2, keep_last=0, **small_data(tmp_path))
    train.train(quiet(output_dir=str(straight), **common))
    train.train(quiet(output_dir=str(resumed), stop_after_epochs=2, **common))
    assert [p.name for p in checkpoint.list_checkpoints(resumed)] == ["epoch-0002"]
    train.train(quiet(output_dir=str(resumed), **common), resume="latest")
    a, b = adapter_state(straight, 4), adapter_state(resumed, 4)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"adapter tensors differ after resume: {different[:3]}"
    assert losses(straight) == losses(resumed)  # bitwise: same floats, same order


def test_crash_mid_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    run = tmp_path / "run"
    common = dict(epochs=4, save_every=2, keep_last=0, **small_data(tmp_path))
    train.train(quiet(output_dir=str(run), stop_after_epochs=2, **common))
    before = adapter_state(run, 2)

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint, "save_file", crash)  # dies after the adapter, before the optimizer state
    with pytest.raises(OSError, match="simulated"):
        train.train(quiet(output_dir=str(run), **common), resume="latest")
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["epoch-0002"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    after = adapter_state(run, 2)
    assert all(torch.equal(before[k], after[k]) for k in before)
    checkpoint.load_state(checkpoint.checkpoint_dir(run, 2))  # complete and loadable


@pytest.mark.long  # shares the README's default run (40 epochs, about 75 s on 2 cores)
def test_adapter_loads_in_plain_peft_with_the_same_outputs(default_run):
    path = checkpoint.latest_checkpoint(default_run)
    model, processor, family, config = generate.load_trained(path)
    plain = PeftModel.from_pretrained(
        presets.load_model(config["base_checkpoint"]), str(path / checkpoint.ADAPTER_DIR)
    ).eval()
    collator = inputs.Collator(processor, family, decoder_only=False)
    batch = collator([data.ShapesDataset("val")[i] for i in range(4)])
    with torch.no_grad():
        ours, theirs = forward.custom_forward(model, batch), forward.custom_forward(plain, batch)
    assert torch.equal(ours.logits, theirs.logits)
    base = presets.load_model(config["base_checkpoint"])
    with torch.no_grad():
        untrained = forward.custom_forward(base, batch)
    assert not torch.allclose(untrained.logits, ours.logits), "the adapter changed nothing"


@pytest.mark.long  # shares the README's default run (40 epochs, about 75 s on 2 cores)
def test_generate_after_training(default_run, capsys):
    manifest = data.SHAPES_DIR / "val.jsonl"  # the run's validation data: generate's default
    assert cli.main(["generate", str(default_run), "--limit", "48"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 48
    answers = [line.split(" -> ")[1].split("   (expected: ") for line in lines]
    vocabulary = {s.answer for s in data.read_manifest(manifest)}
    assert all(got in vocabulary for got, _ in answers), [got for got, _ in answers if got not in vocabulary][:5]
    accuracy = sum(got == want.rstrip(")") for got, want in answers) / len(answers)
    assert accuracy >= epochs(default_run)[-1]["majority_baseline"] + 0.15, accuracy


@pytest.mark.long  # shares the README's default run (40 epochs, about 75 s on 2 cores)
def test_export_merges_the_adapter(default_run, tmp_path):
    out = tmp_path / "merged"
    assert cli.main(["export", str(default_run), str(out)]) == 0
    merged = presets.load_model(out)
    model, processor, family, _ = generate.load_trained(checkpoint.latest_checkpoint(default_run))
    batch = inputs.Collator(processor, family, decoder_only=False)([data.ShapesDataset("val")[i] for i in range(3)])
    with torch.no_grad():
        gap = (forward.custom_forward(merged, batch).logits - forward.custom_forward(model, batch).logits).abs().max()
    assert gap < 1e-4, f"merged model departs from base + adapter by {gap:.2e}"
    assert cli.main(["export", str(default_run), str(out)]) == 2  # refuses to overwrite


@pytest.mark.parametrize(
    "toml, message",
    [
        ("epochz = 3\n", "unknown option 'epochz'"),
        ("epochs = 'three'\n", "option 'epochs' expects int, got 'three'"),
        ("lr = true\n", "option 'lr' expects float"),
        ("precision = 'fp8'\n", "run.toml: option 'precision' is 'fp8'"),
        ("epochs = \n", "invalid TOML"),
        # a negative keep_last pruned every checkpoint; zero counts divided by zero or trained nothing
        ("keep_last = -1\n", "run.toml: option 'keep_last' is -1; it must be at least 0"),
        ("batch_size = 0\n", "run.toml: option 'batch_size' is 0; it must be at least 1"),
        ("save_every = 0\n", "option 'save_every' is 0; it must be at least 1"),
        ("grad_accum = 0\n", "option 'grad_accum' is 0"),
        ("epochs = 0\n", "option 'epochs' is 0"),
        ("stop_after_epochs = 0\n", "option 'stop_after_epochs' is 0"),
    ],
)
def test_bad_run_config_is_named(tmp_path, toml, message):
    path = tmp_path / "run.toml"
    path.write_text(toml)
    with pytest.raises(run_config.ConfigError, match=message):
        run_config.load_run_config(path)


def test_bad_values_name_their_flag_and_unreadable_configs_their_file(tmp_path):
    with pytest.raises(run_config.ConfigError, match="--keep-last: option 'keep_last' is -1"):
        run_config.load_run_config(None, {"keep_last": "-1"})
    with pytest.raises(run_config.ConfigError, match="--precision: option 'precision' is 'fp8'"):
        run_config.load_run_config(None, {"precision": "fp8"})
    with pytest.raises(run_config.ConfigError, match=f"{tmp_path}: cannot read the run config"):
        run_config.load_run_config(tmp_path)  # a directory
    binary = tmp_path / "run.toml"
    binary.write_bytes(b"\xff\xfe epochs = 3")
    with pytest.raises(run_config.ConfigError, match="run.toml: cannot read the run config"):
        run_config.load_run_config(binary)


def test_an_earlier_run_is_refused_untouched_unless_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    common = dict(output_dir=str(run), epochs=2, save_every=1, keep_last=1, **_few(tmp_path))
    train.train(quiet(**common))
    log, checkpoints = (run / "metrics.jsonl").read_text(), [p.name for p in checkpoint.list_checkpoints(run)]
    assert checkpoints == ["epoch-0002"]
    code = cli.main(["train", "--output-dir", str(run), "--epochs", "1", "--progress", "false"])
    err = capsys.readouterr().err
    assert code == 2 and "holds an earlier run (metrics.jsonl, checkpoints/epoch-0002)" in err and "--overwrite" in err
    assert (run / "metrics.jsonl").read_text() == log and [
        p.name for p in checkpoint.list_checkpoints(run)
    ] == checkpoints
    # before the fix the new run kept epoch-0002 and pruned its own epoch-0001 (keep_last=1)
    train.train(quiet(**common | {"epochs": 1, "overwrite": True}))
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["epoch-0001"]
    assert max(r["epoch"] for r in epochs(run)) == 1


def test_resume_checks_its_checkpoint_first_and_drops_a_torn_last_log_line(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint to resume from"):
        train.train(quiet(output_dir=str(run)), resume="latest")
    assert not run.exists(), "a refused resume left a run directory behind"
    with pytest.raises(checkpoint.CheckpointError, match="nowhere: no such checkpoint directory"):
        train.train(quiet(output_dir=str(run)), resume=tmp_path / "nowhere")
    common = dict(output_dir=str(run), epochs=2, save_every=1, **_few(tmp_path))
    train.train(quiet(**common, stop_after_epochs=1))
    log = run / "metrics.jsonl"
    good = log.read_text()
    log.write_text(good + '{"type": "step", "epoch": 2, "st')  # the process died mid-write
    train.train(quiet(**common), resume="latest")
    assert max(r["epoch"] for r in epochs(run)) == 2
    log.write_text(good + '{"type": "step", "step": "x"}\n')
    with pytest.raises(checkpoint.CheckpointError, match=r"metrics.jsonl:\d+: field 'step' is 'x'"):
        train.train(quiet(**common), resume=checkpoint.checkpoint_dir(run, 1))


def test_resume_refuses_options_its_checkpoint_overrides(tmp_path):
    run = tmp_path / "run"
    common = dict(output_dir=str(run), epochs=2, save_every=1, **_few(tmp_path))
    train.train(quiet(**common, stop_after_epochs=1))
    # lora_r: a size-mismatch traceback; lr: silently replaced by the restored optimizer's; the
    # language model's quantization: the adapter would go on against other frozen weights
    for option, message in (
        ({"lora_r": 4}, "lora_r=8 (this run: 4)"),
        ({"lr": 1e-9}, "lr=0.006 (this run: 1e-09)"),
        ({"targets": ("query",)}, "targets=['query', 'key', 'value', 'dense']"),
        # refused before anything is built, so bitsandbytes is not needed to see it
        ({"quantize_language_model": "nf4"}, "quantize_language_model='none' (this run: 'nf4')"),
    ):
        with pytest.raises(checkpoint.CheckpointError, match=re.escape(message)):
            train.train(quiet(**common | option), resume="latest")
    train.train(quiet(**common | {"epochs": 3}), resume="latest")  # the schedule's length may change
    assert max(r["epoch"] for r in epochs(run)) == 3


def _few(tmp_path: Path, count: int = 8) -> dict:
    """Options for a short training manifest of the shapes data: a run of seconds."""
    path = tmp_path / "few.jsonl"
    path.write_text("".join(line + "\n" for line in (data.SHAPES_DIR / "train.jsonl").read_text().splitlines()[:count]))
    return {"train_manifest": str(path), "image_root": str(data.SHAPES_DIR)}


def test_flags_override_the_run_config_and_bad_manifest_writes_nothing(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text("epochs = 3\nlr = 0.01\n")
    merged = run_config.load_run_config(config, {"lr": "0.002", "targets": "query,value"})
    assert (merged.epochs, merged.lr, merged.targets) == (3, 0.002, ("query", "value"))
    # recorded in every checkpoint: a relative path broke generate / export run from elsewhere
    relative = run_config.load_run_config(None, {"base_checkpoint": "fixtures/checkpoints/x"})
    assert relative.base_checkpoint == str(Path.cwd() / "fixtures/checkpoints/x")
    assert run_config.load_run_config(None, {"base_checkpoint": "none"}).base_checkpoint is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "images/train_000.png", "instruction": "q?", "answer": "red"}\n{oops\n')
    run = tmp_path / "never"
    code = cli.main(
        [
            "train",
            "--train-manifest",
            str(bad),
            "--image-root",
            str(data.SHAPES_DIR),
            "--output-dir",
            str(run),
            "--progress",
            "false",
        ]
    )
    assert code == 2 and "bad.jsonl:2" in capsys.readouterr().err
    assert not run.exists(), "a failed start left files behind"
