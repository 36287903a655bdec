"""The interface every attention backend implements."""

from __future__ import annotations

from typing import Protocol

import torch

from fxllm.attention.layer import AttentionSpec
from fxllm.forward_context import AttentionMetadata


class AttentionBackend(Protocol):
    name: str
    # Whether kernels are built on first use (Triton's JIT): the engine then runs a warm-up
    # step at start-up, so that the first ``generate`` does not pay for it.
    compiles_on_first_use: bool

    def forward(
        self,
        spec: AttentionSpec,
        query: torch.Tensor,  # [T, num_heads, head_dim]
        key: torch.Tensor,  # [T, num_kv_heads, head_dim]
        value: torch.Tensor,  # [T, num_kv_heads, head_dim]
        out: torch.Tensor,  # [T, num_heads, head_dim], written in place
        kv_cache: torch.Tensor | None,  # [2, num_blocks, block_size, num_kv_heads, head_dim]; None: no cache
        metadata: AttentionMetadata,
    ) -> None:
        """Write this step's K/V into the paged cache, then attention into ``out``. Without a
        cache (pooling: whole prompts), each request attends over its own ``key``/``value`` rows."""
        ...
