"""Reference attention in plain torch: the CPU backend and the oracle for kernels.

Decode requests (one query token) are batched into one padded SDPA call;
prefill chunks run one request at a time with a causal mask offset by the
request's cached prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fxllm.runtime.attention.layer import AttentionSpec
from fxllm.runtime.forward_context import AttentionMetadata


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


def _gather_context(
    cache: torch.Tensor, block_tables: torch.Tensor, num_blocks: int
) -> torch.Tensor:
    """[B, num_blocks * block_size, kv_heads, head_dim] for the first num_blocks of each table."""
    blocks = cache[block_tables[:, :num_blocks].long()]  # [B, num_blocks, block_size, kv_heads, head_dim]
    return blocks.flatten(1, 2)


class TorchAttentionBackend:
    name = "torch"

    def forward(
        self,
        spec: AttentionSpec,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        out: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> None:
        write_kv_cache(kv_cache, key, value, metadata.slot_mapping)
        block_size = kv_cache.shape[2]
        starts = metadata.query_start_loc_cpu
        seq_lens = metadata.seq_lens_cpu
        decode_rows = [i for i in range(len(seq_lens)) if starts[i + 1] - starts[i] == 1]
        if decode_rows:
            self._decode(spec, query, out, kv_cache, metadata, decode_rows, block_size)
        for i in range(len(seq_lens)):
            query_len = starts[i + 1] - starts[i]
            if query_len > 1:
                self._prefill(spec, query, out, kv_cache, metadata, i, block_size)

    @staticmethod
    def _decode(spec, query, out, kv_cache, metadata, rows, block_size) -> None:
        starts = metadata.query_start_loc_cpu
        token_index = torch.tensor([starts[i] for i in rows], device=query.device)
        row_index = torch.tensor(rows, device=query.device)
        lens = [metadata.seq_lens_cpu[i] for i in rows]
        num_blocks = -(-max(lens) // block_size)
        tables = metadata.block_tables[row_index]
        positions = torch.arange(num_blocks * block_size, device=query.device)
        lens_tensor = torch.tensor(lens, device=query.device)
        valid = positions[None, :] < lens_tensor[:, None]  # [D, L]
        # Slots past a sequence's length hold stale or uninitialized memory (maybe NaN):
        # zero them, since a masked NaN still poisons the softmax and the weighted sum.
        keys = _gather_context(kv_cache[0], tables, num_blocks).masked_fill(~valid[:, :, None, None], 0)
        values = _gather_context(kv_cache[1], tables, num_blocks).masked_fill(~valid[:, :, None, None], 0)
        mask = valid[:, None, None, :]  # [D, 1, 1, L]
        q = query[token_index].unsqueeze(2)  # [D, heads, 1, head_dim]
        result = F.scaled_dot_product_attention(
            q, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, scale=spec.scale, enable_gqa=True
        )
        out[token_index] = result.squeeze(2).to(out.dtype)

    @staticmethod
    def _prefill(spec, query, out, kv_cache, metadata, row, block_size) -> None:
        start, end = metadata.query_start_loc_cpu[row], metadata.query_start_loc_cpu[row + 1]
        query_len = end - start
        seq_len = metadata.seq_lens_cpu[row]
        num_blocks = -(-seq_len // block_size)
        table = metadata.block_tables[row : row + 1]
        keys = _gather_context(kv_cache[0], table, num_blocks)[0, :seq_len]  # [L, kv_heads, head_dim]
        values = _gather_context(kv_cache[1], table, num_blocks)[0, :seq_len]
        # Query j sits at position seq_len - query_len + j and sees keys up to it.
        mask = torch.ones(query_len, seq_len, dtype=torch.bool, device=query.device).tril(
            diagonal=seq_len - query_len
        )
        result = F.scaled_dot_product_attention(
            query[start:end].transpose(0, 1),
            keys.transpose(0, 1),
            values.transpose(0, 1),
            attn_mask=mask,
            scale=spec.scale,
            enable_gqa=True,
        )
        out[start:end] = result.transpose(0, 1).to(out.dtype)
