"""Collectives as custom ops: opaque to Dynamo and Inductor, visible to graph passes.

They run over the default process group (NCCL on GPU, gloo on CPU), which the
worker of each rank initializes before building its model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


@torch.library.custom_op("fxllm::all_reduce", mutates_args=())
def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, as a new tensor."""
    summed = tensor.clone()
    dist.all_reduce(summed)
    return summed


@all_reduce.register_fake
def _(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(tensor)


@torch.library.custom_op("fxllm::all_gather_last_dim", mutates_args=())
def all_gather_last_dim(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along the last dim, in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=-1)


@all_gather_last_dim.register_fake
def _(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.new_empty((*tensor.shape[:-1], tensor.shape[-1] * dist.get_world_size()))
