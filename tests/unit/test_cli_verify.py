"""`qformer-lora verify` through the real entry point."""

from __future__ import annotations

import json
import subprocess
import sys

from qformer_lora import cli


def test_verify_json_on_the_default_preset_reports_the_seed_counts():
    # the installed console script, as a user runs it (timeout only guards against a hang)
    result = subprocess.run([sys.executable, "-m", "qformer_lora.cli", "verify", "--json"],
                            capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(result.stdout)
    assert report["preset"] == "instructblip-flan-t5-xl"
    assert report["lora_tensors"] == 240
    assert report["trainable_parameters"] == 2_420_736
    assert report["components"]["language_model"]["trainable"] == 0


def test_verify_text_report_and_errors(capsys):
    assert cli.main(["verify", "--preset", "tiny-blip2-opt", "--r", "4"]) == 0
    out = capsys.readouterr().out
    assert "LoRA tensors:" in out and "qformer" in out and "language_model" in out
    assert cli.main(["verify", "--preset", "tiny-blip2-opt", "--targets", "query,nonsense"]) == 2
    assert "['nonsense'] match no linear layer in the Q-Former" in capsys.readouterr().err
    assert cli.main(["verify", "--preset", "missing-preset"]) == 2
    assert "no preset 'missing-preset'" in capsys.readouterr().err
