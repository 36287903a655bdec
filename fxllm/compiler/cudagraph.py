"""Stage 4: wrap for CUDA graphs.

``CUDAGraphWrapper(runnable, mode)`` replays one captured graph per padded step size
wherever the runnable is called in a step of its mode: PIECEWISE wraps each compiled
piece between attention ops, FULL wraps the runner's whole forward (attention included)
with its logits. Graphs are a wrapper around what the compiler produced, never part of
the compiled code: the forward context says, step by step, which mode runs and whether
this call captures (it then holds the engine's graph memory pool).

All graphs of an engine share one memory pool and are captured largest first, so
smaller graphs reuse the larger ones' memory. A graph's outputs are kept only as
non-owning views: they live in the pool and are valid until the next replay, which
is all a step needs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from fxllm.config import CUDAGraphMode
from fxllm.forward_context import get_forward_context


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
class _Captured:
    graph: torch.cuda.CUDAGraph
    output: Any  # non-owning views of the graph's outputs
    input_addresses: list[int]  # data pointers of the tensor inputs at capture


def _addresses(args: tuple) -> list[int]:
    return [a.data_ptr() for a in args if isinstance(a, torch.Tensor)]


class CUDAGraphWrapper(nn.Module):
    """``runnable``, replayed from a CUDA graph per padded step size in steps of ``mode``.

    Outside such steps (no graph, or the other mode: a PIECEWISE piece inside a FULL
    capture) it simply runs. Replay relies on every tensor input sitting where it sat at
    capture: parameters, the runner's persistent input buffers, and outputs of the graphs
    before it. ``check_addresses`` verifies that on every replay (a debugging aid: it costs
    a data_ptr() per input)."""

    def __init__(self, runnable: Callable[..., Any], mode: CUDAGraphMode, check_addresses: bool = False):
        super().__init__()
        if mode not in (CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL):
            raise ValueError(f"a CUDA-graph wrapper replays PIECEWISE or FULL steps, not {mode.value}")
        self.runnable = runnable
        self.mode = mode
        self.check_addresses = check_addresses
        self.graphs: dict[int, _Captured] = {}

    def forward(self, *args: Any) -> Any:
        context = get_forward_context()
        dispatch = context.cudagraph
        if dispatch is None or dispatch.mode is not self.mode:
            return self.runnable(*args)
        captured = self.graphs.get(dispatch.num_tokens)
        if captured is None:
            if context.capture_pool is None:
                raise RuntimeError(f"no {self.mode.value} CUDA graph was captured for {dispatch.num_tokens} tokens")
            return self._capture(dispatch.num_tokens, context.capture_pool, args)
        if self.check_addresses and _addresses(args) != captured.input_addresses:
            raise RuntimeError(
                f"inputs moved since the {self.mode.value} CUDA graph of {dispatch.num_tokens} tokens was "
                "captured: replaying would read stale memory"
            )
        captured.graph.replay()
        return captured.output

    def release(self) -> None:
        """Drop the captured graphs: a graph holding a collective keeps its NCCL communicator
        busy, so they must go before the process group is destroyed (which otherwise waits forever)."""
        for captured in self.graphs.values():
            captured.graph.reset()
        self.graphs.clear()

    def _capture(self, size: int, pool: Any, args: tuple) -> Any:
        graph = torch.cuda.CUDAGraph()
        with capturing(graph, pool):
            output = self.runnable(*args)
        self.graphs[size] = _Captured(graph, non_owning_tree(output), _addresses(args))
        return output
