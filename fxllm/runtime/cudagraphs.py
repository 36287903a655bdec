"""The runner's CUDA graphs: capture every planned size at start-up, replay FULL graphs.

PIECEWISE graphs live in the compiled pieces (``compiler.cudagraph.PiecewiseCUDAGraph``);
capturing them is one forward with the forward context saying so. A FULL graph is
the whole forward of a decode-only step, attention included, and the logits of
every row (every real row of a decode-only step samples): on an H100 that made
batch-1 decode 9% faster than computing the logits after the replay. Sizes are captured
largest first into one memory pool, each after a warm-up forward so that lazy work
(Triton compiles the attention kernels for a new shape on first use) never happens
inside a capture.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from fxllm.compiler.cudagraph import CUDAGraphPlan, GraphStep, capturing, non_owning
from fxllm.compiler.report import CompileReport
from fxllm.config import CUDAGraphMode
from fxllm.runtime.step_inputs import PreparedStep

logger = logging.getLogger(__name__)

PrepareIdle = Callable[[int], PreparedStep]
Forward = Callable[[PreparedStep, GraphStep | None], torch.Tensor]
ComputeLogits = Callable[[torch.Tensor], torch.Tensor]


class CUDAGraphs:
    def __init__(self, plan: CUDAGraphPlan, compute_logits: ComputeLogits):
        self.plan = plan
        self.compute_logits = compute_logits
        # size -> (graph, its logits [size, vocab]: a non-owning view into the pool)
        self.full: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def capture(self, prepare_idle: PrepareIdle, forward: Forward, report: CompileReport) -> None:
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.plan.piecewise_sizes):
            prepared = prepare_idle(size)
            forward(prepared, None)  # warm-up
            forward(prepared, GraphStep(CUDAGraphMode.PIECEWISE, size, pool))
        for size in reversed(self.plan.full_sizes):
            prepared = prepare_idle(size)
            forward(prepared, None)  # warm-up
            graph = torch.cuda.CUDAGraph()
            with capturing(graph, pool):
                logits = self.compute_logits(forward(prepared, GraphStep(CUDAGraphMode.FULL, size)))
            self.full[size] = (graph, non_owning(logits))
        torch.cuda.synchronize()
        report.cudagraph_capture_seconds = round(time.perf_counter() - start, 2)
        report.cudagraph_memory_bytes = max(free_before - torch.cuda.mem_get_info()[0], 0)
        report.cudagraph_sizes = {
            mode.value: list(sizes)
            for mode, sizes in ((CUDAGraphMode.FULL, self.plan.full_sizes), (CUDAGraphMode.PIECEWISE, self.plan.piecewise_sizes))
            if sizes
        }
        logger.info(
            "CUDA graphs (%s): %d full, %d piecewise sizes captured in %.1f s, %.2f GiB",
            self.plan.mode.value, len(self.plan.full_sizes), len(self.plan.piecewise_sizes),
            report.cudagraph_capture_seconds, report.cudagraph_memory_bytes / 2**30,
        )

    def release(self) -> None:
        """Drop the full graphs (see ``PiecewiseCUDAGraph.release``)."""
        for graph, _ in self.full.values():
            graph.reset()
        self.full.clear()

    def replay_full(self, size: int) -> torch.Tensor:
        """Replay the graph of ``size``; the logits [size, vocab] it returns hold this step's values."""
        graph, logits = self.full[size]
        graph.replay()
        return logits
