"""The routing rule of softmax-routed MoE models (Mixtral, Qwen-MoE, OLMoE), as Hugging Face applies it.

Router logits go through a float32 softmax over the experts; each token keeps its ``top_k``
most probable experts, and, where the config says so (``norm_topk_prob``; Mixtral always),
their probabilities are divided by their sum so that they add up to one.
"""

from __future__ import annotations

import torch


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, top_k] float32, expert ids [T, top_k] int64) of each token's chosen experts."""
    probabilities = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, experts]
    weights, expert_ids = torch.topk(probabilities, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, expert_ids
