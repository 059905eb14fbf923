"""The CUDA device as a benchmark sees it: out-of-memory errors, peaks, caps and card facts.

Split from bench/measurement.py, which measures steps: ``is_oom`` (training/auto_batch.py's, which
--batch-size auto uses too) tells an allocation failure from any other error, ``free_memory``
empties the allocator's cache between measurements, ``memory_stats`` reads the peaks since the
last reset, ``memory_cap`` limits the allocator to a budget (how a 24 GiB card is simulated on a
larger one), ``device_info`` describes the card for the report. On a CPU each is a no-op or
reports None.
"""

from __future__ import annotations

import contextlib
import gc
import shutil
import subprocess

import torch

from ..training.auto_batch import is_oom  # noqa: F401 - re-exported: sweep and measurement import it from here
from .capacity import GIB


def free_memory(collect: bool = True) -> None:
    """Return cached CUDA blocks so the next measurement starts from an empty cache.

    ``collect`` also runs the garbage collector (a quarter second per call in a big
    process), needed only where reference cycles may hold tensors: after an OOM
    (exception tracebacks) and when a model is dropped.
    """
    if collect:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def memory_stats(device: torch.device) -> dict:
    if device.type != "cuda":
        return {
            "peak_allocated_bytes": None,
            "peak_reserved_bytes": None,
            "peak_allocated_gib": None,
            "peak_reserved_gib": None,
        }
    allocated, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    return {
        "peak_allocated_bytes": allocated,
        "peak_reserved_bytes": reserved,
        "peak_allocated_gib": allocated / GIB,
        "peak_reserved_gib": reserved / GIB,
    }


def device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"type": device.type, "name": device.type, "total_memory_bytes": None, "driver_version": None}
    props = torch.cuda.get_device_properties(device)
    free, total = torch.cuda.mem_get_info(device)
    return {
        "type": "cuda",
        "name": props.name,
        "total_memory_bytes": props.total_memory,
        "capability": f"{props.major}.{props.minor}",
        "cuda_runtime": torch.version.cuda,
        "driver_version": _driver_version(),
        # CUDA context and libraries: used on a real card but outside any allocator budget
        "outside_allocator_bytes": (total - free) - torch.cuda.memory_reserved(device),
    }


def _driver_version() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


@contextlib.contextmanager
def memory_cap(budget_bytes: int, device: torch.device):
    """Limit this process's CUDA allocator to ``budget_bytes`` (a no-op elsewhere), then lift it."""
    if device.type != "cuda":
        yield None
        return
    total = torch.cuda.get_device_properties(device).total_memory
    if budget_bytes > total:
        raise ValueError(f"budget {budget_bytes / GIB:.1f} GiB exceeds this card's {total / GIB:.1f} GiB")
    free_memory()
    # the cap needs an explicit device index ("cuda" alone is a ValueError, seen on the H200 run)
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(budget_bytes / total, index)
    try:
        yield budget_bytes / total
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
        free_memory()
