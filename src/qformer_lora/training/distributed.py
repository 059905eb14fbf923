"""More than one GPU or machine: the training loop under ``torchrun``, DDP over the adapter only.

``torchrun --nproc_per_node N -m qformer_lora.cli train ...`` starts N copies of the same
loop; this module is everything they need beyond the single-process loop, read top to bottom:

1. ``setup`` / ``teardown``: the process group from torchrun's environment (RANK, WORLD_SIZE,
   LOCAL_RANK, MASTER_ADDR, MASTER_PORT); gloo on CPU, nccl on CUDA (one GPU per process,
   cuda:LOCAL_RANK). Without WORLD_SIZE > 1 nothing happens: one process, as before.
2. ``wrap``: the custom forward as a module inside DistributedDataParallel. forward.custom_forward
   drives the submodules itself and never calls ``model.forward``, so DDP around the PeftModel
   would never see a forward (no gradient sync); ``CustomForward.forward`` is that forward. DDP
   syncs only the adapter: frozen parameters and all buffers are on its ignore list, so neither
   the start-up broadcast nor the gradient all-reduce touches the (large) frozen base model.
3. ``shard_loader``: rank r of W takes positions r, r+W, r+2W, ... of the epoch's shuffled order
   (the single-process order, same seed), so the ranks' k-th micro-batches together are exactly
   the single process's k-th micro-batch of W times the size. Shards are padded to equal length
   with repeated samples whose labels are all ignored: zero loss, zero gradient, zero target
   count, but every rank runs the same number of steps (DDP would hang otherwise).
4. ``all_sum``: the per-step totals (target count, samples, bad-input flag) and the loss summed
   over ranks, so that every rank takes the same decisions and the loss is normalised by the
   global target count (training/train.py multiplies by the world size to undo DDP's gradient mean).

Only rank 0 (``is_main``) writes metrics.jsonl and checkpoints and shows the progress bar.
Validation runs on every rank over the whole validation set: the adapters are identical after
every step, so every rank gets the same numbers without any communication.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .. import forward

# ----------------------------------------------------------------------------- 1. process group


def initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if initialised() else 1


def rank() -> int:
    # RANK as well: after teardown (e.g. the CLI printing the final metrics) only rank 0 should speak
    return dist.get_rank() if initialised() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def setup(device: str | None) -> tuple[torch.device, bool]:
    """(device of this process, whether a process group was started here); see the module docstring.

    A process group the caller already started is used as it is (and left to the caller).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not initialised():
        return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")), False
    chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if chosen.type == "cuda" and chosen.index is None:  # one GPU per process
        chosen = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if initialised():
        return chosen, False
    dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")  # env:// reads torchrun's variables
    return chosen, True


def teardown(started: bool) -> None:
    if started and initialised():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- 2. the DDP wrapper


class CustomForward(torch.nn.Module):
    """``forward.custom_forward(model, batch)`` as a module's forward, so DDP's reducer sees it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, reduction: str = "mean") -> forward.ForwardOutput:
        return forward.custom_forward(self.model, batch, reduction=reduction)


def wrap(model, device: torch.device) -> torch.nn.Module:
    """The training forward: DDP over the adapter under torchrun, the plain CustomForward otherwise."""
    module = CustomForward(model)
    if world_size() == 1:
        return module
    # DDP skips frozen parameters in its reducer anyway (requires_grad=False), but would still
    # broadcast them from rank 0 at start-up: the whole base model. Buffers are constant in eval
    # mode; ignored, they are neither broadcast at start-up nor before every forward.
    ignored = [name for name, p in module.named_parameters() if not p.requires_grad]
    ignored += [name for name, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignored)
    # find_unused_parameters stays off (it costs a graph traversal per step): every adapter gets a
    # gradient in every step on all four model families, both scopes. If one ever did not, DDP
    # stops at the next step with an error naming the unused parameters, not silently.
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def synced_parameters(trainer: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters whose gradients DDP all-reduces (empty for the single-process wrapper)."""
    if not isinstance(trainer, DistributedDataParallel):
        return []
    return [
        p
        for name, p in trainer.module.named_parameters()
        if p.requires_grad and name not in trainer.parameters_to_ignore
    ]


def accumulating(trainer: torch.nn.Module, last: bool):
    """Context for one micro-batch's forward and backward: the gradient all-reduce runs only after the
    group's last one (the mean of summed gradients equals the sum of per-micro-batch means)."""
    if isinstance(trainer, DistributedDataParallel) and not last:
        return trainer.no_sync()
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- 3. data sharding


class ShardSampler(torch.utils.data.Sampler):
    """Rank ``rank``'s share of ``order`` as (index, real) pairs; ``real`` False marks padding."""

    def __init__(self, order, rank: int, world_size: int):
        self.order, self.rank, self.world_size = order, rank, world_size

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.world_size)

    def __iter__(self):
        order = list(self.order)  # a RandomSampler draws its permutation here, as in one process
        shard = order[self.rank :: self.world_size]
        yield from ((index, True) for index in shard)
        yield from ((order[0], False) for _ in range(len(self) - len(shard)))


class _Marked(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, real = key
        return self.dataset[index], real


class _PaddingCollator:
    """The collator, then padding rows get all-ignored labels (no loss, no gradient, no targets)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, items) -> dict:
        batch = self.collator([example for example, _ in items])
        padding = torch.tensor([not real for _, real in items])
        batch["labels"][padding] = forward.IGNORE_INDEX
        batch["ids"] = [i if real else f"{i} (padding)" for i, (_, real) in zip(batch["ids"], items)]
        batch["padding"] = int(padding.sum())
        return batch


def shard_loader(dataset, collator, batch_size: int, order, wrap=None, **options) -> torch.utils.data.DataLoader:
    """This rank's micro-batches of ``batch_size`` from its shard of ``order`` (a sampler or index list);
    ``wrap``: a sampler wrapper around the shard (the loader's SkipFirst); ``options`` go to the
    DataLoader (workers, pinned memory)."""
    sampler = ShardSampler(order, rank(), world_size())
    sampler = wrap(sampler) if wrap is not None else sampler
    return torch.utils.data.DataLoader(
        _Marked(dataset), batch_size=batch_size, sampler=sampler, collate_fn=_PaddingCollator(collator), **options
    )


def sample_count(batch: dict) -> int:
    """Real samples in ``batch`` (padding rows of a shard not counted)."""
    return batch["input_ids"].shape[0] - batch.get("padding", 0)  # synthetic batches carry no ids


# ----------------------------------------------------------------------------- 4. totals over ranks


def all_sum(values: list, device: torch.device) -> list:
    """``values`` summed over all ranks in one all-reduce (as float64, returned as their own types);
    the values themselves in a single process."""
    if world_size() == 1:
        return list(values)
    totals = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return [type(v)(t) for v, t in zip(values, totals.tolist())]
