"""Tensor-parallel worker processes on CPU (gloo): collectives, errors with their rank, no leftovers."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fxllm.parallel.workers import WorkerGroup, choose_start_method

WORLD_SIZE = 2


def _sum_ranks(rank: int, world_size: int, payload: int) -> None:
    total = torch.tensor([float(rank + payload)])
    dist.all_reduce(total)


def _fail_on_rank_1(rank: int, world_size: int, payload: None) -> None:
    if rank == 1:
        raise ValueError("rank 1 could not load its shard")
    dist.barrier()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_workers_join_rank_0_in_one_process_group_and_leave_nothing_behind(method):
    group = WorkerGroup(WORLD_SIZE, "cpu", _sum_ranks, 10, start_method=method)
    total = torch.tensor([10.0])  # rank 0's part: rank + payload
    dist.all_reduce(total)
    assert total.item() == 10 + 11
    processes = list(group._processes)
    group.shutdown()
    assert not any(process.is_alive() for process in processes)
    assert not dist.is_initialized()


def test_a_worker_exception_reaches_the_parent_with_its_rank():
    group = WorkerGroup(WORLD_SIZE, "cpu", _fail_on_rank_1, None, start_method="fork")
    with pytest.raises(RuntimeError, match="(?s)worker rank 1 failed.*ValueError: rank 1 could not load its shard"):
        try:
            dist.barrier()  # the peer is gone: gloo fails instead of waiting
        except RuntimeError as error:
            group.raise_worker_error(error)
    processes = list(group._processes)
    group.shutdown()
    assert not any(process.is_alive() for process in processes)


def test_start_method_follows_the_override_and_rejects_unknown_ones():
    assert choose_start_method("spawn") == "spawn"
    assert choose_start_method(None) == "fork"  # CUDA is not initialized in the CPU suite
    with pytest.raises(ValueError, match="FXLLM_WORKER_MULTIPROC_METHOD must be one of fork, spawn"):
        choose_start_method("forkserver")
