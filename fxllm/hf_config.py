"""Sizes fxllm reads from a Hugging Face config, where architectures name them differently."""

from __future__ import annotations

from typing import Any


def head_dim_of(config: Any) -> int:
    """The config's head_dim, or hidden_size / heads where it names none."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def intermediate_size_of(config: Any) -> int:
    """The MLP width; GPT-2 names it n_inner, where None means 4 x hidden, OPT ffn_dim."""
    if hasattr(config, "n_inner"):
        return config.n_inner or 4 * config.hidden_size
    if hasattr(config, "ffn_dim"):
        return config.ffn_dim
    return config.intermediate_size
