"""`qformer-lora verify` through the real entry point."""

from __future__ import annotations

import json
import subprocess
import sys

from qformer_lora import cli


def test_verify_json_on_the_default_preset_reports_the_seed_counts():
    # the installed console script, as a user runs it (timeout only guards against a hang)
    result = subprocess.run(
        [sys.executable, "-m", "qformer_lora.cli", "verify", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(result.stdout)
    assert report["preset"] == "instructblip-flan-t5-xl"
    assert report["lora_tensors"] == 240
    assert report["trainable_parameters"] == 2_420_736
    assert report["components"]["language_model"]["trainable"] == 0


def test_verify_text_report_and_errors(capsys):
    assert cli.main(["verify", "--preset", "tiny-blip2-opt", "--lora-r", "4"]) == 0
    out = capsys.readouterr().out
    assert "LoRA tensors:" in out and "qformer" in out and "language_model" in out
    assert cli.main(["verify", "--preset", "tiny-blip2-opt", "--targets", "query,nonsense"]) == 2
    assert "['nonsense'] match no linear layer in the Q-Former" in capsys.readouterr().err
    assert cli.main(["verify", "--preset", "missing-preset"]) == 2
    assert "no preset 'missing-preset'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input, named

import pytest  # noqa: E402

from qformer_lora import data  # noqa: E402
from qformer_lora.bench import measurement, sweep  # noqa: E402
from qformer_lora.diagnostics import doctor  # noqa: E402
from qformer_lora.inference import generate  # noqa: E402


@pytest.mark.parametrize(
    "argv, message",
    [
        # a batch of 0 ran, recorded a reshape error and wrote reports with exit 0
        (["bench", "--device", "cpu", "--batch-sizes", "0"], "argument --batch-sizes: 0 is not a positive integer"),
        (
            ["bench", "--device", "cpu", "--batch-sizes", "1", "--steps", "0"],
            "argument --steps: 0 is not a positive integer",
        ),
        # --limit -1 silently dropped the last sample, 0 ended in an IndexError traceback
        (
            ["generate", "run", "--manifest", "m.jsonl", "--limit", "-1"],
            "argument --limit: -1 is not a positive integer",
        ),
        (["doctor", "--device", "banana"], "argument --device: 'banana' is not a device"),
    ],
)
def test_bad_numbers_and_devices_are_refused_by_the_parser(argv, message, capsys, tmp_path):
    if argv[0] == "bench":  # were the check gone: a tiny sweep into tmp_path, not the full-size grid
        argv = argv + ["--preset", "tiny-instructblip-flan-t5", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bench_on_a_machine_without_cuda_says_so(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        cli.main(["bench", "--device", "cuda", "--preset", "tiny-instructblip-flan-t5", "--out", str(tmp_path)])
    assert "argument --device: cuda: no CUDA device here" in capsys.readouterr().err
    # the default (auto) resolves to the CPU here: the full-size grid is refused, naming what to do
    assert cli.main(["bench", "--out", str(tmp_path)]) == 2
    assert "the built-in grid builds full-size models" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "a refused run wrote reports"


def test_a_non_finite_stop_is_a_diagnosis_not_a_traceback(tmp_path, capsys):
    # eps=0 (forced past the doctor) gives NaN at the first optimizer step; guard=raise stops there
    few = tmp_path / "few.jsonl"
    few.write_text("".join(line + "\n" for line in (data.SHAPES_DIR / "train.jsonl").read_text().splitlines()[:4]))
    code = cli.main(
        [
            "train",
            "--train-manifest",
            str(few),
            "--image-root",
            str(data.SHAPES_DIR),
            "--epochs",
            "1",
            "--adam-eps",
            "0",
            "--allow-unsafe",
            "true",
            "--output-dir",
            str(tmp_path / "run"),
            "--progress",
            "false",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "\nqformer-lora: error: non-finite parameter at optimizer step 1" in "\n" + err, err
    assert "Traceback" not in err, err


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16-amp"])
def test_doctor_refuses_a_zero_adam_eps_in_every_precision(precision):
    # fp32 training with eps=0 gave NaN at step 1, and the doctor said "no findings"
    codes = {f.code: f.severity for f in doctor.check_config(precision, lr=1e-3, adam_eps=0.0)}
    assert codes.get("eps-zero") == doctor.FATAL, codes
    assert "eps-zero" not in {f.code for f in doctor.check_config(precision, lr=1e-3, adam_eps=1e-8)}


def test_doctor_names_a_base_checkpoint_without_a_config(tmp_path, capsys):
    # a mistyped path was checked as if it had no language model: the T5 fp16 warning vanished
    assert cli.main(["doctor", "--base-checkpoint", str(tmp_path / "nope"), "--precision", "fp16-amp"]) == 2
    assert f"{tmp_path / 'nope'}: no config.json" in capsys.readouterr().err


def test_generate_and_export_check_their_own_arguments_before_loading_a_model(tmp_path, monkeypatch, capsys):
    def load_trained(path):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(generate, "load_trained", load_trained)
    assert cli.main(["generate", "run", "--image", str(tmp_path / "x.png")]) == 2
    assert "--image and --question go together" in capsys.readouterr().err
    assert cli.main(["generate", str(tmp_path)]) == 2  # the default data is the run's: read from its checkpoint
    assert f"{tmp_path}: not a training checkpoint" in capsys.readouterr().err
    assert cli.main(["generate", "run", "--image", str(tmp_path / "nope.png"), "--question", "q?"]) == 2
    assert "nope.png" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert cli.main(["export", "run", str(tmp_path / "taken")]) == 2
    assert "taken already exists" in capsys.readouterr().err


def test_bench_options_batch_runs_only_the_step_option_table(monkeypatch, tmp_path, capsys):
    # the GPU's option rows repeated with more steps; the sweep itself is tested in test_bench.py
    calls = []
    monkeypatch.setattr(
        sweep,
        "run_benchmark",
        lambda points, *args, **kwargs: (
            calls.append((points, kwargs))
            or ({"paragraph": "p"}, {"json": tmp_path / "r.json", "md": tmp_path / "r.md", "figures": {}})
        ),
    )
    cli.main(
        [
            "bench",
            "--device",
            "cpu",
            "--preset",
            "tiny-instructblip-flan-t5",
            "--options-batch",
            "4",
            "--steps",
            "7",
            "--out",
            str(tmp_path),
        ]
    )
    [(points, kwargs)] = calls
    assert points == measurement.options_grid("tiny-instructblip-flan-t5", 4) and kwargs["steps"] == 7
    assert [p.forward for p in points[:2]] == ["custom", "native"] and measurement.is_plain(points[0])
    assert all(4 in p.batch_sizes for p in points)
