"""The torch reference attention op against a dense causal attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fxllm.attention.layer import AttentionSpec
from fxllm.attention.torch_backend import TorchAttentionBackend
from fxllm.forward_context import AttentionMetadata

BLOCK = 4


def _dense(query, key, value, scale):
    """Causal attention over one whole sequence; [L, heads, dim] in and out."""
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), is_causal=True, scale=scale, enable_gqa=True
    )
    return out.transpose(0, 1)


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_chunked_steps_through_the_paged_cache_equal_dense_attention(num_heads, num_kv_heads):
    torch.manual_seed(0)
    head_dim, num_blocks = 8, 16
    spec = AttentionSpec("layer", num_heads, num_kv_heads, head_dim, head_dim**-0.5)
    # NaN-filled cache: no slot past a sequence's length may reach the output.
    kv_cache = torch.full((2, num_blocks, BLOCK, num_kv_heads, head_dim), float("nan"))
    lengths = [11, 3, 7]
    tables = [[5, 2, 9], [0], [14, 7]]  # scattered blocks per sequence
    q = [torch.randn(n, num_heads, head_dim) for n in lengths]
    k = [torch.randn(n, num_kv_heads, head_dim) for n in lengths]
    v = [torch.randn(n, num_kv_heads, head_dim) for n in lengths]
    expected = [_dense(q[i], k[i], v[i], spec.scale) for i in range(3)]
    backend = TorchAttentionBackend()
    # Step 1: a prefill chunk of each; step 2: the rest (decodes where one token is left).
    done = [0, 0, 0]
    for chunk in ([6, 2, 6], [5, 1, 1]):
        rows = [i for i in range(3) if chunk[i]]
        starts = [0]
        slots = []
        for i in rows:
            positions = range(done[i], done[i] + chunk[i])
            slots += [tables[i][p // BLOCK] * BLOCK + p % BLOCK for p in positions]
            starts.append(starts[-1] + chunk[i])
        seq_lens = [done[i] + chunk[i] for i in rows]
        width = max(len(t) for t in tables)
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slots),
            block_tables=torch.tensor([tables[i] + [0] * (width - len(tables[i])) for i in rows], dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens_cpu=seq_lens,
            query_start_loc_cpu=starts,
        )
        take = lambda xs: torch.cat([xs[i][done[i] : done[i] + chunk[i]] for i in rows])
        out = torch.empty(len(slots), num_heads, head_dim)
        backend.forward(spec, take(q), take(k), take(v), out, kv_cache, metadata)
        for row, i in enumerate(rows):
            got = out[starts[row] : starts[row + 1]]
            torch.testing.assert_close(got, expected[i][done[i] : done[i] + chunk[i]], rtol=1e-5, atol=1e-5)
        for i in rows:
            done[i] += chunk[i]
    assert done == lengths
