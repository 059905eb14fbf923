"""The one precision table: what each ``--precision`` means for every dtype a run uses.

Read the table top to bottom. Each row fixes four things, and training, the precision
doctor, the trial runs and the benchmark all read them from here:

* ``weights``: the frozen base model (vision encoder, Q-Former base weights, language model);
* ``adapters``: the LoRA adapters and so AdamW's state (its moments live in the parameter dtype);
* ``autocast``: the dtype ``torch.autocast`` computes in, or None for no autocast;
* ``grad_scaler``: whether a ``torch.amp.GradScaler`` scales the loss (fp16 autocast only:
  fp16 gradients underflow without it).

``fp16-pure`` keeps the adapters and AdamW state in fp16. It exists to reproduce the seed's
NaN (AdamW's eps=1e-8 rounds to 0 in fp16; see ``diagnostics/numerics.py``) and is refused by
training unless ``allow_unsafe`` is set. Sources: PyTorch's AMP recipe (fp32 weights +
autocast + GradScaler for fp16); bf16 needs no scaler (same exponent range as fp32).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    name: str
    weights: torch.dtype  # frozen base weights
    adapters: torch.dtype  # LoRA adapters and AdamW state
    autocast: torch.dtype | None  # torch.autocast dtype; None: no autocast
    safe: bool = True  # False: known to fail (fp16-pure, the seed's NaN)

    @property
    def compute(self) -> torch.dtype:
        """The dtype the matmuls run in: the autocast dtype, else the weights' (what an MFU peak refers to)."""
        return self.autocast or self.weights

    @property
    def grad_scaler(self) -> bool:
        """Loss scaling is needed exactly when autocast computes in fp16."""
        return self.autocast == torch.float16


PRECISIONS = {
    p.name: p
    for p in (
        Precision("fp32", torch.float32, torch.float32, None),
        Precision("bf16", torch.bfloat16, torch.float32, None),
        Precision("fp16-amp", torch.float32, torch.float32, torch.float16),
        Precision("fp16-pure", torch.float16, torch.float16, None, safe=False),
    )
}
NAMES = tuple(PRECISIONS)
SAFE_NAMES = tuple(name for name, p in PRECISIONS.items() if p.safe)


def get(name: str) -> Precision:
    """The row for ``name``; ValueError naming the known precisions otherwise."""
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(f"unknown precision {name!r}; expected one of {', '.join(NAMES)}") from None


def autocast(name: str, device: torch.device | str):
    """The autocast context of precision ``name`` on ``device`` (a null context without autocast)."""
    dtype = get(name).autocast
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def grad_scaler(name: str, device: torch.device | str) -> torch.amp.GradScaler:
    """A GradScaler, enabled only where the precision needs one (a disabled scaler passes through)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=get(name).grad_scaler)
