"""OPT decoder (facebook/opt-*): learned positions offset by 2, pre- or post-LN, optional
word-embedding projection (opt-350m), tied lm_head.

Plain single-device modules over flattened tokens: ``forward(input_ids[T],
positions[T]) -> hidden[T, H]``. Config switches are read once at construction, so
the forward pass has no data-dependent branches.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn
from transformers import PretrainedConfig

from fxllm.hf_config import head_dim_of
from fxllm.models.interface import Model
from fxllm.models.layers import LMHead, activation
from fxllm.models.weights import FusedShard, load_named_weights
from fxllm.attention import Attention

# OPT's position table has two leading rows (a fairseq legacy): position p reads row p + 2.
POSITION_OFFSET = 2


def _layer_norm(config: PretrainedConfig) -> nn.LayerNorm:
    # HF OPT uses LayerNorm's default eps (1e-5); the config has no eps field.
    return nn.LayerNorm(config.hidden_size, elementwise_affine=config.layer_norm_elementwise_affine)


class OPTAttention(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        if hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({self.num_heads})"
            )
        # heads x head_dim, not hidden_size: under tensor parallelism a rank holds some heads.
        self.head_dim = head_dim_of(config)
        width = self.num_heads * self.head_dim
        self.qkv_proj = nn.Linear(hidden_size, 3 * width, bias=config.enable_bias)
        self.out_proj = nn.Linear(width, hidden_size, bias=config.enable_bias)
        self.attn = Attention(self.num_heads, self.num_heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        query, key, value = self.qkv_proj(hidden).chunk(3, dim=-1)  # each [T, hidden]
        out = self.attn(query, key, value)  # strided slices: the attention op reads any row stride
        return self.out_proj(out)


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.self_attn = OPTAttention(config)
        self.self_attn_layer_norm = _layer_norm(config)
        self.fc1 = nn.Linear(config.hidden_size, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = nn.Linear(config.ffn_dim, config.hidden_size, bias=config.enable_bias)
        self.final_layer_norm = _layer_norm(config)  # the MLP's norm, despite its name
        self.act = activation(config.activation_function)
        self.pre_norm = bool(config.do_layer_norm_before)  # False: post-LN (opt-350m)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            hidden = hidden + self.self_attn(self.self_attn_layer_norm(hidden))
            return hidden + self.fc2(self.act(self.fc1(self.final_layer_norm(hidden))))
        hidden = self.self_attn_layer_norm(hidden + self.self_attn(hidden))
        return self.final_layer_norm(hidden + self.fc2(self.act(self.fc1(hidden))))


class OPTDecoder(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.word_embed_proj_dim)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, config.hidden_size)
        projected = config.word_embed_proj_dim != config.hidden_size
        self.project_in = nn.Linear(config.word_embed_proj_dim, config.hidden_size, bias=False) if projected else None
        self.project_out = nn.Linear(config.hidden_size, config.word_embed_proj_dim, bias=False) if projected else None
        has_final_norm = config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)
        self.final_layer_norm = _layer_norm(config) if has_final_norm else None
        self.layers = nn.ModuleList(OPTDecoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T, word_embed_proj_dim]
        if self.project_in is not None:
            hidden = self.project_in(hidden)  # [T, hidden]
        hidden = hidden + self.embed_positions(positions + POSITION_OFFSET)
        for layer in self.layers:
            hidden = layer(hidden)
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)  # [T, word_embed_proj_dim]
        return hidden


class OPTModel(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.decoder = OPTDecoder(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.decoder(input_ids, positions)


class OPTForCausalLM(Model):
    # HF checkpoint name -> (our fused parameter, shard index)
    fused_weights = {
        "q_proj": FusedShard("qkv_proj", 0),
        "k_proj": FusedShard("qkv_proj", 1),
        "v_proj": FusedShard("qkv_proj", 2),
    }

    def __init__(self, config: PretrainedConfig, max_positions: int):
        # max_positions is unused: config.py already caps max_model_len at max_position_embeddings.
        super().__init__()
        self.config = config
        self.model = OPTModel(config)
        self.lm_head = LMHead(config, self.model.decoder.embed_tokens, tied_by_default=True)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, word_embed_proj_dim] (after project_out where the model has one)."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def fused_shard_sizes(self, fused_name: str) -> list[int]:
        return [self.config.num_attention_heads * head_dim_of(self.config)] * 3

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_named_weights(self, _with_model_prefix(weights), skip=self.lm_head.checkpoint_skip)


def _with_model_prefix(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """OPTModel checkpoints name tensors ``decoder.*``; OPTForCausalLM ones ``model.decoder.*``."""
    for name, tensor in weights:
        yield ("model." + name if name.startswith("decoder.") else name), tensor
