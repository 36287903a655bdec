"""The MoE feed-forward of a decoder layer: a router, the stacked experts, maybe a shared expert."""

from __future__ import annotations

import torch
from torch import nn

from fxllm.models.moe.fused_moe import fused_moe
from fxllm.models.weights import ExpertShard


class FusedMoE(nn.Module):
    """All experts of one layer, stacked for ``fxllm::fused_moe``: ``w13`` [E, 2I, H] holds each
    expert's gate rows then its up rows, ``w2`` [E, H, I] its down projection. Checkpoints keep
    one tensor per expert and projection; the loader hands each to ``load_expert_tensor``
    (``Model.expert_weights`` says which slice it fills)."""

    # Checkpoint tensors per expert that each stacked parameter takes: w13 gate and up, w2 down.
    SHARDS_PER_EXPERT = {"w13": 2, "w2": 1}

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        top_k: int,
        renormalize: bool,
        weight_dtype: torch.dtype | None = None,  # None: the default dtype (the model's)
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(
                f"num_experts_per_tok={top_k} must be between 1 and the number of experts ({num_experts}); "
                f"check the model's config.json"
            )
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.top_k = top_k
        self.renormalize = renormalize
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, dtype=weight_dtype))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, dtype=weight_dtype))

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        return fused_moe(hidden, router_logits, self.w13, self.w2, self.top_k, self.renormalize)

    # ---- loading (weights.load_named_weights calls these) ----

    def expected_expert_writes(self) -> dict[str, int]:
        return {name: self.num_experts * shards for name, shards in self.SHARDS_PER_EXPERT.items()}

    def load_expert_tensor(self, checkpoint_name: str, expert: int, shard: ExpertShard, tensor: torch.Tensor) -> tuple[str, ...]:
        rows = self.expert_rows(checkpoint_name, expert, shard, tensor)
        getattr(self, shard.stacked_name)[expert, rows].copy_(tensor)
        return (shard.stacked_name,)

    def expert_rows(self, checkpoint_name: str, expert: int, shard: ExpertShard, tensor: torch.Tensor) -> slice:
        """The rows of expert ``expert``'s [rows, cols] slice of ``shard.stacked_name`` that its
        checkpoint tensor fills, or a clear error where the checkpoint does not fit the config."""
        if shard.stacked_name not in self.SHARDS_PER_EXPERT:
            raise ValueError(f"{checkpoint_name!r}: the experts have no parameter {shard.stacked_name!r}")
        if expert >= self.num_experts:
            raise ValueError(
                f"checkpoint tensor {checkpoint_name!r} is of expert {expert}, but the config has {self.num_experts} "
                f"experts; the config.json does not match these weights"
            )
        _, num_rows, num_cols = getattr(self, shard.stacked_name).shape
        if shard.index is None:
            rows = slice(0, num_rows)
        else:
            size = num_rows // self.SHARDS_PER_EXPERT[shard.stacked_name]
            rows = slice(shard.index * size, (shard.index + 1) * size)
        if tuple(tensor.shape) != (rows.stop - rows.start, num_cols):
            raise ValueError(
                f"checkpoint tensor {checkpoint_name!r} has shape {tuple(tensor.shape)} but the model expects "
                f"{(rows.stop - rows.start, num_cols)}; the config.json does not match these weights"
            )
        return rows


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
