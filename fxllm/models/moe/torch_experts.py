"""The experts in plain torch: the CPU path of ``fxllm::fused_moe`` and the reference its Triton
path is tested against.

Expert by expert, as Hugging Face computes them: the rows routed to an expert go through its
gate/up projection, SiLU-and-mul and down projection, are scaled by their routing weights and
added to their tokens' outputs in expert order. It gathers rows by a data-dependent mask (a
host sync on a GPU), which is fine inside an opaque op on a CPU, where nothing is captured.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fxllm.models.moe.routing import select_experts


def torch_fused_moe(
    hidden: torch.Tensor,  # [T, H]
    router_logits: torch.Tensor,  # [T, E]
    w13: torch.Tensor,  # [E, 2I, H]: each expert's gate rows, then its up rows
    w2: torch.Tensor,  # [E, H, I]
    top_k: int,
    renormalize: bool,
    w13_scale: torch.Tensor | None = None,  # [E, 2I] float32 where w13 is FP8
    w2_scale: torch.Tensor | None = None,  # [E, H] float32 where w2 is FP8
) -> torch.Tensor:
    weights, expert_ids = select_experts(router_logits, top_k, renormalize)
    out = hidden.new_zeros(hidden.shape)  # [T, H]
    for expert in range(w13.shape[0]):
        tokens, slots = torch.where(expert_ids == expert)
        if tokens.numel() == 0:
            continue
        gate_up = expert_weight(w13, w13_scale, expert, hidden.dtype)
        gate, up = F.linear(hidden[tokens], gate_up).chunk(2, dim=-1)  # [rows, I] each
        expert_out = F.linear(F.silu(gate) * up, expert_weight(w2, w2_scale, expert, hidden.dtype))  # [rows, H]
        out.index_add_(0, tokens, (expert_out * weights[tokens, slots, None]).to(out.dtype))
    return out


def expert_weight(stacked: torch.Tensor, scale: torch.Tensor | None, expert: int, dtype: torch.dtype) -> torch.Tensor:
    """One expert's [rows, cols] weight in ``dtype``: an FP8 one times its per-row scales in float32,
    rounded once (as FP8 linear layers dequantize)."""
    if scale is None:
        return stacked[expert]
    return (stacked[expert].float() * scale[expert, :, None]).to(dtype)
