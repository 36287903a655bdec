"""The per-step cost of tensor parallelism's step message, with the workers waiting for it.

Under tensor parallelism rank 0 schedules, fills the step's host buffers and
sends them to every worker as one message down a pipe (parallel/step_sync.py: a header,
the token and request rows, the block tables, the rows whose logits it needs); the
other ranks receive them into their own buffers and copy them to their device. This is host work
that rank 0 adds to every step, on CPU and GPU machines alike. On GPUs the workers are
back in ``receive`` long before rank 0 sends (their forward is queued, not waited for),
so the tool measures that case: two processes on this host, the worker looping on
``receive`` (and its host-to-device copy), rank 0 timing ``send`` of decode steps of
several batch sizes, each request holding --blocks KV blocks.

    python tools/bench_step_sync.py --batch-sizes 1 8 64 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

DEFAULT_BATCH_SIZES = (1, 8, 64, 256)
WARMUP_STEPS = 20
PERCENTILE = 90
BLOCK_SIZE = 16


def _step_inputs(max_requests: int, blocks: int):
    from fxllm.runtime.step_inputs import StepInputs

    return StepInputs(max_requests, max_requests, blocks, BLOCK_SIZE, torch.device("cpu"))


def _receive_until_stopped(rank: int, world_size: int, links, payload: tuple[int, int]) -> None:
    from fxllm.runtime.executor.step_sync import StepSync

    sync = StepSync(_step_inputs(*payload), links)
    with torch.inference_mode():
        while sync.receive() is not None:
            pass


def measure(sync, batch_size: int, blocks: int, steps: int) -> dict:
    from fxllm.forward_context import GraphDispatch
    from fxllm.config import CUDAGraphMode

    with torch.inference_mode():
        # A decode step of batch_size requests, each sampling once and holding `blocks` blocks.
        prepared = replace(sync.inputs.prepare_idle(batch_size), max_blocks=blocks)
        dispatch = GraphDispatch(CUDAGraphMode.FULL, batch_size, batch_size)
        logit_rows = torch.arange(batch_size)
        times = []
        for step in range(WARMUP_STEPS + steps):
            start = time.perf_counter()
            sync.send(prepared, dispatch, logit_rows)
            if step >= WARMUP_STEPS:
                times.append(time.perf_counter() - start)
    return {
        "batch_size": batch_size,
        "blocks_per_request": blocks,
        "send_us_mean": round(statistics.mean(times) * 1e6, 1),
        "send_us_median": round(statistics.median(times) * 1e6, 1),
        f"send_us_p{PERCENTILE}": round(statistics.quantiles(times, n=100)[PERCENTILE - 1] * 1e6, 1),
    }


def main() -> None:
    from fxllm.runtime.executor.step_sync import StepSync
    from fxllm.runtime.executor.workers import WorkerGroup

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCH_SIZES))
    parser.add_argument("--blocks", type=int, default=16, help="KV blocks per request (16 tokens each)")
    parser.add_argument("--steps", type=int, default=500, help="timed steps per batch size")
    parser.add_argument("--json", default="bench_step_sync.json")
    args = parser.parse_args()
    payload = (max(args.batch_sizes), args.blocks)
    workers = WorkerGroup(2, "cpu", _receive_until_stopped, payload)
    try:
        sync = StepSync(_step_inputs(*payload), workers.links)
        rows = [measure(sync, batch, args.blocks, args.steps) for batch in args.batch_sizes]
        sync.send_stop()
    finally:
        workers.shutdown()
    print(f"step message, rank 0 to 1 worker on this host ({torch.get_num_threads()} threads)")
    print(f"{'batch':>6} {'blocks':>7} {'mean µs':>9} {'median µs':>10} {f'p{PERCENTILE} µs':>9}")
    for row in rows:
        print(f"{row['batch_size']:>6} {row['blocks_per_request']:>7} {row['send_us_mean']:>9} "
              f"{row['send_us_median']:>10} {row[f'send_us_p{PERCENTILE}']:>9}")
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
