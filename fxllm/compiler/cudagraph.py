"""Stage 4: wrap for CUDA graphs (DESIGN.md contract 6).

Which steps run as graphs (``CUDAGraphPlan``), and the wrapper that captures and
replays one compiled piece per padded size in PIECEWISE mode. Graphs are a wrapper
around what the compiler produced, never part of the compiled code: the runner
decides per step (through the forward context) whether pieces replay, capture or
simply run.

All graphs of an engine share one memory pool and are captured largest first, so
smaller graphs reuse the larger ones' memory. A graph's outputs are kept only as
non-owning views: they live in the pool and are valid until the next replay, which
is all a step needs.
"""

from __future__ import annotations

import bisect
import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from fxllm.config import CompilationLevel, CUDAGraphMode, EngineConfig
from fxllm.forward_context import get_forward_context

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
class GraphDispatch:
    """How one step runs: its mode (NONE, PIECEWISE or FULL) and padded sizes."""

    mode: CUDAGraphMode
    num_tokens: int  # T after padding
    num_requests: int  # B after padding (decode-only steps pad with empty requests)


@dataclass(frozen=True)
class CUDAGraphPlan:
    """The resolved CUDA-graph settings of an engine.

    FULL graphs serve decode-only steps (one token per request; the whole forward,
    attention included); PIECEWISE graphs serve any step (compiled pieces captured,
    attention eager between them). Steps above the largest size run without graphs.
    """

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
        if mode in (CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL_AND_PIECEWISE) and not piecewise_compiled:
            raise ValueError(
                f"cudagraph_mode={mode.value} captures the pieces between attention ops, which exist only "
                f"at compilation level 3 (got level {int(compilation.level)}); use cudagraph_mode='FULL' "
                f"or 'NONE', or level 3"
            )
        sizes = compilation.cudagraph_capture_sizes or default_capture_sizes(config.scheduler.max_num_seqs)
        max_tokens = config.scheduler.max_num_batched_tokens
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


@dataclass(frozen=True)
class GraphStep:
    """What the forward context tells graph wrappers about the running step."""

    mode: CUDAGraphMode  # PIECEWISE: pieces replay (or capture); FULL: the whole forward is being captured
    num_tokens: int
    pool: Any = None  # set while capturing: the engine's graph memory pool


def non_owning(tensor: torch.Tensor) -> torch.Tensor:
    """A view of ``tensor``'s memory that does not keep it allocated.

    Graph outputs live in the shared pool; holding them strongly would keep every
    size's activations allocated at once instead of letting smaller graphs reuse them.
    """
    storage = tensor.untyped_storage()
    alias = torch._C._construct_storage_from_data_pointer(storage.data_ptr(), tensor.device, storage.nbytes())
    return torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(
        alias, tensor.storage_offset(), tensor.shape, tensor.stride()
    )


def non_owning_tree(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return non_owning(value)
    if isinstance(value, (list, tuple)):
        return type(value)(non_owning_tree(v) for v in value)
    return value


_capture_streams: dict[torch.device, torch.cuda.Stream] = {}


@contextlib.contextmanager
def capturing(graph: torch.cuda.CUDAGraph, pool: Any) -> Iterator[None]:
    """Capture into ``graph`` on a side stream, as ``torch.cuda.graph`` does but without its
    gc.collect() and empty_cache() on every capture (an engine captures hundreds of graphs)."""
    device = torch.device("cuda", torch.cuda.current_device())
    stream = _capture_streams.setdefault(device, torch.cuda.Stream(device))
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool)
        try:
            yield
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)


@dataclass
class _CapturedPiece:
    graph: torch.cuda.CUDAGraph
    output: Any  # non-owning views of the graph's outputs
    input_addresses: list[int]  # data pointers of the tensor inputs at capture


def _addresses(args: tuple) -> list[int]:
    return [a.data_ptr() for a in args if isinstance(a, torch.Tensor)]


class PiecewiseCUDAGraph(nn.Module):
    """One compiled piece, replayed from a CUDA graph per padded step size.

    Replay relies on every tensor input sitting where it sat at capture: parameters,
    the runner's static input buffers, and outputs of the pieces before it (which are
    graph outputs, so static). ``check_addresses`` verifies that on every replay (a
    debugging aid: it costs a data_ptr() per input per piece).
    """

    def __init__(self, runnable: Callable[..., Any], check_addresses: bool = False):
        super().__init__()
        self.runnable = runnable
        self.check_addresses = check_addresses
        self.graphs: dict[int, _CapturedPiece] = {}

    def forward(self, *args: Any) -> Any:
        step = get_forward_context().cudagraph
        if step is None or step.mode is not CUDAGraphMode.PIECEWISE:
            return self.runnable(*args)
        captured = self.graphs.get(step.num_tokens)
        if captured is None:
            if step.pool is None:
                raise RuntimeError(f"no piecewise CUDA graph was captured for {step.num_tokens} tokens")
            return self._capture(step, args)
        if self.check_addresses and _addresses(args) != captured.input_addresses:
            raise RuntimeError(
                f"a piece's inputs moved since its CUDA graph was captured (size {step.num_tokens}): "
                "replaying would read stale memory"
            )
        captured.graph.replay()
        return captured.output

    def release(self) -> None:
        """Drop the captured graphs: a graph holding a collective keeps its NCCL communicator
        busy, so they must go before the process group is destroyed (which otherwise waits forever)."""
        for captured in self.graphs.values():
            captured.graph.reset()
        self.graphs.clear()

    def _capture(self, step: GraphStep, args: tuple) -> Any:
        graph = torch.cuda.CUDAGraph()
        with capturing(graph, step.pool):
            output = self.runnable(*args)
        self.graphs[step.num_tokens] = _CapturedPiece(graph, non_owning_tree(output), _addresses(args))
        return output
