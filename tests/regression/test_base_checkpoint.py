"""`reproduce --base-checkpoint` on the shipped tiny base and on the same weights in the 2023 hub layouts.

The layouts (repro/era_layouts.py) hold the shipped base's tensors bitwise, so every figure a
reproduction reports for them is derivable from the base: the same parameter count, the same LoRA
counts as `verify`'s scope report of the loaded model, the seed's fp16-pure pattern. What the
installed release does with each layout (which native forwards fail, and how) is pinned per release
in resources/expectations/checkpoint_layouts.json (QFORMER_LORA_RECORD=1 records a release's row).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from qformer_lora import cli, lora, presets
from qformer_lora.repro import era_layouts, reproduce
from qformer_lora.training.run_config import TINY_BASE_CHECKPOINT

from ..conftest import check_against_release

LAYOUTS = ("shipped", *era_layouts.WEIGHTS)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """layout -> (checkpoint directory, the report `reproduce --base-checkpoint` wrote for it)."""
    root = tmp_path_factory.mktemp("layouts")
    found = {}
    for layout in LAYOUTS:
        directory = TINY_BASE_CHECKPOINT if layout == "shipped" else era_layouts.write(root / layout, layout)
        out = root / f"report-{layout}"
        assert cli.main(["reproduce", "--base-checkpoint", str(directory), "--device", "cpu", "--out", str(out)]) == 0
        [js] = out.glob("REPRODUCTION-*.json")
        assert js.with_suffix(".md").is_file()
        found[layout] = (Path(directory), json.loads(js.read_text(encoding="utf-8")))
    return found


@pytest.mark.regression
@pytest.mark.parametrize("layout", LAYOUTS)
def test_report_names_the_checkpoint_and_its_config_hash(reports, layout):
    directory, report = reports[layout]
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    info = report["checkpoint"]
    assert info["path"] == str(directory.resolve())
    assert info["config_sha256"] == hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    assert report["environment"]["transformers"] and report["environment"]["peft"]
    # the 2023 layouts lack the image token (added in 4.45); the shipped base, saved by 5.24, has it (4)
    assert info["image_token_index"] == (4 if layout == "shipped" else None)
    assert info["weights"]["format"] == ("bin" if layout == "bin-sharded" else "safetensors")
    assert info["weights"]["sharded"] == layout.endswith("sharded")


@pytest.mark.regression
@pytest.mark.parametrize("layout", LAYOUTS)
def test_counts_equal_verify_on_the_loaded_model(reports, layout):
    """Scope and counts come from the meta device; they must equal the scope report of the real weights."""
    directory, report = reports[layout]
    model = presets.load_model(directory)
    assert report["checkpoint"]["parameters"] == sum(p.numel() for p in model.parameters())
    spec = lora.LoraSpec(r=8, alpha=16, scope="qformer")
    real = lora.scope_report(lora.apply_lora(model, spec), spec)
    scope = report["items"]["lora-scope"]
    assert scope["ran_on"] == "meta" and scope["status"] == "fixed"
    q = scope["evidence"]["qformer"]
    assert (q["lora_tensors"], q["trainable_parameters"], q["total_parameters"]) == (
        real["lora_tensors"],
        real["trainable_parameters"],
        real["total_parameters"],
    )
    assert scope["evidence"]["outside_qformer"] == {} and scope["evidence"]["leak_refused"] is True


@pytest.mark.regression
@pytest.mark.parametrize("layout", LAYOUTS)
def test_values_run_on_the_cpu_and_fixes_hold(reports, layout):
    _, report = reports[layout]
    items = report["items"]
    assert report["all_fixes_hold"] and report["placement"]["values_on"] == "cpu"
    assert {name: item["ran_on"] for name, item in items.items()} == {
        "kwarg-conflict": "cpu",
        "lora-scope": "meta",
        "nan": "cpu",
        "checkpoints": "cpu",
        "memory": "not run",
    }
    # AdamW's eps=1e-8 is 0 in fp16 and lora_B starts at zero: step 0 finite, every later step NaN
    assert items["nan"]["evidence"]["fp16-pure"]["finite"] == [True, False, False, False]
    assert items["nan"]["evidence"]["fp32"]["finite"] == [True] * 4
    assert items["checkpoints"]["evidence"] | {"adapter_tensors": None} == {
        "checkpoints": ["epoch-0001", "epoch-0002"],
        "resume_bitwise_identical": True,
        "adapter_reload_bitwise_identical": True,
        "adapter_tensors": None,
    }
    assert items["memory"]["status"] == "skipped"
    check_against_release(
        "checkpoint_layouts",
        layout,
        {
            "native": {case: v["native"] for case, v in items["kwarg-conflict"]["evidence"]["cases"].items()},
            "statuses": {name: item["status"] for name, item in items.items()},
        },
    )


@pytest.mark.regression
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kwarg_conflict_status_follows_its_cases(reports, layout):
    """Status "reproduced" exactly where a wrapper case failed with a TypeError over inputs_embeds: the seed's
    "unexpected keyword argument" (transformers up to 4.51) or "got multiple values for keyword argument"
    (4.52-4.53). A config without an image token failing the native forward (ValueError, 4.55 on) is no conflict."""
    item = reports[layout][1]["items"]["kwarg-conflict"]
    native = {case: v["native"] for case, v in item["evidence"]["cases"].items()}
    typeerrors = sorted(
        case for case, n in native.items() if n.get("exception") == "TypeError" and "'inputs_embeds'" in n["message"]
    )
    assert item["evidence"]["kwarg_conflict_cases"] == typeerrors
    assert item["status"] == ("reproduced" if typeerrors else "not applicable")


def test_both_messages_of_the_conflict_are_recognised():
    """The native outcomes observed on 4.33-4.51, on 4.52-4.53 and on 4.55+ for a 2023 config
    (resources/expectations/checkpoint_layouts.json); only the first two are the conflict."""
    seed = "InstructBlipForConditionalGeneration.forward() got an unexpected keyword argument 'inputs_embeds'"
    later = "T5ForConditionalGeneration(\u2026) got multiple values for keyword argument 'inputs_embeds'"
    no_token = "config has no image_token_index (saved before transformers 4.45)"
    assert reproduce.is_kwarg_conflict({"status": "error", "exception": "TypeError", "message": seed})
    assert reproduce.is_kwarg_conflict({"status": "error", "exception": "TypeError", "message": later})
    assert not reproduce.is_kwarg_conflict({"status": "error", "exception": "ValueError", "message": no_token})
    assert not reproduce.is_kwarg_conflict({"status": "ok", "loss_finite": True})
