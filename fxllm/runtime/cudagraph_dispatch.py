"""Which steps replay which CUDA graphs, and capturing them at start-up.

FULL graphs serve decode-only steps (one token per request; the whole forward,
attention included, and the logits of every row: on an H100 that made batch-1 decode 9%
faster than computing the logits after the replay); PIECEWISE graphs serve any step
(compiled pieces captured, attention eager between them). Steps above the largest size
run without graphs. Sizes are captured largest first into one memory pool, each after a
warm-up forward so that lazy work (Triton compiles the attention kernels for a new shape
on first use) never happens inside a capture.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from fxllm.compiler.report import CompileReport
from fxllm.config import CompilationLevel, CUDAGraphMode, EngineConfig
from fxllm.forward_context import GraphDispatch

logger = logging.getLogger(__name__)

# vLLM's default capture sizes: 1, 2, 4, then every 8 up to 256, then every 16, up to
# min(2 * max_num_seqs, 512).
SMALL_CAPTURE_SIZES = (1, 2, 4)
CAPTURE_STEP = 8
LARGE_CAPTURE_FROM = 256
LARGE_CAPTURE_STEP = 16
MAX_DEFAULT_CAPTURE_SIZE = 512


def default_capture_sizes(max_num_seqs: int) -> tuple[int, ...]:
    limit = min(2 * max_num_seqs, MAX_DEFAULT_CAPTURE_SIZE)
    sizes = [*SMALL_CAPTURE_SIZES, *range(CAPTURE_STEP, LARGE_CAPTURE_FROM, CAPTURE_STEP)]
    sizes += range(LARGE_CAPTURE_FROM, MAX_DEFAULT_CAPTURE_SIZE + 1, LARGE_CAPTURE_STEP)
    return tuple(size for size in sizes if size <= limit)


def padded_size(sizes: tuple[int, ...], n: int) -> int | None:
    """The smallest size >= n, or None when n is above all of them."""
    index = bisect.bisect_left(sizes, n)
    return sizes[index] if index < len(sizes) else None


@dataclass(frozen=True)
class CUDAGraphPlan:
    """The resolved CUDA-graph settings of an engine."""

    mode: CUDAGraphMode
    piecewise_sizes: tuple[int, ...] = ()
    full_sizes: tuple[int, ...] = ()

    @classmethod
    def resolve(cls, config: EngineConfig) -> "CUDAGraphPlan":
        compilation = config.compilation
        mode = compilation.cudagraph_mode
        if config.device.type != "cuda" or mode is CUDAGraphMode.NONE:
            return cls(CUDAGraphMode.NONE)
        piecewise_compiled = compilation.level == CompilationLevel.PIECEWISE
        if mode is None:
            mode = CUDAGraphMode.FULL_AND_PIECEWISE if piecewise_compiled else CUDAGraphMode.FULL
        if mode is CUDAGraphMode.FULL_DECODE_ONLY:
            mode = CUDAGraphMode.FULL  # one mode here (see CUDAGraphMode)
        if mode in (CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL_AND_PIECEWISE) and not piecewise_compiled:
            raise ValueError(
                f"cudagraph_mode={mode.value} captures the pieces between attention ops, which exist only "
                f"at compilation level 3 (got level {int(compilation.level)}); use cudagraph_mode='FULL' "
                f"or 'NONE', or level 3"
            )
        sizes = compilation.cudagraph_capture_sizes or default_capture_sizes(config.scheduler.max_num_seqs)
        max_tokens = config.scheduler.max_num_batched_tokens
        if compilation.max_cudagraph_capture_size is not None:
            max_tokens = min(max_tokens, compilation.max_cudagraph_capture_size)
        sizes = tuple(size for size in sizes if size <= max_tokens)
        # A decode-only step has at most max_num_seqs tokens.
        full = tuple(size for size in sizes if size <= config.scheduler.max_num_seqs)
        return cls(
            mode,
            piecewise_sizes=sizes if mode in (CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL_AND_PIECEWISE) else (),
            full_sizes=full if mode in (CUDAGraphMode.FULL, CUDAGraphMode.FULL_AND_PIECEWISE) else (),
        )

    @property
    def enabled(self) -> bool:
        return bool(self.piecewise_sizes or self.full_sizes)

    def dispatch(self, num_tokens: int, num_requests: int, full_allowed: bool = True) -> GraphDispatch:
        """Pick the graph for a step of ``num_tokens`` tokens from ``num_requests`` requests
        (``full_allowed=False``: the step needs logits a FULL graph does not compute)."""
        decode_only = num_tokens == num_requests
        if decode_only and full_allowed:
            size = padded_size(self.full_sizes, num_tokens)
            if size is not None:
                return GraphDispatch(CUDAGraphMode.FULL, size, size)
        size = padded_size(self.piecewise_sizes, num_tokens)
        if size is not None:
            # A decode-only step keeps one token per request (the decode kernel's path).
            return GraphDispatch(CUDAGraphMode.PIECEWISE, size, size if decode_only else num_requests)
        return GraphDispatch(CUDAGraphMode.NONE, num_tokens, num_requests)


# Runs one step of ``size`` idle requests in the given mode; with a pool, graphs of that mode capture.
RunIdleStep = Callable[[int, CUDAGraphMode, object], None]


def capture_graphs(plan: CUDAGraphPlan, run_idle_step: RunIdleStep, report: CompileReport) -> None:
    """Capture every planned size, largest first, into one memory pool."""
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    start = time.perf_counter()
    pool = torch.cuda.graph_pool_handle()
    for mode, sizes in ((CUDAGraphMode.PIECEWISE, plan.piecewise_sizes), (CUDAGraphMode.FULL, plan.full_sizes)):
        for size in reversed(sizes):
            run_idle_step(size, CUDAGraphMode.NONE, None)  # warm-up
            run_idle_step(size, mode, pool)
    torch.cuda.synchronize()
    report.cudagraph_capture_seconds = round(time.perf_counter() - start, 2)
    report.cudagraph_memory_bytes = max(free_before - torch.cuda.mem_get_info()[0], 0)
    report.cudagraph_sizes = {
        mode.value: list(sizes)
        for mode, sizes in ((CUDAGraphMode.FULL, plan.full_sizes), (CUDAGraphMode.PIECEWISE, plan.piecewise_sizes))
        if sizes
    }
    logger.info(
        "CUDA graphs (%s): %d full, %d piecewise sizes captured in %.1f s, %.2f GiB",
        plan.mode.value, len(plan.full_sizes), len(plan.piecewise_sizes),
        report.cudagraph_capture_seconds, report.cudagraph_memory_bytes / 2**30,
    )
