"""The one-shot all-reduce kernel (parallel/one_shot_all_reduce.py), one rank at a time.

Two ranks are played in turn on one device: a peer's writes into this rank's buffer
are made before this rank's call, as if the peer had run first. Without CUDA the
kernel runs under Triton's interpreter on CPU tensors (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from fxllm.parallel.one_shot_all_reduce import PHASES, OneShotAllReduce

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SLOT = 3000  # elements a slot holds: three program blocks, the last one partial
WORLD = 2
# The fp32 sum is exact; its rounding to bf16 may differ by one unit in the last place
# (Triton's interpreter truncates where the GPU rounds to nearest).
ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2**-7}
RANK_SECONDS = 300  # a spawned rank's time limit


def _rank(rank: int, dtype: torch.dtype, buffers: list[torch.Tensor]) -> OneShotAllReduce:
    pointers = torch.tensor([buffer.data_ptr() for buffer in buffers], dtype=torch.int64, device=DEVICE)
    return OneShotAllReduce(dtype, rank, buffers[rank], pointers)


def _bits(tensor: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    return tensor.view(buffer.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sum_of_both_ranks_over_every_phase(dtype):
    """Rank 0 over PHASES + 1 calls: each returns x0 + x1, pushes x0 into rank 1's slot of
    the call's phase, and leaves its own buffer empty again."""
    own = OneShotAllReduce.empty_buffer(dtype, WORLD, SLOT, DEVICE)
    peer = OneShotAllReduce.empty_buffer(dtype, WORLD, SLOT, DEVICE)
    rank0 = _rank(0, dtype, [own, peer])
    sentinel = torch.tensor([-0.0], dtype=dtype).view(own.dtype).item()  # an empty slot's bits
    generator = torch.Generator().manual_seed(0)
    for call in range(PHASES + 1):
        phase = call % PHASES
        numel = SLOT - 7 * call  # sizes vary from call to call, as batch sizes do
        x0 = torch.randn(numel, generator=generator).to(dtype).to(DEVICE)
        x1 = torch.randn(numel, generator=generator).to(dtype).to(DEVICE)
        own[phase, 1, :numel] = _bits(x1, own)  # the peer ran first
        summed = rank0(x0)
        expected = (x0.float() + x1.float()).to(dtype)
        torch.testing.assert_close(summed, expected, rtol=ROUNDING[dtype], atol=0)
        assert torch.equal(peer[phase, 0, :numel], _bits(x0, peer))
        assert bool((own == sentinel).all()), "a read slot was not emptied"
        assert rank0.counters.tolist() == [call + 1] * rank0.counters.numel()


def test_negative_zero_is_sent_as_zero():
    """-0.0 marks an empty slot, so a rank sends it as +0.0: a -0.0 input must neither hang
    the reader nor change the sum."""
    dtype = torch.bfloat16
    own = OneShotAllReduce.empty_buffer(dtype, WORLD, SLOT, DEVICE)
    peer = OneShotAllReduce.empty_buffer(dtype, WORLD, SLOT, DEVICE)
    x0 = torch.tensor([-0.0, 1.5, -0.0, -2.0], dtype=dtype, device=DEVICE)
    x1 = torch.tensor([-0.0, -0.0, 3.0, 0.25], dtype=dtype, device=DEVICE)
    own[0, 1, : x1.numel()] = _bits(x1 + 0.0, own)  # what rank 1 sends for x1
    summed = _rank(0, dtype, [own, peer])(x0)
    assert summed.tolist() == [0.0, 1.5, 3.0, -1.75]
    sent = peer[0, 0, : x0.numel()].view(dtype)
    assert sent.tolist() == [0.0, 1.5, 0.0, -2.0] and not bool(torch.signbit(sent[0]))


def test_a_peer_that_never_writes_gives_nan_not_a_hang():
    dtype = torch.float32
    buffers = [OneShotAllReduce.empty_buffer(dtype, WORLD, SLOT, DEVICE) for _ in range(WORLD)]
    rank0 = _rank(0, dtype, buffers)
    rank0.max_polls = 3
    summed = rank0(torch.ones(5, dtype=dtype, device=DEVICE))
    assert bool(summed.isnan().all())


def test_handles_only_what_fits_its_buffer():
    dtype = torch.bfloat16
    buffers = [OneShotAllReduce.empty_buffer(dtype, WORLD, SLOT, DEVICE) for _ in range(WORLD)]
    rank0 = _rank(0, dtype, buffers)
    assert rank0.handles(torch.zeros(SLOT, dtype=dtype, device=DEVICE))
    assert rank0.max_bytes == SLOT * dtype.itemsize
    assert not rank0.handles(torch.zeros(SLOT + 1, dtype=dtype, device=DEVICE))
    assert not rank0.handles(torch.zeros(SLOT, dtype=torch.float32, device=DEVICE))
    assert not rank0.handles(torch.zeros(8, 4, dtype=dtype, device=DEVICE).t())
    with pytest.raises(ValueError, match="2- and 4-byte floats"):
        OneShotAllReduce.empty_buffer(torch.float64, WORLD, SLOT, DEVICE)


def _two_gpu_rank(rank: int, rendezvous: str, results) -> None:
    """One rank: the one-shot sums against NCCL's over sizes that change from call to
    call, eagerly and replayed from a CUDA graph (the phases carry over between them)."""
    import torch.distributed as dist

    from fxllm.runtime.executor.workers import init_process_group

    torch.cuda.set_device(rank)
    host_group = init_process_group(dist.FileStore(rendezvous, WORLD), rank, WORLD, "cuda")
    try:
        dtype = torch.bfloat16
        one_shot = OneShotAllReduce.create(host_group, dtype, torch.device("cuda", rank))
        generator = torch.Generator(device="cuda").manual_seed(rank)
        sizes = [4096, 5, 4096 * 16, 1000, one_shot.slot_numel]
        inputs = [torch.randn(n, dtype=dtype, device="cuda", generator=generator) for n in sizes]
        expected = [x.clone() for x in inputs]
        for x in expected:
            dist.all_reduce(x)
        mismatches = sum(not torch.equal(one_shot(x), e) for x, e in zip(inputs, expected))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = [one_shot(x) for x in inputs]
        for _ in range(PHASES + 1):
            graph.replay()
            mismatches += sum(not torch.equal(c, e) for c, e in zip(captured, expected))
        mismatches += sum(not torch.equal(one_shot(x), e) for x, e in zip(inputs, expected))
        torch.cuda.synchronize()
        results.put((rank, mismatches))
    finally:
        dist.destroy_process_group()


def _run_ranks(target, *args) -> list:
    """``target(rank, *args, results)`` in WORLD spawned processes; what each put, by rank."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=target, args=(rank, *args, results)) for rank in range(WORLD)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=RANK_SECONDS)
    assert [process.exitcode for process in processes] == [0] * WORLD
    return sorted(results.get(timeout=5) for _ in range(WORLD))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} GPUs")
def test_two_gpus_sum_as_nccl_does_in_and_out_of_cuda_graphs(tmp_path):
    assert _run_ranks(_two_gpu_rank, str(tmp_path / "rendezvous")) == [(rank, 0) for rank in range(WORLD)]


def _cpu_rank(rank: int, rendezvous: str, results) -> None:
    import torch.distributed as dist

    from fxllm.parallel import collectives
    from fxllm.runtime.executor.workers import init_process_group

    host_group = init_process_group(dist.FileStore(rendezvous, WORLD), rank, WORLD, "cpu")
    try:
        one_shot_bytes = collectives.use_one_shot_all_reduce(host_group, torch.float32, DEVICE)
        summed = collectives.all_reduce(torch.full((3,), float(rank + 1)))
        results.put((rank, one_shot_bytes, collectives._one_shot is None, summed.tolist()))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback: ranks without CUDA peer memory")
def test_ranks_that_cannot_share_memory_agree_on_nccl_or_gloo(tmp_path):
    """Setting up fails on every rank here (no CUDA): each rank says so, keeps no one-shot
    state, and its all-reduces still sum, over gloo."""
    outcomes = _run_ranks(_cpu_rank, str(tmp_path / "rendezvous"))
    assert outcomes == [(rank, 0, True, [3.0, 3.0, 3.0]) for rank in range(WORLD)]
