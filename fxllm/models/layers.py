"""Building blocks shared by model files: norms, rotary embedding, activations."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

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
    cos: torch.Tensor  # [T, 1, rotary_dim]
    sin: torch.Tensor  # [T, 1, rotary_dim]


def rotary_dim_of(params: dict, head_dim: int) -> int:
    """The leading dims of each head that rotate (Persimmon and some Phi-3 rotate a part)."""
    return int(head_dim * params.get("partial_rotary_factor", 1.0))


def per_position_inv_freq(
    config: PretrainedConfig, params: dict, rotary_dim: int, max_positions: int, layer_type: str | None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for every position, [max_positions, rotary_dim / 2], and the cos/sin scale.

    transformers recomputes "dynamic" and "longrope" frequencies from the length of the sequence
    in each forward; a graph that must not branch on T cannot. With a KV cache, a token's key
    keeps the rotation of the forward that computed it, so transformers fed one token at a time
    rotates position p as a sequence of length p + 1 would be rotated; that is what this table
    holds, row by row. Up to the original length both types are their plain (short) RoPE, as in
    transformers. Past it they match transformers token by token; a prompt longer than the
    original length fed to transformers in one forward rotates all of its tokens with the long
    frequencies instead.
    """
    rope_type = params["rope_type"]
    by_layer_type = {"layer_type": layer_type} if layer_type is not None else {}
    positions = torch.arange(max_positions)
    if rope_type == "longrope":
        original = params.get("original_max_position_embeddings") or config.original_max_position_embeddings
        short, scaling = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", **by_layer_type)
        long, _ = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=original + 1, **by_layer_type)
        return torch.where(positions[:, None] < original, short[None, :], long[None, :]), scaling
    # "dynamic" (NTK): the base grows with the sequence length past max_position_embeddings, in
    # float32 as transformers computes it from a tensor length.
    limit = config.max_position_embeddings
    plain = default_inv_freq(params["rope_theta"], rotary_dim)
    factor = params["factor"]
    lengths = torch.maximum(positions + 1, torch.tensor(limit))
    base = params["rope_theta"] * ((factor * lengths / limit) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    grown = 1.0 / (base[:, None] ** exponents[None, :])
    return torch.where(positions[:, None] < limit, plain[None, :], grown), 1.0


# RoPE types whose frequencies transformers derives from the current sequence length.
LENGTH_DEPENDENT_ROPE = frozenset({"dynamic", "longrope"})


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE with a cos/sin table indexed by position.

    Frequencies come from transformers' rope-init functions, so linear, llama3, yarn, dynamic
    NTK and LongRoPE scaling match HF; the table is built once for ``max_positions``, so the
    length-dependent types select their frequencies per position (``per_position_inv_freq``).
    """

    def __init__(self, config: PretrainedConfig, head_dim: int, max_positions: int, layer_type: str | None = None):
        super().__init__()
        params = rope_parameters(config, layer_type)
        rope_type = params["rope_type"]
        rotary_dim = rotary_dim_of(params, head_dim)
        if rope_type == "default":
            inv_freq, attention_scaling = default_inv_freq(params["rope_theta"], rotary_dim), 1.0
        elif rope_type in LENGTH_DEPENDENT_ROPE:
            with torch.device("cpu"):  # transformers' functions build on the host, whatever device the model is built on
                inv_freq, attention_scaling = per_position_inv_freq(config, params, rotary_dim, max_positions, layer_type)
        elif rope_type in ROPE_INIT_FUNCTIONS:
            by_layer_type = {"layer_type": layer_type} if layer_type is not None else {}
            inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", **by_layer_type)
        else:
            raise ValueError(
                f"unknown rope type {rope_type!r}; supported: default, {', '.join(sorted(ROPE_INIT_FUNCTIONS))}"
            )
        positions = torch.arange(max_positions, dtype=torch.float)
        # [max_positions, rotary_dim / 2]; inv_freq is one row for every position, or one per position.
        freqs = positions[:, None] * inv_freq.float().to(positions.device).expand(max_positions, -1)
        # fp32 table regardless of model dtype; cast at use like HF does.
        self.register_buffer("cos", freqs.cos() * attention_scaling, persistent=False)
        self.register_buffer("sin", freqs.sin() * attention_scaling, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryTables:
        """cos/sin for this step's positions [T], shaped [T, 1, rotary_dim] to broadcast over heads."""
        cos = self.cos[positions].repeat(1, 2).unsqueeze(1).to(dtype)
        sin = self.sin[positions].repeat(1, 2).unsqueeze(1).to(dtype)
        return RotaryTables(cos, sin)


def apply_rotary(x: torch.Tensor, tables: RotaryTables) -> torch.Tensor:
    """Rotate [T, heads, head_dim] by the step's tables (neox layout: halves, not pairs). Where
    the tables are narrower than a head (partial rotary), the dims past them pass through."""
    rotary_dim = tables.cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        return torch.cat((_rotate(x[..., :rotary_dim], tables), x[..., rotary_dim:]), dim=-1)
    return _rotate(x, tables)


def _rotate(x: torch.Tensor, tables: RotaryTables) -> torch.Tensor:
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


def compile_layers(layers: nn.ModuleList) -> None:
    """Compile every block of a vision tower whose blocks see one shape per image size (whole
    tiles or images, no per-image segments): the blocks share the compiled code, their
    parameters being graph inputs, so it compiles once for the tower (and once more when the
    number of tiles or images varies)."""
    for layer in layers:
        layer.forward = torch.compile(layer.forward)
