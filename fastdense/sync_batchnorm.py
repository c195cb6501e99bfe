"""SyncBatchNorm inside a dense block: batch statistics over every process of a group.

A block whose BatchNorms are ``nn.SyncBatchNorm`` normalises, in training under an initialised process
group of more than one process, with the statistics of the whole global batch, as PyTorch's
SyncBatchNorm does. The block computes each channel segment's statistics once, locally, and combines
them across processes (one ``all_gather`` of count, mean and variance per segment, merged exactly); the
backward all-reduces the two per-channel gradient sums each BatchNorm's input gradient needs. Parameter
gradients stay local sums, for DistributedDataParallel to average, as with PyTorch's SyncBatchNorm.
Unlike PyTorch's, it also runs on CPU tensors (gloo), which is how it is tested.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def sync_group_name(norms: list[nn.Module], training: bool, what: str) -> str:
    """The name of the process group whose statistics the block must share, or "" when none: not every
    norm is a SyncBatchNorm, eval mode, no initialised process group, or a group of one process."""
    synced = [isinstance(norm, nn.SyncBatchNorm) for norm in norms]
    if not any(synced):
        return ""
    if not all(synced):
        raise ValueError(f"{what}: mixes SyncBatchNorm with other BatchNorms; convert every norm of the block or none")
    # ``is``, not a set of ids: Dynamo (torch 2.11) cannot trace id() of None, the default group.
    if any(norm.process_group is not norms[0].process_group for norm in norms):
        raise ValueError(f"{what}: its SyncBatchNorms use different process groups (statistics are shared)")
    if not (training and dist.is_available() and dist.is_initialized()):
        return ""
    group = norms[0].process_group or dist.group.WORLD
    return group.group_name if dist.get_world_size(group) > 1 else ""


class StatsSync:
    """Statistics and gradient sums over the processes of one group (resolved from its name)."""

    def __init__(self, group_name: str) -> None:
        self.group = dist.distributed_c10d._resolve_process_group(group_name)
        self.world = dist.get_world_size(self.group)

    def total(self, count: int, device: torch.device) -> int:
        """The number of rows over all processes (batches may differ in size)."""
        total = torch.tensor([count], dtype=torch.float64, device=device)
        dist.all_reduce(total, group=self.group)
        return int(total.item())

    def stats(self, stats: tuple[Tensor, Tensor], count: int) -> tuple[Tensor, Tensor]:
        """The global biased ``(var, mean)`` from this process's over ``count`` rows: Chan's merge of
        every process's count, mean and variance (exact, in float64)."""
        var, mean = stats
        local = torch.stack([torch.full_like(mean, count, dtype=torch.float64), mean.double(), var.double()])
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(gathered, local, group=self.group)
        counts, means, variances = torch.stack(gathered).unbind(1)
        total = counts.sum(0)
        global_mean = (counts * means).sum(0) / total
        global_var = (counts * (variances + (means - global_mean).square())).sum(0) / total
        return global_var.to(var.dtype), global_mean.to(mean.dtype)

    def sum(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """Each tensor summed over the processes (new tensors; one all_reduce for all of them)."""
        flat = torch.cat([t.flatten() for t in tensors])
        dist.all_reduce(flat, group=self.group)
        return tuple(part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True))
