"""OLMoE: a mixture-of-experts decoder whose attention normalizes the whole q and k projections.

Unlike Qwen3's per-head norms, OLMoE's q_norm and k_norm are RMSNorms over all heads of q
(and of k) at once, before the split into heads and RoPE; ``clip_qkv``, where set, clamps
q, k and v after that. The rest is the MoE decoder of moe_decoder.py, without shared experts.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from fxllm.attention import Attention
from fxllm.hf_config import head_dim_of
from fxllm.models.layers import RMSNorm, RotaryTables, apply_rotary
from fxllm.models.moe.layer import SparseMoeBlock
from fxllm.models.moe_decoder import MoEForCausalLM


class OlmoeAttentionBlock(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = config.attention_bias
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.q_size, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.kv_size, config.rms_norm_eps)
        self.clip_qkv = config.clip_qkv
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, None)

    def forward(self, rotary: RotaryTables, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        query, key, value = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        query, key = self.q_norm(query), self.k_norm(key)
        if self.clip_qkv is not None:
            query, key, value = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (query, key, value))
        query = query.view(-1, self.num_heads, self.head_dim)  # [T, heads, head_dim]
        key = key.view(-1, self.num_kv_heads, self.head_dim)  # [T, kv_heads, head_dim]
        query, key = apply_rotary(query, rotary), apply_rotary(key, rotary)
        return self.o_proj(self.attn(query.flatten(1), key.flatten(1), value))


class OlmoeForCausalLM(MoEForCausalLM):
    @staticmethod
    def build_attention(config: PretrainedConfig, index: int) -> nn.Module:
        return OlmoeAttentionBlock(config)

    @staticmethod
    def build_mlp(config: PretrainedConfig, index: int) -> nn.Module:
        return SparseMoeBlock(
            config.hidden_size, config.num_experts, config.intermediate_size, config.num_experts_per_tok,
            renormalize=config.norm_topk_prob,
        )
