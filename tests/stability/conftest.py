"""Stability tests (each file sets ``pytestmark = pytest.mark.stability``; helpers.py builds the models).

One intra-op thread while these tests run: on a small machine shared with other jobs,
torch's OpenMP workers spin-wait for each other and a tiny-model step takes ~100x longer
with 2 threads than with 1 (measured: 5.7 s vs 0.04 s per step under load).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
