"""``fxllm::fused_moe``: one MoE layer's routing and experts as one custom op.

Dynamo sees one node whatever the device, the step's size or the routing: hidden states
``[T, H]`` and router logits ``[T, E]`` in, ``[T, H]`` out. It is not a splitting op: the
piecewise compiler keeps it inside its piece, and a FULL CUDA graph of a decode step holds
it, which the CUDA path allows because it never syncs with the host and sizes every buffer
from T, top_k and E alone (triton_routing.py, triton_experts.py). On other devices the
experts run in plain torch (torch_experts.py). Under tensor parallelism each rank holds a
slice of every expert's intermediate dim, so the output is a partial sum the TP pass
all-reduces, as it does a row-parallel linear's. FP8 experts (``quantization="fp8"``) come
with one float32 scale per output row of each expert's projections; both paths multiply
in the activation dtype (the CUDA path widens FP8 weight tiles in registers).
"""

from __future__ import annotations

from typing import Optional

import torch

from fxllm.models.moe.torch_experts import torch_fused_moe


@torch.library.custom_op("fxllm::fused_moe", mutates_args=())
def fused_moe(
    hidden: torch.Tensor,  # [T, H]
    router_logits: torch.Tensor,  # [T, E]
    w13: torch.Tensor,  # [E, 2I, H]: each expert's gate rows, then its up rows
    w2: torch.Tensor,  # [E, H, I]
    top_k: int,
    renormalize: bool,
    w13_scale: Optional[torch.Tensor] = None,  # [E, 2I] float32 where w13 is FP8
    w2_scale: Optional[torch.Tensor] = None,  # [E, H] float32 where w2 is FP8
) -> torch.Tensor:
    """sum over each token's ``top_k`` experts of weight * down(silu(gate(x)) * up(x)), [T, H]."""
    if hidden.device.type == "cuda":
        from fxllm.models.moe.triton_experts import triton_fused_moe

        return triton_fused_moe(hidden, router_logits, w13, w2, top_k, renormalize, w13_scale, w2_scale)
    return torch_fused_moe(hidden, router_logits, w13, w2, top_k, renormalize, w13_scale, w2_scale)


@fused_moe.register_fake
def _(hidden, router_logits, w13, w2, top_k, renormalize, w13_scale=None, w2_scale=None):
    return hidden.new_empty(hidden.shape)  # contiguous, as both paths return it
