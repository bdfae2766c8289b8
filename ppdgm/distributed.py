"""Data parallelism on ``torch.distributed`` for the gradient engines.

Launched by ``torchrun`` (or ``ppdgm fit ... --nproc N``), each rank reads its shard of every
epoch's data order (``DistributedSampler``: a permutation seeded by ``seed + epoch``, dealt out
rank by rank), scales its minibatch to the full data size as one process would, and averages
gradients with one all-reduce per step over Pyro's param store. Averaging the ranks' gradients
of ``global + (N / B) * sum(local over B)`` gives the gradient of one process with batch
``world * B``: the same optimization, to float tolerance, with the same seed and data order.
Only rank 0 writes checkpoints and the Fit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import cast

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

TIMEOUT = timedelta(seconds=int(os.environ.get("PPDGM_DIST_TIMEOUT", "60")))


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


def init_from_env(device=None) -> World:
    """Join the process group torchrun describes in the environment (``gloo`` on CPU, ``nccl``
    on CUDA); a plain single process gets ``World(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or not dist.is_available():
        return World()
    use_cuda = (device is not None and torch.device(device).type == "cuda") or (
        device is None and torch.cuda.is_available() and os.environ.get("PPDGM_BACKEND") != "gloo"
    )
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=TIMEOUT)
    return World(dist.get_rank(), dist.get_world_size())


def is_main_process() -> bool:
    """Rank 0 of a process group, or a plain single process: the one that writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def shard_order(n: int, epoch: int, seed: int, world: World) -> torch.Tensor:
    """This rank's indices for ``epoch`` (all of them, in order, for a single process)."""
    indices = cast(Dataset, range(n))  # the sampler takes only len() of its dataset, which a range has
    sampler: DistributedSampler[int] = DistributedSampler(
        indices, num_replicas=world.size, rank=world.rank, shuffle=True, seed=seed
    )
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler))


def check_nproc(nproc, n: int, batch_size: int | None) -> None:
    """``--nproc`` must be >= 1 and no larger than the data's minibatches (else ranks sit idle)."""
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be an int >= 1, got {nproc!r}")
    batches = math.ceil(n / batch_size) if batch_size else n
    if nproc > batches:
        raise ValueError(
            f"--nproc {nproc} is larger than the data's {batches} minibatches of {batch_size}: "
            "some ranks would get no data"
        )


def broadcast_params(params: list[torch.Tensor]) -> None:
    """Make every rank start from rank 0's values."""
    for p in params:
        with torch.no_grad():
            dist.broadcast(p.data, src=0)


def average_gradients(params: Sequence[torch.Tensor], *scalars: float) -> list[float]:
    """All-reduce the mean of the gradients (in place) and of ``scalars``, in one message."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [grads[0].new_tensor(scalars, dtype=grads[0].dtype)])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        k = g.numel()
        if p.grad is None:
            p.grad = g
        p.grad.copy_(flat[offset : offset + k].view_as(g))
        offset += k
    return flat[offset:].tolist()


def finish() -> None:
    """Wait for every rank, then leave the process group (a rank that exits while holding it aborts)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
