"""Peak memory against batch size: a linear fit, and the largest batch that fits a budget.

Pure arithmetic on measured peaks (bench/measurement.py measures them): ``fit_linear`` fits
``peak = a + b * batch``, ``predict_max_batch`` inverts it for a budget, ``memory_model``
does both for a sweep's results, ``find_limit`` searches the real limit with a probe
(bench_sweep.validate_prediction supplies one that runs a step under a memory cap).
``quantization_saving`` and ``shift_intercept`` carry a fit measured with an unquantized
language model over to a quantized one (quantization.py holds the bytes per weight).
"""

from __future__ import annotations

import math
from fractions import Fraction

from .. import quantization

GIB = 1024**3
BUDGETS_GIB = (24, 40, 80)


def fit_linear(batch_sizes, peaks) -> tuple[float, float]:
    """Least-squares ``peak = a + b * batch``; exact (rational) arithmetic, so exact data gives exact a, b."""
    xs, ys = [Fraction(x) for x in batch_sizes], [Fraction(y) for y in peaks]
    if len(xs) != len(ys) or len(set(xs)) < 2:
        raise ValueError(f"fit_linear needs >= 2 distinct batch sizes with one peak each, got {batch_sizes}, {peaks}")
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return float(mean_y - b * mean_x), float(b)


def predict_max_batch(a: float, b: float, budget_bytes: float) -> int | None:
    """The largest batch n >= 0 with a + b*n <= budget (exact arithmetic); None if memory does not grow."""
    if b <= 0:
        return None
    return max(0, math.floor((Fraction(budget_bytes) - Fraction(a)) / Fraction(b)))


def quantization_saving(shapes, mode: str, dtype_bytes: int) -> int:
    """Bytes the quantized weights of ``shapes`` ((out_features, in_features) per linear layer) take less
    than the same weights in a ``dtype_bytes``-byte dtype (quantization.weight_bytes: int8 1 B per weight +
    a 4 B scale per row, nf4 0.5 B + a 4 B absmax per 64 weights); 0 for mode "none"."""
    return sum(
        quantization.weight_bytes(o, i, "none", dtype_bytes) - quantization.weight_bytes(o, i, mode, dtype_bytes)
        for o, i in shapes
    )


def shift_intercept(a: float, saving: int) -> float:
    """The intercept of ``peak = a + b * batch`` once the weights take ``saving`` bytes less.

    The frozen weights are resident before the first batch, so they sit in ``a``; the slope ``b``
    (activations, their gradients, per-sample workspaces) is assumed unchanged: bitsandbytes
    dequantizes one layer's weight at a time, a transient of the size of the largest layer."""
    return a - saving


def budgets(total_memory_bytes: int | None) -> dict[str, int]:
    named = {f"{g} GiB": g * GIB for g in BUDGETS_GIB}
    if total_memory_bytes:
        named["this card"] = total_memory_bytes
    return named


def memory_model(results: list[dict], total_memory_bytes: int | None = None) -> dict | None:
    """Fits over allocated and reserved peaks, and the max batch each budget allows (allocated fit)."""
    ok = [r for r in results if "error" not in r and r.get("peak_allocated_bytes") is not None]
    if len({r["batch_size"] for r in ok}) < 2:
        return None
    sizes = [r["batch_size"] for r in ok]
    fits = {
        kind: dict(zip("ab", fit_linear(sizes, [r[f"peak_{kind}_bytes"] for r in ok])))
        for kind in ("allocated", "reserved")
    }
    a, b = fits["allocated"]["a"], fits["allocated"]["b"]
    return fits | {
        "max_batch": {name: predict_max_batch(a, b, budget) for name, budget in budgets(total_memory_bytes).items()}
    }


def find_limit(fits, start: int, max_probes: int = 8) -> tuple[int, bool, dict[int, bool]]:
    """(largest batch seen to fit, whether the next one was seen to fail, probes) starting at ``start``.

    Walks up in doubling steps while batches fit, down in doubling steps while they do
    not, then bisects; 0 means batch 1 did not fit.
    """
    probes: dict[int, bool] = {}
    calls = 0  # counted separately from probes so that a repeated batch cannot loop forever

    def probe(n: int) -> bool:
        nonlocal calls
        calls += 1
        probes[n] = fits(n)
        return probes[n]

    start = max(1, start)
    lo, hi, step = (start, None, 1) if probe(start) else (0, start, 1)
    while hi is None and calls < max_probes:  # upward
        if probe(lo + step):
            lo, step = lo + step, step * 2
        else:
            hi = lo + step
    while lo == 0 and hi > 1 and calls < max_probes:  # downward
        n = max(1, hi - step)
        if probe(n):
            lo = n
        else:
            hi, step = n, step * 2
    while hi is not None and hi - lo > 1 and calls < max_probes:  # bisect
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if probe(mid) else (lo, mid)
    return lo, hi == lo + 1, probes
