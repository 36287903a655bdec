"""BERT encoder (``BertModel``): bidirectional attention, absolute positions, post-LayerNorm.

``forward(input_ids[T], positions[T]) -> hidden[T, H]`` over the flattened tokens of
whole prompts, as the decoders; attention is the same custom op with ``causal=False``,
and the pooling runner keeps no KV cache. Inputs are single sentences, so every token
has type 0 and the token-type embedding is one row added to every token.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from fxllm.models.interface import Model
from fxllm.models.layers import activation
from fxllm.models.weights import FusedShard, load_named_weights
from fxllm.attention import Attention

SINGLE_SENTENCE_TOKEN_TYPE = 0
# Checkpoint tensors no sentence embedding uses: the [CLS] pooler (dense + tanh, for
# next-sentence prediction) and the position-id buffer older checkpoints carry.
_UNUSED_WEIGHT_PREFIXES = ("pooler.", "embeddings.position_ids")


class BertEmbeddings(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        position_type = getattr(config, "position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"position_embedding_type {position_type!r} is not supported; expected 'absolute'")
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Summed in HF's order: words + token type, then positions.
        hidden = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[SINGLE_SENTENCE_TOKEN_TYPE]
        return self.LayerNorm(hidden + self.position_embeddings(positions))  # [T, hidden]


class BertSelfAttention(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        num_heads = config.num_attention_heads
        head_dim = config.hidden_size // num_heads
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.attn = Attention(num_heads, num_heads, head_dim, head_dim**-0.5, causal=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        query, key, value = self.qkv_proj(hidden).chunk(3, dim=-1)  # each [T, hidden]
        return self.attn(query.contiguous(), key.contiguous(), value.contiguous())


class BertResidualOutput(nn.Module):
    """Projection, then LayerNorm of it plus the residual (post-norm): HF's BertSelfOutput/BertOutput."""

    def __init__(self, in_features: int, config: PretrainedConfig):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(hidden) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertResidualOutput(config.hidden_size, config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden))


class BertLayer(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertResidualOutput(config.intermediate_size, config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        attended = self.attention(hidden)
        return self.output(self.intermediate(attended), attended)


class BertEncoder(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            hidden = layer(hidden)
        return hidden


class BertModel(Model):
    """Module names follow HF's, so checkpoint tensors load by name (q/k/v into one projection)."""

    fused_weights = {
        "query": FusedShard("qkv_proj", 0),
        "key": FusedShard("qkv_proj", 1),
        "value": FusedShard("qkv_proj", 2),
    }

    def __init__(self, config: PretrainedConfig, max_positions: int):
        super().__init__()  # max_positions: the checkpoint's position table already bounds it
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embeddings(input_ids, positions))

    def fused_shard_sizes(self, fused_name: str) -> list[int]:
        return [self.config.hidden_size] * 3

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_named_weights(self, ((n, t) for n, t in weights if not n.startswith(_UNUSED_WEIGHT_PREFIXES)))
