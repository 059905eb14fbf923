"""bench/capacity.py: the linear memory model, the max-batch prediction and the limit search.

Pure arithmetic, so checked exactly against generated lines (hypothesis); the GPU run
checks the same prediction against a real memory cap (tests/gpu/test_gpu_bench.py).
"""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qformer_lora.bench import capacity


def test_fit_linear_recovers_exact_coefficients():
    a, b = 7_516_192_768, 201_326_592
    assert capacity.fit_linear([1, 4, 8, 16], [a + b * n for n in (1, 4, 8, 16)]) == (a, b)
    assert capacity.fit_linear([2, 3], [10.5, 12.0]) == (7.5, 1.5)
    with pytest.raises(ValueError, match="2 distinct batch sizes"):
        capacity.fit_linear([4, 4], [1, 2])


@given(a=st.floats(0, 2e11), b=st.floats(1, 2e10), budget=st.integers(0, 2**38))
def test_predict_max_batch_is_the_largest_batch_within_budget(a, b, budget):
    n = capacity.predict_max_batch(a, b, budget)
    a, b = Fraction(a), Fraction(b)
    assert n >= 0
    assert n == 0 or a + b * n <= budget, f"batch {n} needs {float(a + b * n)} > {budget}"
    assert a + b * (n + 1) > budget, f"batch {n + 1} would also fit"


@given(
    a=st.integers(0, 2**36),
    b=st.integers(1, 2**32),
    sizes=st.sets(st.integers(1, 512), min_size=2, max_size=6),
    budget=st.integers(0, 2**38),
)
def test_fit_then_predict_matches_the_true_line(a, b, sizes, budget):
    sizes = sorted(sizes)
    fitted = capacity.fit_linear(sizes, [a + b * n for n in sizes])
    assert fitted == (a, b)
    assert capacity.predict_max_batch(*fitted, budget) == max(0, (budget - a) // b)


def test_predict_max_batch_without_growth_is_none():
    assert capacity.predict_max_batch(1e9, 0.0, 24 * capacity.GIB) is None


@given(limit=st.integers(0, 300), start=st.integers(1, 300), max_probes=st.integers(1, 30))
def test_find_limit_never_overshoots_and_is_exact_with_enough_probes(limit, start, max_probes):
    found, exact, probes = capacity.find_limit(lambda n: n <= limit, start, max_probes)
    assert found <= limit and len(probes) <= max_probes
    assert all(fits == (n <= limit) for n, fits in probes.items())
    if exact:
        assert found == limit
    enough = capacity.find_limit(lambda n: n <= limit, start, 40)
    assert enough[:2] == (limit, True), enough
