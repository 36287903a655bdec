"""The attention op (one opaque custom op), its layer module and its backends."""

from fxllm.attention.layer import Attention, AttentionSpec

__all__ = ["Attention", "AttentionSpec"]
