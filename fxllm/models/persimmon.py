"""Persimmon (also Fuyu's language model): LayerNorm blocks, partial rotary, LayerNorm on each
query and key head, a squared-ReLU MLP and a fused QKV projection.

The checkpoint's ``query_key_value`` interleaves q, k and v per head ([heads, 3, head_dim] rows);
the loader reorders its rows to [q heads, k heads, v heads], so the forward splits it as the
other decoders do.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn
from transformers import PretrainedConfig

from fxllm.attention import Attention
from fxllm.hf_config import head_dim_of
from fxllm.models.interface import Model
from fxllm.models.layers import LMHead, RotaryEmbedding, RotaryTables, activation, apply_rotary
from fxllm.models.weights import load_named_weights

_FUSED_QKV = ".self_attn.query_key_value."


class PersimmonAttention(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = head_dim_of(config)
        self.width = self.num_heads * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * self.width)
        self.dense = nn.Linear(self.width, config.hidden_size)
        self.qk_layernorm = config.qk_layernorm
        if self.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
        self.attn = Attention(self.num_heads, self.num_heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, rotary: RotaryTables, hidden: torch.Tensor) -> torch.Tensor:
        query, key, value = self.query_key_value(hidden).split(self.width, dim=-1)
        query = query.view(-1, self.num_heads, self.head_dim)  # [T, heads, head_dim]
        key = key.view(-1, self.num_heads, self.head_dim)
        if self.qk_layernorm:
            query, key = self.q_layernorm(query), self.k_layernorm(key)
        query, key = apply_rotary(query, rotary), apply_rotary(key, rotary)
        return self.dense(self.attn(query.flatten(1), key.flatten(1), value))


class PersimmonMLP(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)  # relu2: squared ReLU
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(hidden)))


class PersimmonDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.self_attn = PersimmonAttention(config)
        self.mlp = PersimmonMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, rotary: RotaryTables, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(rotary, self.input_layernorm(hidden))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class PersimmonModel(nn.Module):
    def __init__(self, config: PretrainedConfig, max_positions: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(PersimmonDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.rotary = RotaryEmbedding(config, head_dim_of(config), max_positions)
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rotary = self.rotary(positions, inputs_embeds.dtype)
        hidden = inputs_embeds  # [T, hidden]
        for layer in self.layers:
            hidden = layer(rotary, hidden)
        return self.final_layernorm(hidden)


class PersimmonForCausalLM(Model):
    def __init__(self, config: PretrainedConfig, max_positions: int):
        super().__init__()
        self.config = config
        self.model = PersimmonModel(config, max_positions)
        self.lm_head = LMHead(config, self.model.embed_tokens, tied_by_default=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(self.model.embed_tokens(input_ids), positions)

    def forward_embeds(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds, positions)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_named_weights(self, self._q_k_v_apart(weights), skip=self.lm_head.checkpoint_skip)

    def _q_k_v_apart(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """query_key_value rows from [heads, 3, head_dim] (per head q, k, v) to [3, heads, head_dim]."""
        heads, head_dim = self.config.num_attention_heads, head_dim_of(self.config)
        for name, tensor in weights:
            if _FUSED_QKV in name:
                tensor = tensor.reshape(heads, 3, head_dim, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)
            yield name, tensor
