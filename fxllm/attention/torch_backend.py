"""Reference attention in plain torch: the CPU backend and the oracle for kernels.

Decode requests (one query token) are batched into one padded SDPA call;
prefill chunks run one request at a time with a causal mask offset by the
request's cached prefix. Without a KV cache (pooling), each request attends over
its own tokens of the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fxllm.attention.layer import AttentionSpec
from fxllm.forward_context import AttentionMetadata


def write_kv_cache(
    kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter this step's K/V into their slots; slot -1 (padding) is skipped."""
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    key_cache = kv_cache[0].view(-1, num_kv_heads, head_dim)
    value_cache = kv_cache[1].view(-1, num_kv_heads, head_dim)
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    key_cache.index_copy_(0, slots, key[valid])
    value_cache.index_copy_(0, slots, value[valid])


def attention_without_cache(
    spec: AttentionSpec, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor,
    metadata: AttentionMetadata,
) -> None:
    """Whole prompts, K/V straight from this step: one SDPA per request, bidirectional for an
    encoder, causal (and windowed) for a decoder. The GPU backend uses it too: pooling
    steps are not captured in CUDA graphs, so host-side request offsets are fine here."""
    starts = metadata.query_start_loc_cpu
    for start, end in zip(starts[:-1], starts[1:]):
        length = end - start
        mask = _causal_mask(length, length, spec.sliding_window, query.device) if spec.causal else None
        out[start:end] = _attend(spec, query[start:end], key[start:end], value[start:end], mask).to(out.dtype)


def _causal_mask(query_len: int, seq_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[query_len, seq_len] bool: query j sits at position seq_len - query_len + j and sees keys
    up to it (and, with a window W, none more than W - 1 positions back)."""
    mask = torch.ones(query_len, seq_len, dtype=torch.bool, device=device).tril(diagonal=seq_len - query_len)
    if window is not None:
        mask = mask.triu(diagonal=seq_len - query_len - window + 1)
    return mask


def _attend(
    spec: AttentionSpec, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """SDPA over token-major [tokens, heads, head_dim] inputs, token-major out."""
    result = F.scaled_dot_product_attention(
        query.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask, scale=spec.scale,
        enable_gqa=True,
    )
    return result.transpose(0, 1)


def _gather_context(
    cache: torch.Tensor, block_tables: torch.Tensor, num_blocks: int
) -> torch.Tensor:
    """[B, num_blocks * block_size, kv_heads, head_dim] for the first num_blocks of each table."""
    blocks = cache[block_tables[:, :num_blocks].long()]  # [B, num_blocks, block_size, kv_heads, head_dim]
    return blocks.flatten(1, 2)


@dataclass
class _DecodePlan:
    """Gather indices for the step's decode rows, built once per step and shared by all layers."""

    token_index: torch.Tensor  # [D]: each decode row's query token in T
    slot_index: torch.Tensor  # [D, L]: cache slot of each context position; past the length, the
    # row's first slot, so the gathered values stay finite (stale or uninitialized memory can be NaN)
    mask: torch.Tensor  # [D, 1, 1, L] bool: position < length
    positions: torch.Tensor  # [L]
    lengths: torch.Tensor  # [D]

    @classmethod
    def build(cls, metadata: AttentionMetadata, rows: list[int], block_size: int) -> "_DecodePlan":
        device = metadata.block_tables.device
        starts = metadata.query_start_loc_cpu
        lengths = torch.tensor([metadata.seq_lens_cpu[i] for i in rows], device=device)
        context = max(metadata.seq_lens_cpu[i] for i in rows)
        positions = torch.arange(context, device=device)
        tables = metadata.block_tables[torch.tensor(rows, device=device)].long()
        slots = tables[:, positions // block_size] * block_size + positions % block_size  # [D, L]
        valid = positions[None, :] < lengths[:, None]
        return cls(
            token_index=torch.tensor([starts[i] for i in rows], device=device),
            slot_index=torch.where(valid, slots, slots[:, :1]),
            mask=valid[:, None, None, :],
            positions=positions,
            lengths=lengths,
        )

    def window_mask(self, window: int | None) -> torch.Tensor:
        """The mask for a layer: the decode token (at length - 1) sees the last ``window`` keys."""
        if window is None:
            return self.mask
        recent = self.positions[None, :] >= (self.lengths - window)[:, None]
        return self.mask & recent[:, None, None, :]


class TorchAttentionBackend:
    name = "torch"
    compiles_on_first_use = False

    def __init__(self) -> None:
        self._plan: tuple[AttentionMetadata, _DecodePlan] | None = None

    def forward(
        self,
        spec: AttentionSpec,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        out: torch.Tensor,
        kv_cache: torch.Tensor | None,
        metadata: AttentionMetadata,
    ) -> None:
        if kv_cache is None:
            attention_without_cache(spec, query, key, value, out, metadata)
            return
        write_kv_cache(kv_cache, key, value, metadata.slot_mapping)
        block_size = kv_cache.shape[2]
        starts = metadata.query_start_loc_cpu
        seq_lens = metadata.seq_lens_cpu
        if self._plan is None or self._plan[0] is not metadata:  # first layer of a new step
            decode_rows = [i for i in range(len(seq_lens)) if starts[i + 1] - starts[i] == 1]
            self._plan = (metadata, _DecodePlan.build(metadata, decode_rows, block_size) if decode_rows else None)
        plan = self._plan[1]
        if plan is not None:
            self._decode(spec, query, out, kv_cache, plan)
        for i in range(len(seq_lens)):
            query_len = starts[i + 1] - starts[i]
            if query_len > 1:
                self._prefill(spec, query, out, kv_cache, metadata, i, block_size)

    @staticmethod
    def _decode(spec, query, out, kv_cache, plan: _DecodePlan) -> None:
        num_kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
        # index_select on the flat slot list: several times faster on CPU than indexing with
        # the 2-D index tensor, which takes the general advanced-indexing path.
        shape = (*plan.slot_index.shape, num_kv_heads, head_dim)  # [D, L, kv_heads, head_dim]
        slots = plan.slot_index.flatten()
        keys = kv_cache[0].view(-1, num_kv_heads, head_dim).index_select(0, slots).view(shape)
        values = kv_cache[1].view(-1, num_kv_heads, head_dim).index_select(0, slots).view(shape)
        q = query[plan.token_index].unsqueeze(2)  # [D, heads, 1, head_dim]
        result = F.scaled_dot_product_attention(
            q, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=plan.window_mask(spec.sliding_window),
            scale=spec.scale, enable_gqa=True
        )
        out[plan.token_index] = result.squeeze(2).to(out.dtype)

    @staticmethod
    def _prefill(spec, query, out, kv_cache, metadata, row, block_size) -> None:
        start, end = metadata.query_start_loc_cpu[row], metadata.query_start_loc_cpu[row + 1]
        query_len = end - start
        seq_len = metadata.seq_lens_cpu[row]
        num_blocks = -(-seq_len // block_size)
        table = metadata.block_tables[row : row + 1]
        keys = _gather_context(kv_cache[0], table, num_blocks)[0, :seq_len]  # [L, kv_heads, head_dim]
        values = _gather_context(kv_cache[1], table, num_blocks)[0, :seq_len]
        mask = _causal_mask(query_len, seq_len, spec.sliding_window, query.device)
        out[start:end] = _attend(spec, query[start:end], keys, values, mask).to(out.dtype)
