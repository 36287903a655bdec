"""Tensor-parallel worker processes on CPU (gloo): collectives, errors with their rank, no leftovers."""

from __future__ import annotations

import multiprocessing

import pytest
import torch
import torch.distributed as dist

from fxllm.runtime.executor.workers import WorkerGroup, WorkerLinks, choose_start_method

WORLD_SIZE = 2


def _sum_ranks(rank: int, world_size: int, links: WorkerLinks, payload: int) -> None:
    total = torch.tensor([float(rank + payload)])
    dist.all_reduce(total)


def _fail_on_rank_1(rank: int, world_size: int, links: WorkerLinks, payload: None) -> None:
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


def _die_before_joining() -> None:
    raise SystemExit(3)  # e.g. an import that fails in a spawned worker


def test_a_worker_that_dies_before_joining_is_reported_instead_of_awaited(monkeypatch):
    import fxllm.runtime.executor.workers as workers

    monkeypatch.setattr(workers, "_forget_inherited_state", _die_before_joining)  # runs in the forked child
    with pytest.raises(RuntimeError, match="(?s)worker rank 1 failed.*SystemExit: 3"):
        WorkerGroup(WORLD_SIZE, "cpu", _sum_ranks, 10, start_method="fork")
    assert not dist.is_initialized()
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("fxllm-tp-")]


def test_start_method_follows_the_override_and_rejects_unknown_ones():
    assert choose_start_method("spawn") == "spawn"
    assert choose_start_method(None) == "fork"  # CUDA is not initialized in the CPU suite
    with pytest.raises(ValueError, match="FXLLM_WORKER_MULTIPROC_METHOD must be one of fork, spawn"):
        choose_start_method("forkserver")


def test_choosing_the_device_leaves_cuda_uninitialized_so_workers_can_fork(monkeypatch):
    """torch.cuda.is_available() initializes the CUDA driver, after which a forked worker
    cannot use CUDA: device resolution counts GPUs through NVML instead."""
    from fxllm.config import resolve_device

    def poisons_fork() -> bool:
        raise AssertionError("torch.cuda.is_available() was called")

    monkeypatch.setattr(torch.cuda, "is_available", poisons_fork)
    assert resolve_device("auto").type in ("cpu", "cuda")


# Large enough that torch splits the conversion across its OpenMP threads.
PARALLEL_OP_ELEMENTS = 4_000_000
HANG_SECONDS = 60


def _in_forked_rank(work, results) -> None:
    """What a worker does first (forget its inherited state), then ``work()``."""
    import fxllm.runtime.executor.workers as workers

    workers._forget_inherited_state()
    results.put(work())


def _run_in_forked_rank(work) -> object:
    """``work()``'s result in a forked child that starts as a worker does; fails the test if
    the child hangs or dies."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_in_forked_rank, args=(work, results))
    child.start()
    child.join(HANG_SECONDS)
    hung = child.is_alive()
    child.kill()
    child.join()
    assert not hung, f"the forked child hung in {work.__name__}"
    assert child.exitcode == 0, f"the forked child died in {work.__name__} (exit code {child.exitcode})"
    return results.get(timeout=1)


def _parallel_conversion() -> float:
    return float(torch.ones(PARALLEL_OP_ELEMENTS).to(torch.bfloat16).float().sum())


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs an intra-op thread pool")
def test_a_forked_rank_runs_parallel_cpu_ops_after_the_parent_did():
    """A forked child whose parent used torch's OpenMP pool hangs in its first parallel op
    (as GPU ranks did converting checkpoint tensors at load) unless the pool is reset."""
    _parallel_conversion()  # the parent's pool runs
    assert _run_in_forked_rank(_parallel_conversion) == PARALLEL_OP_ELEMENTS


def _garbage_collection() -> str:
    import gc

    gc.collect()
    return "collected"


def test_a_forked_rank_never_destroys_what_its_parent_left_behind(tmp_path):
    """A stopped engine's process groups left in a reference cycle: collecting them in a
    forked child crashes or waits forever on threads that stayed in the parent."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    host_group = dist.new_group(backend="gloo")
    dist.all_reduce(torch.ones(1), group=host_group)
    cycle = [host_group, dist.group.WORLD]
    cycle.append(cycle)
    dist.destroy_process_group()
    del host_group, cycle
    assert _run_in_forked_rank(_garbage_collection) == "collected"
