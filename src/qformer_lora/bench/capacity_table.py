"""The predicted max batch per card size, precision and language-model quantization, as Markdown.

From a committed GPU sweep (``qformer-lora bench``'s JSON): each point with a memory model
(``peak = a + b * batch``, measured with an unquantized language model) gives the largest batch
for 24, 40 and 80 GiB, then again with the intercept lowered by what an int8 or nf4 language
model saves (capacity.quantization_saving over the layers quantization.py quantizes, counted on
the preset's meta-device model: no weights are built). The slope is kept: a prediction, which a
GPU run with ``--quantize-language-model`` confirms or corrects.

    python -m qformer_lora.bench.capacity_table reports/gpu/nvidia-h200-2026-11-28.json reports/capacity.md
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

from .. import precision, presets, quantization, writes
from . import capacity

QUANTIZED = ("int8", "nf4")


def linear_shapes(model, component: str, quantizable_only: bool) -> list[tuple[int, int]]:
    """(out_features, in_features) of ``component``'s linear layers: those quantization.py quantizes
    (``quantizable_only``) or all of them."""
    module = getattr(model, component)
    if quantizable_only:
        return list(quantization.quantizable_linears(module).values())
    return [(m.out_features, m.in_features) for m in module.modules() if type(m) is torch.nn.Linear]


@functools.cache  # building a full-size model on meta takes seconds: once per preset
def preset_shapes(preset: str) -> dict[str, list[tuple[int, int]]]:
    """The quantizable language-model layers and all vision-encoder linear layers of ``preset`` (meta device)."""
    model = presets.build_model(preset, device="meta", seed=None)
    return {
        "language_model": linear_shapes(model, "language_model", True),
        "vision_model": linear_shapes(model, "vision_model", False),
    }


def point_rows(point: dict, shapes: dict) -> list[dict]:
    """One row per quantization ("none", "int8", "nf4") for a sweep point with a memory model."""
    config, fit = point["config"], point["memory_model"]["allocated"]
    dtype_bytes = precision.get(config["precision"]).weights.itemsize
    rows = []
    for mode in quantization.MODES:
        saving = capacity.quantization_saving(shapes["language_model"], mode, dtype_bytes)
        a = capacity.shift_intercept(fit["a"], saving)
        rows.append(
            {
                "label": point["label"],
                "precision": config["precision"],
                "quantization": mode,
                "saving_bytes": saving,
                "max_batch": {
                    g: capacity.predict_max_batch(a, fit["b"], g * capacity.GIB) for g in capacity.BUDGETS_GIB
                },
            }
        )
    return rows


def table_rows(report: dict) -> list[dict]:
    """Rows for every point of ``report`` that has a memory model, in the report's order."""
    rows = []
    for point in report["points"]:
        if point.get("memory_model"):
            rows += point_rows(point, preset_shapes(point["config"]["preset"]))
    return rows


def vision_note(report: dict) -> str:
    """Whether quantizing the vision encoder too would pay: its nf4 saving, in samples at the sweep's
    smallest and largest slope of the first point's preset and precision."""
    first = next(p for p in report["points"] if p.get("memory_model"))
    preset, name = first["config"]["preset"], first["config"]["precision"]
    shapes = preset_shapes(preset)["vision_model"]
    saving = capacity.quantization_saving(shapes, "nf4", precision.get(name).weights.itemsize)
    slopes = sorted(
        (p["memory_model"]["allocated"]["b"], p["label"])
        for p in report["points"]
        if p.get("memory_model") and (p["config"]["preset"], p["config"]["precision"]) == (preset, name)
    )
    per_slope = "; ".join(f"{int(saving // b)} samples for `{label}` ({b / 2**20:.0f} MiB each)" for b, label in slopes)
    return (
        f"Vision encoder too? Its linear layers ({sum(o * i for o, i in shapes) / 1e6:.0f} M weights) in nf4 would "
        f"save {saving / capacity.GIB:.2f} GiB more in {name}: {per_slope}. Not done: that is little next to the "
        f"activations, and the frozen encoder's features can be cached instead (--feature-cache), which removes "
        f"its activations as well."
    )


def markdown(report: dict, source: str) -> str:
    rows = table_rows(report)
    budgets = " | ".join(f"{g} GiB" for g in capacity.BUDGETS_GIB)
    lines = [
        "# Predicted max batch per card, precision and language-model quantization",
        "",
        f"From the memory models of `{source}` ({report['device']['name']}): `peak = a + b * batch` fitted to "
        f"the allocated peaks of each configuration with its language model unquantized; for int8 and nf4 the "
        f"intercept `a` is lowered by the bytes the quantized layers save (int8: 1 B per weight + a 4 B scale per "
        f"row; nf4: 0.5 B + a 4 B absmax per 64 weights; lm_head and T5's wo stay unquantized), the slope `b` is "
        f"kept. Predictions, not measurements: a GPU run with --quantize-language-model confirms them.",
        "",
        "Regenerate: `python -m qformer_lora.bench.capacity_table " + source + " reports/capacity.md`",
        "",
        f"| configuration | precision | LM | LM weights saved (GiB) | {budgets} |",
        "|---|---|---|---:|" + "---:|" * len(capacity.BUDGETS_GIB),
    ]
    for row in rows:
        batches = " | ".join(str(row["max_batch"][g]) for g in capacity.BUDGETS_GIB)
        lines.append(
            f"| {row['label']} | {row['precision']} | {row['quantization']} | "
            f"{row['saving_bytes'] / capacity.GIB:.2f} | {batches} |"
        )
    return "\n".join(lines + ["", vision_note(report), ""])


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m qformer_lora.bench.capacity_table", description=__doc__)
    parser.add_argument("report", type=Path, help="a <gpu>-<date>.json written by `qformer-lora bench`")
    parser.add_argument("out", type=Path, help="the Markdown file to write")
    args = parser.parse_args(argv)
    try:
        report = json.loads(args.report.read_text(encoding="utf-8"))
        text = markdown(report, os.path.relpath(args.report))
    except (OSError, ValueError, KeyError, StopIteration) as err:
        parser.exit(2, f"{args.report}: not a bench report with memory models ({type(err).__name__}: {err})\n")
    writes.atomic(args.out, text, "the capacity table")
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
