"""The Triton kernel behind ``fxllm::qk_norm_rope`` on CUDA, and its launcher.

One launch for both tensors: program (token, head) normalizes and rotates one row
of head_dim values, a query head for head < num_heads, else a key head (one warp per
row, as vLLM's fused Q/K-norm + RoPE CUDA kernel). The neox rotation pairs dim d
with d +- head_dim / 2, which the program loads a second time (a cache hit) instead
of shuffling registers.

Numerics follow the unfused graph as Inductor compiles it: fp32 throughout, rounded
to the input dtype where RMSNorm casts back (``.to(input_dtype)``) and at the store.
Inputs may have any strides (query and key are views into the fused QKV output).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# A program owns one row of head_dim (<= 256) values: one warp holds it in registers.
NUM_WARPS = 1


@triton.jit
def _qk_norm_rope_kernel(
    query_ptr,
    key_ptr,
    query_out_ptr,
    key_out_ptr,
    query_weight_ptr,
    key_weight_ptr,
    cos_ptr,
    sin_ptr,
    stride_query_token,
    stride_query_head,
    stride_query_dim,
    stride_key_token,
    stride_key_head,
    stride_key_dim,
    stride_cos_token,
    stride_cos_dim,
    stride_sin_token,
    stride_sin_dim,
    eps,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    dims = tl.arange(0, HEAD_PAD)
    valid = dims < HEAD_DIM
    half: tl.constexpr = HEAD_DIM // 2
    first_half = dims < half
    # rotate_half: out[d] = -x[d + half] in the first half, x[d - half] in the second.
    partner = tl.where(first_half, dims + half, dims - half)
    sign = tl.where(first_half, -1.0, 1.0)

    if head < NUM_HEADS:
        row = query_ptr + token * stride_query_token + head * stride_query_head
        x_ptrs = row + dims * stride_query_dim
        partner_ptrs = row + partner * stride_query_dim
        weight_ptr = query_weight_ptr
        out_ptrs = query_out_ptr + (token * NUM_HEADS + head) * HEAD_DIM + dims
    else:
        kv_head = head - NUM_HEADS
        row = key_ptr + token * stride_key_token + kv_head * stride_key_head
        x_ptrs = row + dims * stride_key_dim
        partner_ptrs = row + partner * stride_key_dim
        weight_ptr = key_weight_ptr
        out_ptrs = key_out_ptr + (token * NUM_KV_HEADS + kv_head) * HEAD_DIM + dims

    x = tl.load(x_ptrs, mask=valid, other=0.0)
    upcast = x.to(tl.float32)
    upcast_partner = tl.load(partner_ptrs, mask=valid, other=0.0).to(tl.float32)
    weight = tl.load(weight_ptr + dims, mask=valid, other=0.0).to(tl.float32)
    weight_partner = tl.load(weight_ptr + partner, mask=valid, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(upcast * upcast, axis=0) / HEAD_DIM + eps)
    normed = weight * (upcast * rstd).to(x.dtype).to(tl.float32)
    normed_partner = weight_partner * (upcast_partner * rstd).to(x.dtype).to(tl.float32)

    cos = tl.load(cos_ptr + token * stride_cos_token + dims * stride_cos_dim, mask=valid, other=0.0)
    sin = tl.load(sin_ptr + token * stride_sin_token + dims * stride_sin_dim, mask=valid, other=0.0)
    out = normed * cos.to(tl.float32) + sign * normed_partner * sin.to(tl.float32)
    tl.store(out_ptrs, out.to(x.dtype), mask=valid)


def qk_norm_rope_triton(
    query: torch.Tensor,  # [T, num_heads, head_dim]
    key: torch.Tensor,  # [T, num_kv_heads, head_dim]
    query_weight: torch.Tensor,  # [head_dim]
    key_weight: torch.Tensor,  # [head_dim]
    cos: torch.Tensor,  # [T, 1, head_dim]
    sin: torch.Tensor,  # [T, 1, head_dim]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New contiguous (query, key): RMSNorm over head_dim, then neox RoPE."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    if query.dtype != key.dtype:
        raise ValueError(f"query and key must share a dtype, got {query.dtype} and {key.dtype}")
    query_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    key_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    if num_tokens == 0:
        return query_out, key_out
    _qk_norm_rope_kernel[(num_tokens, num_heads + num_kv_heads)](
        query,
        key,
        query_out,
        key_out,
        query_weight.contiguous(),
        key_weight.contiguous(),
        cos,
        sin,
        *query.stride(),
        *key.stride(),
        cos.stride(0),
        cos.stride(2),
        sin.stride(0),
        sin.stride(2),
        eps,
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEAD_PAD=triton.next_power_of_2(head_dim),
        num_warps=NUM_WARPS,
    )
    return query_out, key_out
