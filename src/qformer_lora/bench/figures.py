"""The bench report's figures, one question each, drawn from the report's JSON alone.

========================  =================================================================
figure (file suffix)      question
========================  =================================================================
``memory``                How much memory does each configuration need at each batch size,
                          and which batch fits a 24 / 40 / 80 GiB card? (measured peaks, the
                          fitted line a + b x batch, the budgets)
``throughput``            How fast does each configuration train at each batch size?
``seed-table``            Does the seed's "max batch on 24 GiB" table hold? (its figures
                          beside ours, and the batch measured under a real 24 GiB cap)
``options``               Which step option reaches the targets against the native forward?
                          (speed-up >= 2x, peak memory <= 0.5x)
========================  =================================================================

A figure is drawn only when the report has its data (a CPU run has no memory figure, a run
of one batch size no lines). A configuration keeps one colour and one marker in every
figure (plotting.styles: distinct up to 20 and 13), legends sit outside the axes, and the
words every label shares go to the title so the labels say what differs.
"""

from __future__ import annotations

import re

from .. import plotting
from .capacity import BUDGETS_GIB, GIB
from .measurement import ran
from .reporting import TARGETS

FIGURES = ("memory", "throughput", "seed-table", "options")  # in the report's order


def draw(report: dict) -> dict[str, bytes] | None:
    """PNG bytes per figure name (:data:`FIGURES`) the report has data for; None without matplotlib."""
    if plotting.new_figure(1, 1) is None:
        return None
    style = dict(zip((e["label"] for e in report["points"]), plotting.styles(len(report["points"]))))
    drawn = {
        "memory": memory_figure(report, style),
        "throughput": throughput_figure(report, style),
        "seed-table": seed_figure(report),
        "options": options_figure(report),
    }
    return {name: plotting.png_bytes(figure) for name, figure in drawn.items() if figure is not None}


def split_labels(labels: list[str]) -> tuple[str, list[str]]:
    """(the words every label shares, each label without them): "a x", "a y" -> ("a", ["x", "y"])."""
    words = [label.split() for label in labels]
    shared = [w for w in words[0] if all(w in other for other in words[1:])] if words else []
    return " ".join(shared), [" ".join(w for w in label if w not in shared) or "(all alike)" for label in words]


def _lines(report: dict, field: str) -> list[tuple[dict, list[dict]]]:
    """(entry, its measured results with ``field``) for entries measured at two or more batch sizes."""
    out = []
    for entry in report["points"]:
        ok = sorted((r for r in entry["results"] if ran(r) and r.get(field) is not None), key=lambda r: r["batch_size"])
        if len(ok) >= 2:
            out.append((entry, ok))
    return out


def _legend(figure, handles, labels, title: str) -> None:
    # outside the axes and their labels, to the right (constrained layout makes room): the data
    # needs the whole plot area
    figure.legend(handles, labels, title=title, loc="outside right upper", fontsize=8, title_fontsize=8)


def _note(figure, text: str) -> None:
    figure.text(0.0, -0.01, text, ha="left", va="top", fontsize=8, color="0.3", wrap=True)


def _left_out(report: dict, drawn: int) -> str:
    others = len(report["points"]) - drawn
    return f" {others} configuration(s) measured at one batch size only are in the options figure." if others else ""


def memory_figure(report: dict, style: dict[str, dict]):
    """Peak allocated memory against batch size: measured points, the fitted line and the card budgets."""
    series = _lines(report, "peak_allocated_gib")
    if not series:
        return None
    from matplotlib.lines import Line2D

    figure = plotting.new_figure(11, 5.5)
    axes = figure.subplots()
    shared, labels = split_labels([e["label"] for e, _ in series])
    x_max = max(r["batch_size"] for _, ok in series for r in ok) * 1.05
    handles = []
    for entry, ok in series:
        s = style[entry["label"]]
        # hollow markers: two configurations with the same peak (custom and native) both stay visible
        axes.plot(
            [r["batch_size"] for r in ok],
            [r["peak_allocated_gib"] for r in ok],
            linestyle="none",
            mfc="none",
            mew=1.5,
            **s,
        )
        if entry.get("memory_model"):
            a, b = entry["memory_model"]["allocated"]["a"] / GIB, entry["memory_model"]["allocated"]["b"] / GIB
            axes.plot([0, x_max], [a, a + b * x_max], color=s["color"], linestyle="--", linewidth=1.2)
        handles.append(Line2D([], [], linestyle="--", mfc="none", mew=1.5, **s))
    for budget in BUDGETS_GIB:
        axes.axhline(budget, color="0.25", linestyle=":", linewidth=1)
    budgets = axes.secondary_yaxis("right")  # the budgets named on the right edge, clear of the lines
    budgets.set_yticks(BUDGETS_GIB, [f"{b} GiB card" for b in BUDGETS_GIB], fontsize=8)
    axes.set(xlim=(0, x_max), ylim=(0, max(BUDGETS_GIB) * 1.08), xlabel="batch size (samples)")
    axes.set(ylabel="peak allocated memory (GiB)")
    axes.set_title(f"Peak memory against batch size, {report['device']['name']}" + (f"\n{shared}" if shared else ""))
    axes.grid(alpha=0.3)
    _legend(figure, handles, labels, "configuration (points: measured;\ndashed: fitted a + b x batch)")
    _note(
        figure,
        "Where a dashed line crosses a dotted budget is the largest batch that card fits (allocator memory; "
        "the CUDA context comes on top)." + _left_out(report, len(series)),
    )
    return figure


def throughput_figure(report: dict, style: dict[str, dict]):
    """Training samples/s against batch size, one line per configuration."""
    series = _lines(report, "samples_per_s")
    if not series:
        return None
    figure = plotting.new_figure(11, 5.5)
    axes = figure.subplots()
    shared, labels = split_labels([e["label"] for e, _ in series])
    for (entry, ok), label in zip(series, labels):
        axes.plot([r["batch_size"] for r in ok], [r["samples_per_s"] for r in ok], label=label, **style[entry["label"]])
    # log-log: batch sizes 1..64 and rates 2..300 spread evenly, and perfect scaling (same step
    # time at any batch) is a 45-degree line, so a flattening curve shows where the step saturates
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    sizes = sorted({r["batch_size"] for _, ok in series for r in ok})
    axes.set_xticks(sizes, [str(n) for n in sizes])
    rates = [r["samples_per_s"] for _, ok in series for r in ok]
    ticks = [
        t
        for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
        if min(rates) / 2 <= t <= max(rates) * 2
    ]
    axes.set_yticks(ticks, [f"{t:g}" for t in ticks])
    axes.yaxis.set_minor_formatter("")  # plain numbers, not powers of ten
    axes.set(xlabel="batch size (samples, log scale)", ylabel="training samples / s (log scale)")
    axes.set_title(
        f"Training throughput against batch size, {report['device']['name']}" + (f"\n{shared}" if shared else "")
    )
    axes.grid(alpha=0.3)
    handles, names = axes.get_legend_handles_labels()
    _legend(figure, handles, names, "configuration")
    _note(
        figure,
        f"Median of {report['settings']['measured_steps']} measured steps per point." + _left_out(report, len(series)),
    )
    return figure


def _seed_range(text: str) -> tuple[int, int]:
    """The seed's figure as (low, high): "24" -> (24, 24), "16-20 (expected)" -> (16, 20)."""
    low, high = re.match(r"(\d+)(?:\s*-\s*(\d+))?", text).groups()
    return int(low), int(high or low)


def _capped(report: dict) -> dict[tuple, dict]:
    """The prediction checks under a 24 GiB cap that ran, by (preset, scope, precision)."""
    configs = {e["label"]: e["config"] for e in report["points"]}
    return {
        (c["preset"], c["scope"], c["precision"]): v
        for v in report.get("validation", [])
        if v.get("status") == "done" and v.get("budget_gib") == 24 and (c := configs.get(v["label"]))
    }


SEED_BARS = (  # (legend, colour, the seed table's column: None for the seed's own figure)
    ("seed's table", "0.6", None),
    ("ours, fp32 weights (predicted)", "#1f77b4", "fp32"),
    ("ours, bf16 weights (predicted)", "#ff7f0e", "bf16"),
)


def _seed_row(axes, i: int, row: dict, capped: dict, height: float) -> None:
    """Row ``i`` of the seed figure: the seed's bar (a range hatched), ours, the capped measurement."""
    low, high = _seed_range(row["seed"])
    for j, (name, colour, precision) in enumerate(SEED_BARS):
        y, value = i + (j - 1) * height, low if precision is None else row[precision]
        if value is None:
            continue
        axes.barh(y, value, height, color=colour, label=name if i == 0 else None)
        if precision is None and high > low:  # a range: the rest of it hatched
            axes.barh(y, high - low, height, left=low, color="white", edgecolor=colour, hatch="///")
        text = row["seed"] if precision is None else str(value)
        axes.text(max(value, high) + 0.6 if precision is None else value + 0.6, y, text, va="center", fontsize=8)
        check = capped.get((row["preset"], row["scope"], precision))
        if check is not None:
            label = f"measured under a real {check['budget_gib']:g} GiB cap ({check['measured']})"
            axes.plot(check["measured"], y, marker="D", color="black", linestyle="none", label=label)


def seed_figure(report: dict):
    """The seed's max batch on 24 GiB beside ours (fp32 and bf16 weights) and the capped measurement."""
    rows = [r for r in report["seed_table"] if r["fp32"] is not None or r["bf16"] is not None]
    if not rows:
        return None
    figure = plotting.new_figure(11, 1.2 + 1.1 * len(rows))
    axes = figure.subplots()
    capped = _capped(report)
    for i, row in enumerate(rows):
        _seed_row(axes, i, row, capped, height=0.26)
    axes.set_yticks(range(len(rows)), [r["row"] for r in rows])
    axes.invert_yaxis()
    axes.set(xlabel="largest batch that fits 24 GiB (samples)", xlim=(0, None))
    axes.set_title("Max batch on a 24 GiB card: the seed's table against ours")
    axes.grid(axis="x", alpha=0.3)
    handles, names = axes.get_legend_handles_labels()
    order = sorted(range(len(names)), key=lambda k: names[k].startswith("measured"))  # the bars first
    _legend(figure, [handles[k] for k in order], [names[k] for k in order], "")
    _note(
        figure,
        "Predicted: the largest batch under 24 GiB by the linear memory fit on this run's peaks (allocator "
        f"budget). Sequence: prompt {report['sequence']['prompt_len']}, answer {report['sequence']['answer_len']} "
        "tokens.",
    )
    return figure


def _option_labels(rows: list[dict]) -> tuple[str, list[str]]:
    shared, labels = split_labels([o["label"] for o in rows])
    return shared, [label + (" (fallback)" if o.get("not_used") else "") for o, label in zip(rows, labels)]


def _ratio_panel(axes, rows: list[dict], field: str, target: float, better: str, title: str) -> None:
    """One panel of bars: ``field`` of each row against native (1x, solid line) and the target (dashed)."""
    for y, row in enumerate(rows):
        value = row.get(field)
        if row["error"] or value is None:  # a failed row says why where its bar would be
            text, colour = (
                ("failed: " + row["error"].split(":")[0], "#d62728") if row["error"] else ("not measured", "0.4")
            )
            axes.text(0.02, y, text, va="center", fontsize=8, color=colour, transform=axes.get_yaxis_transform())
            continue
        meets = value >= target if better == "higher" else value <= target
        axes.barh(y, value, 0.6, color="#2ca02c" if meets else "#8da0cb")
        # on white: a value next to the target line stays readable
        axes.text(
            value,
            y,
            f" {value:.2f}x",
            va="center",
            fontsize=8,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5},
        )
    axes.axvline(1.0, color="0.3", linewidth=1)
    axes.axvline(target, color="#d62728", linestyle="--", linewidth=1.5)
    sign = "\u2265" if better == "higher" else "\u2264"
    axes.set_title(f"{title}\ntarget {sign} {target:g}x (red dashed), native = 1x", fontsize=10)
    axes.grid(axis="x", alpha=0.3)


def options_figure(report: dict):
    """Each step option's samples/s and peak memory as ratios to the native forward, with the targets."""
    rows = report.get("options") or []
    if not rows:
        return None
    figure = plotting.new_figure(11, 1.8 + 0.42 * len(rows))
    speed, memory = figure.subplots(1, 2, sharey=True)
    shared, labels = _option_labels(rows)
    _ratio_panel(speed, rows, "speedup", TARGETS["speedup"], "higher", "speed: samples/s \u00f7 native's")
    _ratio_panel(memory, rows, "memory_ratio", TARGETS["memory_ratio"], "lower", "memory: peak \u00f7 native's")
    speed.set_yticks(range(len(rows)), labels)
    speed.set_ylim(len(rows) - 0.5, -0.5)  # first row on top
    speed.set_xlim(0, max([TARGETS["speedup"]] + [r.get("speedup") or 0 for r in rows]) * 1.2)
    memory.set_xlim(0, max([1.0] + [r.get("memory_ratio") or 0 for r in rows]) * 1.2)
    batch = ", ".join(sorted({str(r["batch_size"]) for r in rows}))
    figure.suptitle(f"Step options against the native forward at batch {batch}, {report['device']['name']}\n{shared}")
    _note(
        figure,
        "Green: meets that panel's target. Fallback: the option could not run here; the row measured what ran instead.",
    )
    return figure
