"""`qformer-lora reproduce` end to end: every item's status and key figures, and a broken fix."""

from __future__ import annotations

import json

import pytest

from qformer_lora import cli, expectations, forward, reproduce


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduction")
    assert cli.main(["reproduce", "--out", str(out)]) == 0
    assert (out / "REPRODUCTION.md").read_text().startswith("# Reproduction report")
    return json.loads((out / "REPRODUCTION.json").read_text())


@pytest.mark.slow
@pytest.mark.regression
def test_every_item_matches_the_installed_release(report):
    items = report["items"]
    assert list(items) == list(reproduce.ITEMS) and report["all_fixes_hold"]
    # the kwarg conflict is expected exactly where the per-release table pins a native failure
    pinned = expectations.for_release("kwarg_conflict")
    pinned_failures = sorted(k for k, v in pinned.items() if v["status"] != "ok")
    assert sorted(items["kwarg-conflict"]["evidence"]["native_failures"]) == pinned_failures
    assert items["kwarg-conflict"]["status"] == ("reproduced" if pinned_failures else "not applicable")
    scope = items["lora-scope"]["evidence"]["qformer"]
    assert (items["lora-scope"]["status"], scope["lora_tensors"], scope["trainable_parameters"]) == (
        "fixed", 240, 2_420_736)
    assert items["lora-scope"]["evidence"]["leak_refused"] is True
    nan = items["nan"]["evidence"]
    assert items["nan"]["status"] == "reproduced"
    assert nan["fp16_pure_finite_per_step"] == [True, False, False, False]
    assert nan["adam_eps_in_fp16"] == 0.0
    assert all(all(steps) for steps in nan["recommended_finite_per_step"].values())
    assert items["checkpoints"]["evidence"] == {"checkpoints": ["epoch-0002", "epoch-0004"],
                                                "resume_bitwise_identical": True}
    assert items["memory"]["status"] in ("not measured", "not measured now")  # no CUDA in this suite


@pytest.mark.regression
def test_a_broken_fix_makes_reproduce_exit_non_zero(monkeypatch, capsys):
    def broken(model, batch, reduction="mean"):
        raise TypeError("custom forward broken on purpose")

    monkeypatch.setattr(forward, "custom_forward", broken)
    assert cli.main(["reproduce", "--only", "kwarg-conflict"]) == 1
    assert "fix broken" in capsys.readouterr().out
