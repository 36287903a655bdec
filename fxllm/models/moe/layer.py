"""The MoE feed-forward of a decoder layer: a router, the stacked experts, maybe a shared expert."""

from __future__ import annotations

import torch
from torch import nn

from fxllm.models.moe.fused_moe import fused_moe


class FusedMoE(nn.Module):
    """All experts of one layer, stacked for ``fxllm::fused_moe``: ``w13`` [E, 2I, H] holds each
    expert's gate rows then its up rows, ``w2`` [E, H, I] its down projection. Checkpoints keep
    one tensor per expert and projection; the loader writes each into its slice
    (``Model.expert_weights``)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, top_k: int, renormalize: bool):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(
                f"num_experts_per_tok={top_k} must be between 1 and the number of experts ({num_experts}); "
                f"check the model's config.json"
            )
        self.top_k = top_k
        self.renormalize = renormalize
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        return fused_moe(hidden, router_logits, self.w13, self.w2, self.top_k, self.renormalize)


class SparseMoeBlock(nn.Module):
    """``gate`` (the router, [E, H]) scores the experts; each token goes through its ``top_k``
    best. With a ``shared_expert`` (Qwen2-MoE), every token also goes through that dense MLP,
    scaled by sigmoid(``shared_expert_gate``(x)), and the two outputs add."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        intermediate_size: int,
        top_k: int,
        renormalize: bool,
        shared_expert: nn.Module | None = None,
    ):
        super().__init__()
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = FusedMoE(num_experts, hidden_size, intermediate_size, top_k, renormalize)
        self.shared_expert = shared_expert
        if shared_expert is not None:
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.experts(hidden, self.gate(hidden))  # [T, H]
        if self.shared_expert is None:
            return out
        return out + torch.sigmoid(self.shared_expert_gate(hidden)) * self.shared_expert(hidden)
