"""The bench report's figures (issue 21, item 1), drawn from the committed H200 report's JSON.

Before: one PNG with 14 configurations on matplotlib's 10 colours (two blues, two oranges...),
the legend over the data, the batch-64 option rows as unlabelled dots, and neither the seed's
table nor the 2x / 0.5x targets drawn. Each check below reads the drawn matplotlib objects.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qformer_lora import plotting
from qformer_lora.bench import figures, report_files

pytest.importorskip("matplotlib")
from matplotlib.colors import to_hex  # noqa: E402

REPORT = json.loads((Path(__file__).resolve().parents[2] / "reports/gpu/nvidia-h200-2026-11-28.json").read_text())
STYLE = dict(zip((e["label"] for e in REPORT["points"]), plotting.styles(len(REPORT["points"]))))


def boxes_overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_every_series_looks_different():
    # 14 configurations: pairs distinct always, colours distinct up to 20, markers up to 13
    many = plotting.styles(40)
    assert len({(s["color"], s["marker"]) for s in many}) == 40
    assert len({s["color"] for s in many[:20]}) == 20 and len({s["marker"] for s in many[:13]}) == 13
    assert len(REPORT["points"]) == 14 and len({s["color"] for s in STYLE.values()}) == 14


def test_split_labels_moves_the_shared_words_to_the_title():
    assert figures.split_labels(["m qformer bf16 native", "m qformer bf16 custom lm-ckpt"]) == (
        "m qformer bf16",
        ["native", "custom lm-ckpt"],
    )
    assert figures.split_labels(["a", "a"]) == ("a", ["(all alike)", "(all alike)"])


def test_memory_figure_draws_points_fits_and_budgets_with_the_legend_outside():
    figure = figures.memory_figure(REPORT, STYLE)
    [axes] = [a for a in figure.axes if a.get_xlabel()]
    fitted = [e for e in REPORT["points"] if e["memory_model"]]
    multi = [e for e in REPORT["points"] if len(e["results"]) >= 2]
    assert len(fitted) == len(multi) == 9  # the 5 single-batch option rows go to the options figure
    dashed = [line for line in axes.lines if line.get_linestyle() == "--"]
    budgets = sorted(line.get_ydata()[0] for line in axes.lines if line.get_linestyle() == ":")
    assert len(dashed) == 9 and budgets == [24, 40, 80]
    # a fitted line is a + b x batch: at batch 0 it starts at a (InstructBLIP bf16 custom: 7.33 GiB)
    first = fitted[0]["memory_model"]["allocated"]["a"] / 2**30
    assert (
        dashed[0].get_ydata()[0] == pytest.approx(first) and dashed[0].get_color() == STYLE[fitted[0]["label"]]["color"]
    )
    [legend] = figure.legends
    assert len(legend.get_texts()) == 9
    figure.draw_without_rendering()
    assert not boxes_overlap(legend.get_window_extent(), axes.get_window_extent())


def test_throughput_figure_has_one_line_per_multi_batch_configuration():
    figure = figures.throughput_figure(REPORT, STYLE)
    [axes] = [a for a in figure.axes if a.get_xlabel()]
    assert len(axes.lines) == 9 and axes.get_xscale() == axes.get_yscale() == "log"
    styles = {(line.get_color(), line.get_marker()) for line in axes.lines}
    assert len(styles) == 9  # no two configurations alike
    figure.draw_without_rendering()
    assert not boxes_overlap(figure.legends[0].get_window_extent(), axes.get_window_extent())


def test_seed_figure_puts_the_seed_beside_ours_and_the_capped_measurement():
    figure = figures.seed_figure(REPORT)
    [axes] = figure.axes
    widths = sorted(round(p.get_width()) for p in axes.patches)
    # seed 24, 10, 16 (+4 hatched: 16-20), ours fp32 21, 13, 19 and bf16 52, 30, 49
    assert widths == sorted([24, 10, 16, 4, 21, 13, 19, 52, 30, 49])
    [diamond] = [line for line in axes.lines if line.get_marker() == "D"]
    assert diamond.get_xdata()[0] == 48  # measured under the 24 GiB cap; predicted 49


def test_options_figure_draws_both_targets_and_every_row():
    figure = figures.options_figure(REPORT)
    speed, memory = figure.axes
    targets = {
        ax.get_title().split("\n")[0]: sorted(line.get_xdata()[0] for line in ax.lines) for ax in (speed, memory)
    }
    assert targets == {"speed: samples/s \u00f7 native's": [1.0, 2.0], "memory: peak \u00f7 native's": [0.5, 1.0]}
    assert [t.get_text() for t in speed.get_yticklabels()][:3] == ["native", "custom", "custom lm-ckpt"]
    assert len(speed.patches) == len(memory.patches) == len(REPORT["options"]) == 8
    green = [p.get_width() for p in memory.patches if to_hex(p.get_facecolor()) == "#2ca02c"]
    assert sorted(round(w, 2) for w in green) == [0.43, 0.44]  # the two rows with LM checkpointing meet 0.5x


def test_write_reports_writes_one_png_per_figure_and_links_them(tmp_path):
    stem = report_files.report_stem(REPORT)
    (tmp_path / f"{stem}.png").write_bytes(b"the single PNG of earlier versions")
    paths = report_files.write_reports(json.loads(json.dumps(REPORT)), tmp_path)
    assert list(paths["figures"]) == list(figures.FIGURES)
    assert not (tmp_path / f"{stem}.png").exists(), "a stale figure was left beside the new ones"
    text = paths["md"].read_text()
    for name, path in paths["figures"].items():
        assert path.read_bytes()[:4] == b"\x89PNG" and f"![{name}]({path.name})" in text
    assert text.index("![memory]") > text.index("## Memory model") > text.index("![throughput]")
