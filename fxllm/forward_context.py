"""The forward context: the one piece of ambient state, set around exactly one forward.

The runner enters ``set_forward_context`` around each model call; the attention op
reads per-step metadata and its layer's KV cache from here, so the traced graph
sees only tensors and a layer name (docs/ARCHITECTURE.md, contract 3).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch

from fxllm.config import CUDAGraphMode

if TYPE_CHECKING:
    from fxllm.attention.backend import AttentionBackend
    from fxllm.attention.layer import AttentionSpec


@dataclass
class AttentionMetadata:
    """Per-step attention inputs; B = requests in the step, T = tokens in the step."""

    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset, -1 = padding
    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int32
    seq_lens: torch.Tensor  # [B] int32: context length after this step's tokens
    query_start_loc: torch.Tensor  # [B + 1] int32: offsets of each request's tokens in T
    # Host copies for backends that loop over requests (the torch reference backend).
    seq_lens_cpu: list[int]
    query_start_loc_cpu: list[int]


@dataclass(frozen=True)
class GraphDispatch:
    """How one step runs: its CUDA-graph mode (NONE, PIECEWISE or FULL) and padded sizes."""

    mode: CUDAGraphMode
    num_tokens: int  # T after padding
    num_requests: int  # B after padding (decode-only steps pad with empty requests)


@dataclass
class ForwardContext:
    attn_metadata: AttentionMetadata | None  # None in a profiling run: attention is skipped
    kv_caches: Mapping[str, torch.Tensor]  # layer_name -> [2, num_blocks, block_size, kv_heads, head_dim]
    layers: Mapping[str, "AttentionSpec"]
    backend: "AttentionBackend"
    cudagraph: GraphDispatch | None = None  # the step's graph mode: wrappers of that mode replay (or capture)
    capture_pool: Any = None  # set while capturing: the engine's graph memory pool


# Per thread: engines driven from different threads never see each other's forwards.
_local = threading.local()


@contextmanager
def set_forward_context(context: ForwardContext) -> Iterator[None]:
    if getattr(_local, "context", None) is not None:
        raise RuntimeError("a forward context is already set in this thread: forwards cannot nest")
    _local.context = context
    try:
        yield
    finally:
        _local.context = None


def get_forward_context() -> ForwardContext:
    context = getattr(_local, "context", None)
    if context is None:
        raise RuntimeError(
            "the attention op ran outside a forward context: call the model through "
            "fxllm's ModelRunner, which sets one around each forward"
        )
    return context
