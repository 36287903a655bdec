"""Collectives as custom ops: opaque to Dynamo and Inductor, visible to graph passes.

They run over the default process group (NCCL on GPU, gloo on CPU), which the
worker of each rank initializes before building its model. On GPUs, an all-reduce
small enough for the one-shot kernel's buffers takes that path instead: like the
default process group, the kernel's buffers belong to the process, set up by a
tensor-parallel engine's ranks at start-up (``use_one_shot_all_reduce``) and dropped
at its shutdown (``stop_one_shot_all_reduce``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from fxllm.parallel.tp_config import TPLayout

if TYPE_CHECKING:  # imported where used: it needs Triton, which only GPUs use here
    from fxllm.parallel.one_shot_all_reduce import OneShotAllReduce

logger = logging.getLogger(__name__)

_one_shot: OneShotAllReduce | None = None


def use_one_shot_all_reduce(host_group: dist.ProcessGroup, dtype: torch.dtype, device: torch.device) -> int:
    """Collective: set up the one-shot all-reduce for ``dtype`` tensors on every rank, or on
    none where any rank could not (peer memory unavailable): NCCL then serves every size.
    ``host_group`` (gloo) carries the agreement. Returns the largest all-reduce in bytes
    the one-shot path takes, 0 where it did not start."""
    global _one_shot
    one_shot, failure = None, ""
    try:
        from fxllm.parallel.one_shot_all_reduce import OneShotAllReduce

        one_shot = OneShotAllReduce.create(host_group, dtype, device)
    except Exception as error:  # no peer access between the GPUs
        failure = f"{type(error).__name__}: {error}"
    everyone = torch.tensor([one_shot is not None], dtype=torch.int32)
    dist.all_reduce(everyone, op=dist.ReduceOp.MIN, group=host_group)
    if not everyone.item():
        if failure:
            logger.warning("small all-reduces use NCCL: the one-shot all-reduce could not start (%s)", failure)
        return 0
    _one_shot = one_shot
    return one_shot.max_bytes


def stop_one_shot_all_reduce() -> None:
    """Drop the one-shot buffers: before the process group they were shared over is destroyed."""
    global _one_shot
    _one_shot = None


@torch.library.custom_op("fxllm::all_reduce", mutates_args=())
def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, as a new tensor."""
    one_shot = _one_shot
    if one_shot is not None and one_shot.handles(tensor):
        return one_shot(tensor)
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


def gather_logits(local_logits: torch.Tensor, layout: TPLayout) -> torch.Tensor:
    """[S, local_vocab] on each rank -> [S, vocab] (the padded tail of the last shard dropped)."""
    if layout.world_size == 1:
        return local_logits
    return all_gather_last_dim(local_logits)[..., : layout.vocab_size]
