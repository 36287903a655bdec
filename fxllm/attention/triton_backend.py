"""Paged attention with Triton kernels: the GPU backend.

Reads only device tensors of the metadata (never its host lists), launches with grids
from shapes, and reuses its scratch buffers, so a step can be captured in a CUDA
graph (docs/ARCHITECTURE.md, contract 3). A step whose token count equals its request count is
all decodes (the scheduler gives every request at least one token) and takes the
split (flash-decoding) path; any other step runs the unified kernel. Pooling steps
(no KV cache) run the torch reference's per-request attention.
"""

from __future__ import annotations

import torch

from fxllm.attention import triton_kernels
from fxllm.attention.layer import AttentionSpec
from fxllm.attention.torch_backend import attention_without_cache
from fxllm.forward_context import AttentionMetadata

ScratchKey = tuple[torch.device, int, int, int, int]  # device, B, num_heads, head_dim, num_splits
Scratch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # partial acc, max, sum (fp32)


class TritonAttentionBackend:
    name = "triton"
    compiles_on_first_use = True

    def __init__(self) -> None:
        # Split-decode scratch, one set per shape and shared by all layers (they run one
        # after another). Never freed: a captured CUDA graph keeps pointing at it.
        self._decode_scratch: dict[ScratchKey, Scratch] = {}

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
        if kv_cache is None:
            attention_without_cache(spec, query, key, value, out, metadata)
            return
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        sliding_window = spec.sliding_window
        args = (query, key_cache, value_cache, out, metadata.block_tables, metadata.seq_lens, metadata.query_start_loc)
        if query.shape[0] == metadata.seq_lens.shape[0]:
            # The decode kernel caches the step's K/V itself: one launch fewer per layer.
            scratch = self._scratch(spec, query, metadata.block_tables, kv_cache.shape[2])
            new_kv = (key, value, metadata.slot_mapping)
            triton_kernels.split_decode_attention(*args, spec.scale, sliding_window, *scratch, new_kv=new_kv)
        else:
            triton_kernels.write_kv_cache(key, value, key_cache, value_cache, metadata.slot_mapping)
            triton_kernels.unified_attention(*args, spec.scale, sliding_window)

    def _scratch(
        self, spec: AttentionSpec, query: torch.Tensor, block_tables: torch.Tensor, block_size: int
    ) -> Scratch:
        num_requests = query.shape[0]
        num_splits = triton_kernels.decode_num_splits(
            num_requests, spec.num_kv_heads, block_tables.shape[1], block_size, query.device
        )
        key = (query.device, num_requests, spec.num_heads, spec.head_dim, num_splits)
        if key not in self._decode_scratch:
            self._decode_scratch[key] = triton_kernels.empty_decode_scratch(
                num_requests, spec.num_heads, spec.head_dim, num_splits, query.device
            )
        return self._decode_scratch[key]
