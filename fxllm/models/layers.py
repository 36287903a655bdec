"""Building blocks shared by model files: norms, rotary embedding, activations."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

# RoPE types whose frequencies depend on the step's length: they would branch on T.
_LENGTH_DEPENDENT_ROPE = {"dynamic", "longrope"}


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in fp32 and cast back, as HF does.
        input_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(input_dtype)


def rope_parameters(config: PretrainedConfig, layer_type: str | None = None) -> dict:
    """RoPE settings; models with per-layer-type RoPE (Gemma 3) keep one dict per layer type."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None:
        params = params[layer_type]
    return {"rope_type": "default", **params}


def default_inv_freq(base: float, rotary_dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))


class RotaryTables(NamedTuple):
    cos: torch.Tensor  # [T, 1, head_dim]
    sin: torch.Tensor  # [T, 1, head_dim]


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE with a cos/sin table indexed by position.

    Frequencies come from transformers' rope-init functions, so linear, llama3 and
    yarn scaling match HF exactly; the table is built once for ``max_positions``.
    """

    def __init__(self, config: PretrainedConfig, head_dim: int, max_positions: int, layer_type: str | None = None):
        super().__init__()
        params = rope_parameters(config, layer_type)
        rope_type = params["rope_type"]
        if rope_type in _LENGTH_DEPENDENT_ROPE:
            raise ValueError(
                f"rope type {rope_type!r} changes with the sequence length, which fxllm's "
                f"captured graphs cannot do; use a checkpoint with default, linear, llama3 or yarn RoPE"
            )
        if rope_type == "default":
            inv_freq, attention_scaling = default_inv_freq(params["rope_theta"], head_dim), 1.0
        elif rope_type in ROPE_INIT_FUNCTIONS:
            by_layer_type = {"layer_type": layer_type} if layer_type is not None else {}
            inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", **by_layer_type)
        else:
            raise ValueError(
                f"unknown rope type {rope_type!r}; supported: default, {', '.join(sorted(ROPE_INIT_FUNCTIONS))}"
            )
        positions = torch.arange(max_positions, dtype=torch.float)
        freqs = positions[:, None] * inv_freq[None, :].float().to(positions.device)  # [max_positions, head_dim / 2]
        # fp32 table regardless of model dtype; cast at use like HF does.
        self.register_buffer("cos", freqs.cos() * attention_scaling, persistent=False)
        self.register_buffer("sin", freqs.sin() * attention_scaling, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryTables:
        """cos/sin for this step's positions [T], shaped [T, 1, head_dim] to broadcast over heads."""
        cos = self.cos[positions].repeat(1, 2).unsqueeze(1).to(dtype)
        sin = self.sin[positions].repeat(1, 2).unsqueeze(1).to(dtype)
        return RotaryTables(cos, sin)


def apply_rotary(x: torch.Tensor, tables: RotaryTables) -> torch.Tensor:
    """Rotate [T, heads, head_dim] by the step's tables (neox layout: halves, not pairs)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * tables.cos + rotated * tables.sin


def activation(name: str) -> nn.Module:
    """An activation by its HF config name (transformers' own table, so numerics match)."""
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise ValueError(f"activation_function {name!r} is not supported; expected one of {', '.join(sorted(ACT2FN))}")
    return ACT2FN[name]


class SiluAndMul(nn.Module):
    """silu(gate) * up on a fused [T, 2 * intermediate] projection."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return nn.functional.silu(gate) * up


class LMHead(nn.Linear):
    """The output projection [vocab, hidden]; tied to the input embedding where the config says
    so (``tie_word_embeddings``, else ``tied_by_default``), whose checkpoint then has no
    ``lm_head.weight`` to load."""

    def __init__(self, config: PretrainedConfig, embedding: nn.Embedding, tied_by_default: bool):
        super().__init__(embedding.embedding_dim, config.vocab_size, bias=False)
        self.tied = bool(getattr(config, "tie_word_embeddings", tied_by_default))
        if self.tied:
            self.weight = embedding.weight

    @property
    def checkpoint_skip(self) -> set[str]:
        """Checkpoint names the model's ``load_weights`` leaves out."""
        return {"lm_head.weight"} if self.tied else set()
