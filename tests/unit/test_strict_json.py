"""Strict JSON everywhere (issue 21): every committed and freshly written JSON file parses with a
strict parser, one that rejects the bare NaN / Infinity tokens as JavaScript's JSON.parse does.

Before the fix REPRODUCTION.json and reports/gpu/nan-*.json held bare ``NaN``; Python read them,
a CI dashboard did not. The convention (qformer_lora.jsonio): a non-finite float is written as
the string "NaN", "Infinity" or "-Infinity".
"""

from __future__ import annotations

import ast
import copy
import json
import math
from pathlib import Path

import pytest
import torch

from qformer_lora import checkpoint, jsonio
from qformer_lora.bench import report_files
from qformer_lora.repro import reproduce
from qformer_lora.training import metrics_log, run_dir

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "qformer_lora"
COMMITTED = sorted(
    path.relative_to(ROOT)
    for folder in (ROOT / "reports", PACKAGE / "resources", ROOT / "fixtures")
    for pattern in ("*.json", "*.jsonl")
    for path in folder.rglob(pattern)
)
NAN, INF = float("nan"), float("inf")


def parse_strict(path: Path) -> list:
    """Every JSON document of ``path`` (one per line for .jsonl), parsed strictly."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [jsonio.loads_strict(line) for line in text.splitlines() if line.strip()]
    return [jsonio.loads_strict(text)]


def test_the_strict_parser_rejects_what_pythons_json_writes_for_nan():
    for value in (NAN, INF, -INF):
        with pytest.raises(ValueError, match="bare"):
            jsonio.loads_strict(json.dumps({"loss": value}))  # NaN, Infinity, -Infinity
    assert len(COMMITTED) > 30 and Path("reports/REPRODUCTION.json") in COMMITTED  # the walk finds the reports


@pytest.mark.parametrize("path", COMMITTED, ids=str)
def test_committed_json_is_strict(path):
    assert parse_strict(ROOT / path)


def test_dumps_writes_non_finite_numbers_as_strings_and_number_reads_them_back():
    value = {"loss": NAN, "losses": [1.5, INF, -INF], "nested": ({"x": NAN},), "n": 3, "ok": True, "none": None}
    text = jsonio.dumps(value)
    assert jsonio.loads_strict(text) == {
        "loss": "NaN",
        "losses": [1.5, "Infinity", "-Infinity"],
        "nested": [{"x": "NaN"}],
        "n": 3,
        "ok": True,
        "none": None,
    }
    assert math.isnan(jsonio.number("NaN")) and jsonio.number("-Infinity") == -INF and jsonio.number(2) == 2.0
    assert jsonio.number(None) is None
    with pytest.raises(ValueError, match="'red' is not a number"):
        jsonio.number("red")
    # default= results are walked too (a tensor's float through default)
    assert jsonio.loads_strict(jsonio.dumps([torch.tensor(NAN)], default=float)) == ["NaN"]
    with pytest.raises(TypeError):  # an unknown type without a default fails as json.dumps does
        jsonio.dumps([object()])
    revived = jsonio.revive({"scale": "Infinity", "lrs": ["NaN", 0.1], "name": 1})
    assert revived["scale"] == INF and math.isnan(revived["lrs"][0]) and revived["lrs"][1] == 0.1


def test_metrics_jsonl_is_strict_and_keeps_the_record(tmp_path):
    log = metrics_log.MetricsLog(tmp_path)
    log.record({"type": "step", "step": 1, "loss": NAN, "grad_norm": INF, "lr": 0.1})
    [record] = parse_strict(tmp_path / run_dir.LOG_FILE)
    assert record == {"type": "step", "step": 1, "loss": "NaN", "grad_norm": "Infinity", "lr": 0.1}
    run_dir.truncate_log(tmp_path / run_dir.LOG_FILE, 1)  # the resume path still reads it
    assert parse_strict(tmp_path / run_dir.LOG_FILE) == [record]


class _Adapter:
    """Stands in for a PeftModel: checkpoint.save only asks it to write its adapter folder."""

    def save_pretrained(self, directory: str, safe_serialization: bool = True):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "adapter_config.json").write_text("{}")


def test_checkpoint_state_is_strict_and_loads_its_numbers_back(tmp_path):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scheduler.base_lrs = [INF]  # a non-finite number in the numeric part, read back as a float
    saved = checkpoint.save(
        tmp_path,
        1,
        model=_Adapter(),
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=None,
        global_step=3,
        config={"output_dir": "NaN"},  # free text that happens to read "NaN" stays text
        metrics={"val_loss": NAN},
    )
    [state] = parse_strict(saved / checkpoint.STATE_FILE)
    assert state["metrics"] == {"val_loss": "NaN"} and state["scheduler"]["base_lrs"] == ["Infinity"]
    loaded, _ = checkpoint.load_state(saved)
    assert loaded["scheduler"]["base_lrs"] == [INF] and loaded["config"]["output_dir"] == "NaN"


def test_bench_report_json_is_strict(tmp_path):
    report = json.loads((ROOT / "reports/gpu/combo/nvidia-h200-2026-11-28.json").read_text())
    broken = copy.deepcopy(report)
    broken["points"][0]["results"][0]["loss"] = NAN  # the loss a diverged configuration records
    paths = report_files.write_reports(broken, tmp_path, plot=False)
    [written] = parse_strict(paths["json"])
    assert written["points"][0]["results"][0]["loss"] == "NaN"
    assert written["points"][1:] == report["points"][1:]


def test_reproduction_report_is_strict(tmp_path):
    report = {
        "date": "2026-11-28",
        "environment": {"python": "3.11", "torch": "t", "transformers": "x", "peft": "p", "device": "cpu"},
        "items": {"nan": {"status": "reproduced", "fix_holds": True, "why": "w", "evidence": {"losses": [1.0, NAN]}}},
        "all_fixes_hold": True,
    }
    md, js = reproduce.write(report, tmp_path)
    assert parse_strict(js)[0]["items"]["nan"]["evidence"]["losses"] == [1.0, "NaN"]
    assert '[\n    1.0,\n    "NaN"\n  ]' in md.read_text()  # the Markdown's evidence block: the same spelling


# json.dumps / json.dump outside jsonio, with why each is allowed
NOT_WRITERS = {
    "training/feature_cache.py": "hashes settings into a cache key; the text is never written as JSON",
    "inference/model_card.py": "quotes a question as a string literal in the card's Python snippet",
}


def test_every_json_writer_in_the_package_goes_through_jsonio():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = str(path.relative_to(PACKAGE))
        if name == "jsonio.py" or name in NOT_WRITERS:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("dump", "dumps")
                and isinstance(node.value, ast.Name)
                and node.value.id == "json"
            ):
                found.append(f"{name}:{node.lineno}")
    assert found == [], f"write JSON through qformer_lora.jsonio (strict), not json.dump(s): {found}"
