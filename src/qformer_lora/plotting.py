"""What every figure of the package shares: matplotlib as an optional extra, one style per series, PNG bytes.

matplotlib comes with the ``bench`` extra (``pip install 'qformer-lora[bench]'``); without it
:func:`new_figure` returns None and the caller says so in one line (:func:`missing`) and
skips the file, rather than failing a run. Figures are drawn on ``matplotlib.figure.Figure``
directly (no pyplot: no global state, no display backend).

:func:`styles` gives each series its own colour *and* marker: matplotlib's default cycle has
10 colours, so an 11th configuration repeated the first one's colour (the GPU sweep has 14).
"""

from __future__ import annotations

import io

# tab10's ten hues, then tab20's lighter tones of the same: 20 colours before one repeats
COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)  # fmt: skip
# 13 markers: with 20 colours, (colour, marker) pairs repeat only after 260 series
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "*", "d")


def styles(count: int) -> list[dict]:
    """``count`` line styles (``color``, ``marker``), each pair different; colours are distinct up
    to 20 series and markers up to 13, so two series never look alike."""
    return [{"color": COLOURS[i % len(COLOURS)], "marker": MARKERS[i % len(MARKERS)]} for i in range(count)]


def missing(what: str) -> str:
    """The one line printed when matplotlib is absent."""
    return f"matplotlib is not installed: skipped {what} (pip install 'qformer-lora[bench]')"


def new_figure(width: float, height: float):
    """A ``matplotlib.figure.Figure`` of ``width`` x ``height`` inches with constrained layout
    (titles, labels and outside legends never overlap), or None without matplotlib."""
    try:
        from matplotlib.figure import Figure  # optional: the bench extra
    except ImportError:
        return None
    return Figure(figsize=(width, height), layout="constrained")


def png_bytes(figure, dpi: int = 110) -> bytes:
    """``figure`` encoded as PNG (bbox "tight": a legend placed outside the axes stays in the picture)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()
