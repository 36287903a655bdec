"""GPT-2 decoder (also Cerebras-GPT and other GPT2LMHeadModel checkpoints).

Plain single-device modules over flattened tokens: ``forward(input_ids[T],
positions[T]) -> hidden[T, H]``. Learned absolute position embeddings, pre-LN
blocks with LayerNorm, a fused c_attn projection and a tied lm_head.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn
from transformers import PretrainedConfig

from fxllm.hf_config import head_dim_of
from fxllm.models.interface import Model
from fxllm.models.layers import LMHead, activation
from fxllm.models.weights import load_named_weights
from fxllm.attention import Attention

# HF stores these projections as Conv1D, whose weight is [in, out]: the transpose of nn.Linear's.
_CONV1D_MODULES = ("c_attn", "c_fc", "c_proj")
# Causal-mask buffers that older checkpoints carry; attention masks causally itself.
_MASK_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


class GPT2Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, index: int):
        super().__init__()
        hidden_size = config.n_embd
        self.num_heads = config.n_head
        self.head_dim = head_dim_of(config)
        width = self.num_heads * self.head_dim  # hidden_size, unless the heads are a tensor-parallel share
        self.c_attn = nn.Linear(hidden_size, 3 * width)
        self.c_proj = nn.Linear(width, hidden_size)
        scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:  # as HF: 1 / (layer index + 1), a constant per layer
            scale /= float(index + 1)
        self.attn = Attention(self.num_heads, self.num_heads, self.head_dim, scale)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        query, key, value = self.c_attn(hidden).chunk(3, dim=-1)  # each [T, width]
        out = self.attn(query, key, value)  # strided slices: the attention op reads any row stride
        return self.c_proj(out)


class GPT2MLP(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        inner_size = config.n_inner if config.n_inner is not None else 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, inner_size)
        self.c_proj = nn.Linear(inner_size, config.n_embd)
        self.act = activation(config.activation_function)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(hidden)))


class GPT2Block(nn.Module):
    def __init__(self, config: PretrainedConfig, index: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, index)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.attn(self.ln_1(hidden))
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2Model(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.wte(input_ids) + self.wpe(positions)  # [T, hidden]
        for block in self.h:
            hidden = block(hidden)
        return self.ln_f(hidden)


class GPT2LMHeadModel(Model):
    def __init__(self, config: PretrainedConfig, max_positions: int):
        # max_positions is unused: config.py already caps max_model_len at n_positions.
        super().__init__()
        if getattr(config, "add_cross_attention", False):
            raise ValueError(
                "this GPT-2 config has add_cross_attention=True (an encoder-decoder setup); fxllm runs "
                "decoder-only GPT-2: pass hf_overrides={'add_cross_attention': False} if the checkpoint "
                "has no cross-attention weights"
            )
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = LMHead(config, self.transformer.wte, tied_by_default=True)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_named_weights(self, _hf_to_linear(weights), skip=self.lm_head.checkpoint_skip)


def _hf_to_linear(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Normalize HF GPT-2 tensors: add the ``transformer.`` prefix that GPT2Model checkpoints
    lack, drop mask buffers, and transpose Conv1D weights into nn.Linear layout."""
    for name, tensor in weights:
        if name.endswith(_MASK_BUFFER_SUFFIXES):
            continue
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        module = name.split(".")[-2]
        if module in _CONV1D_MODULES and name.endswith(".weight"):
            tensor = tensor.t()
        yield name, tensor
