"""The data pipeline of a run: sample order per epoch, worker processes, pinned memory.

Decoding an image (``Dataset.__getitem__``) and processing a batch (``inputs.Collator``: the
image processor and the tokenizers) cost about 7 ms per COCO-sized JPEG on one core, more
than an H200 spends on a sample's training step (issue 16). With ``num_workers`` > 0 both run
in DataLoader worker processes, which persist across epochs, while the main process trains.

Batches are bitwise identical for every worker count: the order is drawn in the main process
(:class:`EpochOrder`), the DataLoader hands batches back in sampler order, and the loader
draws its worker base seed from a private generator, so the global RNG (LoRA dropout, the
checkpoint's RNG state) advances the same way with or without workers
(tests/unit/test_loader.py).
"""

from __future__ import annotations

import os

import torch

from . import distributed


class EpochOrder(torch.utils.data.Sampler):
    """Indices ``0..n-1`` in epoch ``epoch``'s order; :meth:`set_epoch` picks the epoch.

    Shuffled: ``torch.randperm(n)`` under a generator seeded ``seed * 1000 + epoch``, the order
    ``RandomSampler(generator=...)`` drew before this module existed, so earlier runs replay
    and a resumed run sees what an uninterrupted one would have. Unshuffled: ``range(n)``.
    """

    def __init__(self, size: int, seed: int, shuffle: bool):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


def default_workers(device: torch.device) -> int:
    """Worker processes when ``--num-workers`` is not given.

    CPU training: 0, since workers would take cores from the step itself (the tiny default
    run is step-bound). CUDA: one per free core, at most 8 (after PyTorch's own DataLoader
    guidance: a few workers per GPU saturate decoding at COCO sizes; more only cost memory).
    """
    if device.type == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


class EpochLoader:
    """One DataLoader for a whole run; ``loader.epoch(e)`` gives epoch ``e``'s batches.

    ``num_workers``: worker processes (0: load in the main process); they persist across
    epochs. ``pin_memory``: page-locked batches for asynchronous host-to-GPU copies (CUDA only).
    Under ``torchrun`` each process loads its shard of the same order
    (:func:`distributed.shard_loader`).
    """

    def __init__(self, dataset, collator, batch_size: int, seed: int, shuffle: bool, num_workers: int = 0,
                 pin_memory: bool = False):  # fmt: skip
        self.order = EpochOrder(len(dataset), seed, shuffle)
        options = {
            "num_workers": num_workers,
            "pin_memory": pin_memory,
            "persistent_workers": num_workers > 0,
            # the worker base seed comes from here, not from the global RNG (see the module docstring)
            "generator": torch.Generator().manual_seed(seed),
        }
        if shuffle and distributed.world_size() > 1:  # under torchrun: this process's shard of the order
            self.loader = distributed.shard_loader(dataset, collator, batch_size, self.order, **options)
        else:
            self.loader = torch.utils.data.DataLoader(
                dataset, batch_size=batch_size, sampler=self.order, collate_fn=collator, **options
            )

    def epoch(self, epoch: int) -> torch.utils.data.DataLoader:
        self.order.set_epoch(epoch)
        return self.loader

    def __len__(self) -> int:
        return len(self.loader)
