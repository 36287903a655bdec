"""The all-reduce of a tensor-parallel step alone: the one-shot kernel against NCCL (GPUs).

A decode step under tensor parallelism makes 2 all-reduces per layer of one token's
hidden state (8 KB at width 4096 in bf16). Two processes, one per GPU, each capture
--calls all-reduces in one CUDA graph, as a decode graph holds them, each followed by a
multiply (its input depends on the previous result), and time replays of it. Rows:
NCCL (with the copy the custom op makes, since NCCL's op works in place), the one-shot
kernel (parallel/one_shot_all_reduce.py), and the multiply alone. Each all-reduce's
result is checked against NCCL's first.

    python tools/bench_all_reduce.py --sizes 8192 65536 524288
"""

from __future__ import annotations

import argparse
import json
import queue
import tempfile
from pathlib import Path

import torch

WORLD_SIZE = 2
DEFAULT_SIZES = (8192, 65536, 524288)  # bytes
DEFAULT_CALLS = 65  # a Llama-3-8B decode step: 2 per layer and the embedding's
REPLAYS = 50
WARMUP_REPLAYS = 5
RESULT_SECONDS = 600  # a rank that failed never reports


def _time_graph(function, tensor: torch.Tensor, calls: int) -> float:
    """µs per call of ``function`` captured ``calls`` times in a chain, from graph replays."""
    import torch.distributed as dist

    def chain(value: torch.Tensor) -> torch.Tensor:
        for _ in range(calls):
            value = function(value) * 0.5
        return value

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside capture (NCCL and Triton set up here)
        chain(tensor)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain(tensor)
    for _ in range(WARMUP_REPLAYS):
        graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / REPLAYS / calls


def _rank_main(rank: int, rendezvous: str, sizes: list[int], calls: int, results) -> None:
    import torch.distributed as dist

    from fxllm.parallel.one_shot_all_reduce import OneShotAllReduce
    from fxllm.runtime.executor.workers import init_process_group

    torch.cuda.set_device(rank)
    host_group = init_process_group(dist.FileStore(rendezvous, WORLD_SIZE), rank, WORLD_SIZE, "cuda")
    try:
        dtype = torch.bfloat16
        one_shot = OneShotAllReduce.create(host_group, dtype, torch.device("cuda", rank), max_bytes=max(sizes))

        def nccl(tensor: torch.Tensor) -> torch.Tensor:
            summed = tensor.clone()
            dist.all_reduce(summed)
            return summed

        rows = []
        for size in sizes:
            tensor = torch.randn(size // dtype.itemsize, dtype=dtype, device="cuda")
            if not torch.equal(one_shot(tensor), nccl(tensor)):
                raise RuntimeError(f"the one-shot all-reduce of {size} bytes differs from NCCL's")
            rows.append({
                "bytes": size,
                "nccl_us": _time_graph(nccl, tensor, calls),
                "one_shot_us": _time_graph(one_shot, tensor, calls),
                "multiply_us": _time_graph(lambda value: value, tensor, calls),
            })
        results.put((rank, rows))
    finally:
        dist.destroy_process_group()


def _run_ranks(rendezvous: str, sizes: list[int], calls: int) -> dict[int, list[dict]]:
    """Each rank's rows, from WORLD_SIZE spawned processes."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(target=_rank_main, args=(rank, rendezvous, sizes, calls, results)) for rank in range(WORLD_SIZE)
    ]
    for process in processes:
        process.start()
    try:
        return dict(results.get(timeout=RESULT_SECONDS) for _ in processes)
    except queue.Empty:
        raise SystemExit(f"no result within {RESULT_SECONDS} s: exit codes {[p.exitcode for p in processes]}") from None
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="bytes per all-reduce")
    parser.add_argument("--calls", type=int, default=DEFAULT_CALLS, help="all-reduces per captured graph")
    parser.add_argument("--json", default="bench_all_reduce.json", help="where to write the results")
    args = parser.parse_args()
    if torch.cuda.device_count() < WORLD_SIZE:
        parser.error(f"needs {WORLD_SIZE} GPUs, {torch.cuda.device_count()} visible")
    with tempfile.TemporaryDirectory(prefix="bench-all-reduce-") as scratch:
        reports = _run_ranks(str(Path(scratch) / "rendezvous"), args.sizes, args.calls)
    rows = reports[0]  # rank 0's timings (both ranks replay in lockstep)
    print(f"{'bytes':>9} {'NCCL + copy us':>15} {'one-shot us':>12} {'multiply us':>12}   (per all-reduce, with its multiply)")
    for row in rows:
        print(f"{row['bytes']:>9} {row['nccl_us']:>15.2f} {row['one_shot_us']:>12.2f} {row['multiply_us']:>12.2f}")
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
