"""Decoders whose feed-forward is a mixture of experts: Mixtral, Qwen2-MoE and Qwen3-MoE (OLMoE in olmoe.py).

Attention is the Llama family's (``LlamaAttentionBlock``: Qwen2-MoE's q/k/v biases, Qwen3-MoE's
per-head q/k norms, Mixtral's sliding window). Each layer's MLP is a ``SparseMoeBlock``, or a
dense MLP on the layers Qwen's ``decoder_sparse_step`` and ``mlp_only_layers`` leave dense.
Routing follows each config: softmax over the experts, then the top ``num_experts_per_tok``,
renormalized where ``norm_topk_prob`` is set (Mixtral always renormalizes).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from fxllm.hf_config import head_dim_of
from fxllm.models.causal_lm import FusedDecoderForCausalLM
from fxllm.models.layers import RMSNorm, RotaryEmbedding, RotaryTables
from fxllm.models.llama import LlamaAttentionBlock, LlamaMLP, layer_sliding_window
from fxllm.models.moe.layer import SparseMoeBlock
from fxllm.models.weights import ExpertShard

# Builds layer ``index``'s attention block or MLP from the config.
LayerPart = Callable[[PretrainedConfig, int], nn.Module]

# Experts' checkpoint modules (Qwen-MoE, OLMoE): gate and up stack into w13, down into w2.
GATE_UP_DOWN_EXPERTS = {
    "gate_proj": ExpertShard("w13", 0),
    "up_proj": ExpertShard("w13", 1),
    "down_proj": ExpertShard("w2"),
}


def check_silu(config: PretrainedConfig) -> None:
    if config.hidden_act != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r} is not supported for this architecture; expected 'silu'")


class MoEDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, index: int, attention: LayerPart, mlp: LayerPart):
        super().__init__()
        self.self_attn = attention(config, index)
        self.mlp = mlp(config, index)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, rotary: RotaryTables, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(rotary, self.input_layernorm(hidden))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class MoEModel(nn.Module):
    def __init__(self, config: PretrainedConfig, max_positions: int, attention: LayerPart, mlp: LayerPart):
        super().__init__()
        check_silu(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            MoEDecoderLayer(config, i, attention, mlp) for i in range(config.num_hidden_layers)
        )
        self.rotary = RotaryEmbedding(config, head_dim_of(config), max_positions)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T, hidden]
        rotary = self.rotary(positions, hidden.dtype)
        for layer in self.layers:
            hidden = layer(rotary, hidden)
        return self.norm(hidden)


class MoEForCausalLM(FusedDecoderForCausalLM):
    """Subclasses say how layer ``index`` attends (``build_attention``) and what its MLP is (``build_mlp``)."""

    expert_weights = GATE_UP_DOWN_EXPERTS

    def __init__(self, config: PretrainedConfig, max_positions: int):
        super().__init__()
        self.model = MoEModel(config, max_positions, self.build_attention, self.build_mlp)
        self._init_lm_head(config, tied_by_default=False)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    @staticmethod
    def build_attention(config: PretrainedConfig, index: int) -> nn.Module:
        return LlamaAttentionBlock(config, layer_sliding_window(config, index))

    @staticmethod
    def build_mlp(config: PretrainedConfig, index: int) -> nn.Module:
        raise NotImplementedError


class MixtralForCausalLM(MoEForCausalLM):
    # Mixtral's experts name their projections w1 (gate), w3 (up) and w2 (down).
    expert_weights = {"w1": ExpertShard("w13", 0), "w3": ExpertShard("w13", 1), "w2": ExpertShard("w2")}

    @staticmethod
    def build_mlp(config: PretrainedConfig, index: int) -> nn.Module:
        return SparseMoeBlock(
            config.hidden_size, config.num_experts, config.intermediate_size, config.num_experts_per_tok,
            renormalize=True,
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # Mixtral checkpoints call each layer's MoE block block_sparse_moe; here it is mlp.
        super().load_weights((name.replace(".block_sparse_moe.", ".mlp."), tensor) for name, tensor in weights)


def is_sparse_layer(config: PretrainedConfig, index: int) -> bool:
    """Qwen-MoE: every ``decoder_sparse_step``-th layer is sparse, except those in ``mlp_only_layers``."""
    return (
        index not in config.mlp_only_layers
        and config.num_experts > 0
        and (index + 1) % config.decoder_sparse_step == 0
    )


class GatedMLP(nn.Module):
    """silu(gate_proj(x)) * up_proj(x) through down_proj, the gate and up projections kept apart."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(hidden)) * self.up_proj(hidden))


class Qwen2MoeForCausalLM(MoEForCausalLM):
    # Only q/k/v are fused: the shared expert and the dense MLPs both name their projections
    # gate_proj/up_proj with different widths (shared_expert_intermediate_size,
    # intermediate_size), which one fused gate_up_proj size cannot describe.
    fused_weights = {
        name: shard for name, shard in FusedDecoderForCausalLM.fused_weights.items() if shard.fused_name == "qkv_proj"
    }

    @staticmethod
    def build_mlp(config: PretrainedConfig, index: int) -> nn.Module:
        if not is_sparse_layer(config, index):
            return GatedMLP(config.hidden_size, config.intermediate_size)
        return SparseMoeBlock(
            config.hidden_size, config.num_experts, config.moe_intermediate_size, config.num_experts_per_tok,
            renormalize=config.norm_topk_prob,
            shared_expert=GatedMLP(config.hidden_size, config.shared_expert_intermediate_size),
        )


class Qwen3MoeForCausalLM(MoEForCausalLM):
    @staticmethod
    def build_mlp(config: PretrainedConfig, index: int) -> nn.Module:
        if not is_sparse_layer(config, index):
            return LlamaMLP(config)
        return SparseMoeBlock(
            config.hidden_size, config.num_experts, config.moe_intermediate_size, config.num_experts_per_tok,
            renormalize=config.norm_topk_prob,
        )
