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
) -> torch.Tensor:
    weights, expert_ids = select_experts(router_logits, top_k, renormalize)
    out = torch.zeros_like(hidden)  # [T, H]
    for expert in range(w13.shape[0]):
        tokens, slots = torch.where(expert_ids == expert)
        if tokens.numel() == 0:
            continue
        gate, up = F.linear(hidden[tokens], w13[expert]).chunk(2, dim=-1)  # [rows, I] each
        expert_out = F.linear(F.silu(gate) * up, w2[expert])  # [rows, H]
        out.index_add_(0, tokens, (expert_out * weights[tokens, slots, None]).to(out.dtype))
    return out
