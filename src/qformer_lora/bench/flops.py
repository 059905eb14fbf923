"""FLOPs of one training step and model FLOPs utilisation (MFU).

The FLOP count per sample is *counted*, not estimated: one custom-forward step
(forward + backward, batch ``batch_size``) runs under ``torch.utils.flop_counter``,
which adds up the matrix multiplications, convolutions and attention kernels torch
dispatches. That is the plain step's work: the frozen vision encoder forward only
(it runs without autograd), the Q-Former and language model forward and backward
(the LM is frozen but gradients must flow through it to the Q-Former's inputs).
Element-wise work is not counted, as in the usual MFU convention.

MFU of any variant of the step (feature cache, LM checkpointing, ...) divides the
*plain* step's FLOPs by its time, so a variant that skips work (the cache) or repeats
it (checkpointing) is compared on the same useful work: MFU moves with samples/s.

The counter needs real tensors (transformers' masking code reads values), so this runs
on the device being measured; on the meta device it cannot.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .. import lora, precision
from ..forward import custom_forward

# Dense (no sparsity) 16-bit tensor-core peaks from NVIDIA's datasheets, TFLOP/s. Matched
# as substrings of torch.cuda.get_device_name(), first match wins (NVL/PCIe before SXM).
PEAK_16BIT_TFLOPS = (
    ("H200 NVL", 835.5),
    ("H200", 989.5),
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.0),
    ("H100", 989.5),
    ("A100", 312.0),
)


def step_flops_per_sample(model, shape, device, batch_size: int = 2) -> float:
    """FLOPs of one plain custom-forward training step divided by the batch size.

    Gradients left on the adapters are cleared; the optimizer is not stepped (its
    element-wise update is not counted).
    """
    batch = shape.random_batch(model, batch_size, device)
    with FlopCounterMode(display=False) as counter:
        custom_forward(model, batch).loss.backward()
    for param in lora.adapter_parameters(model):
        param.grad = None
    return counter.get_total_flops() / batch_size


def peak_flops(device_name: str, precision_name: str) -> float | None:
    """The card's dense 16-bit peak in FLOP/s for a 16-bit precision, else None (unknown card or fp32).

    MFU against the 16-bit peak only means something where the matmuls run in 16 bit (precision.py's
    compute dtype: bf16 weights, or fp16 autocast)."""
    if precision.get(precision_name).compute not in (torch.bfloat16, torch.float16):
        return None
    return next((tflops * 1e12 for name, tflops in PEAK_16BIT_TFLOPS if name in device_name), None)


def mfu(samples_per_s: float, flops_per_sample: float | None, peak: float | None) -> float | None:
    if not flops_per_sample or not peak:
        return None
    return samples_per_s * flops_per_sample / peak
