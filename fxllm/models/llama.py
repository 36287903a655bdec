"""Llama-family decoder: Llama, Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm), Granite (multipliers).

Plain single-device modules over flattened tokens: ``forward(input_ids[T],
positions[T]) -> hidden[T, H]``. No collectives, nothing about scheduling; the
attention op is the only runtime piece the model calls.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from fxllm.models.causal_lm import FusedDecoderForCausalLM
from fxllm.hf_config import head_dim_of
from fxllm.models.layers import RMSNorm, RotaryEmbedding, RotaryTables, SiluAndMul, apply_rotary
from fxllm.attention import Attention


# Qwen2 decoders (also the language models of Qwen2-VL and Qwen2.5-VL): q/k/v biases, none on o_proj.
_QWEN2_TEXT_MODEL_TYPES = frozenset({"qwen2", "qwen2_vl_text", "qwen2_5_vl_text"})
# Per-head RMSNorms on q and k before RoPE.
_QK_NORM_MODEL_TYPES = frozenset({"qwen3", "qwen3_moe"})


def layer_sliding_window(config: PretrainedConfig, index: int) -> int | None:
    """The window of layer ``index``: from ``layer_types`` where the config has them
    (Qwen2/Qwen3 with use_sliding_window), else ``sliding_window`` for every layer (Mistral)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return window if layer_types[index] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", None) is False:
        return None
    return window


class LlamaAttentionBlock(nn.Module):
    def __init__(self, config: PretrainedConfig, sliding_window: int | None):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        model_type = config.model_type
        attention_bias = getattr(config, "attention_bias", False)
        qwen2 = model_type in _QWEN2_TEXT_MODEL_TYPES
        # Qwen2 always has q/k/v biases; Qwen2-MoE where its qkv_bias says so.
        qkv_bias = attention_bias or qwen2 or getattr(config, "qkv_bias", False)
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=attention_bias and not qwen2)
        self.qk_norm = model_type in _QK_NORM_MODEL_TYPES
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        # Granite replaces 1/sqrt(head_dim) with its attention_multiplier.
        scale = getattr(config, "attention_multiplier", None) or self.head_dim**-0.5
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, scale, sliding_window)

    def forward(self, rotary: RotaryTables, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        query, key, value = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        query = query.view(-1, self.num_heads, self.head_dim)  # [T, heads, head_dim]
        key = key.view(-1, self.num_kv_heads, self.head_dim)  # [T, kv_heads, head_dim]
        if self.qk_norm:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = apply_rotary(query, rotary), apply_rotary(key, rotary)
        out = self.attn(query.flatten(1), key.flatten(1), value)  # a strided slice: the attention op reads any row stride
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported for this architecture; expected 'silu'")
        self.act = SiluAndMul()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(hidden)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, index: int):
        super().__init__()
        self.self_attn = LlamaAttentionBlock(config, layer_sliding_window(config, index))
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Granite scales each branch before adding it to the residual stream.
        self.residual_multiplier = getattr(config, "residual_multiplier", None) or 1.0

    def forward(self, rotary: RotaryTables, hidden: torch.Tensor) -> torch.Tensor:
        attn_out = self.self_attn(rotary, self.input_layernorm(hidden))
        hidden = hidden + attn_out * self.residual_multiplier
        mlp_out = self.mlp(self.post_attention_layernorm(hidden))
        return hidden + mlp_out * self.residual_multiplier


class LlamaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, max_positions: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.rotary = RotaryEmbedding(config, head_dim_of(config), max_positions)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.embedding_multiplier = getattr(config, "embedding_multiplier", None) or 1.0

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.forward_embeds(self.embed_tokens(input_ids), positions)

    def forward_embeds(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """From token embeddings [T, hidden] (a vision-language model's, images merged in)."""
        hidden = inputs_embeds * self.embedding_multiplier  # Granite scales images' rows too, as HF
        rotary = self.rotary(positions, hidden.dtype)
        for layer in self.layers:
            hidden = layer(rotary, hidden)
        return self.norm(hidden)


class LlamaForCausalLM(FusedDecoderForCausalLM):
    """One implementation for Llama, Mistral, Qwen2, Qwen3 and Granite checkpoints."""

    def __init__(self, config: PretrainedConfig, max_positions: int):
        super().__init__()
        self.model = LlamaModel(config, max_positions)
        self._init_lm_head(config, tied_by_default=False)
        self.logits_scaling = getattr(config, "logits_scaling", None) or 1.0  # Granite divides logits

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        return logits / self.logits_scaling if self.logits_scaling != 1.0 else logits

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [T, hidden], for a vision-language model built around this decoder."""
        return self.model.embed_tokens(input_ids)

    def forward_embeds(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.forward_embeds(inputs_embeds, positions)
