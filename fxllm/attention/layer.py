"""The attention layer models call, and the custom op it lowers to.

``torch.ops.fxllm.attention`` is opaque to Dynamo (a ``torch.library.custom_op``
with a fake implementation): it is the splitting op of the piecewise compiler.
It writes the new K/V into the layer's paged cache and the result into ``out``;
the cache and per-step metadata come from the forward context, found by
``layer_name``, the layer's module path (``models.interface.attention_layers`` names
every layer of a model from ``named_modules()``). A forward context without caches (pooling
runs whole prompts) makes attention read K/V from the op's own inputs only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from fxllm.forward_context import get_forward_context


@dataclass(frozen=True)
class AttentionSpec:
    """What a backend needs to know about one attention layer."""

    layer_name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int | None = None  # a query at position q sees keys p with q - p < window
    causal: bool = True  # False: every token of a prompt sees all of it (encoders such as BERT)


@torch.library.custom_op("fxllm::attention", mutates_args=("out",))
def attention_op(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor, layer_name: str
) -> None:
    context = get_forward_context()
    if context.attn_metadata is None:
        out.zero_()  # profiling run: no KV cache exists yet
        return
    spec = context.layers[layer_name]
    context.backend.forward(
        spec,
        query.view(-1, spec.num_heads, spec.head_dim),
        key.view(-1, spec.num_kv_heads, spec.head_dim),
        value.view(-1, spec.num_kv_heads, spec.head_dim),
        out.view(-1, spec.num_heads, spec.head_dim),
        context.kv_caches.get(layer_name),
        context.attn_metadata,
    )


@attention_op.register_fake
def _(query, key, value, out, layer_name) -> None:
    return None


class Attention(nn.Module):
    """Paged attention over flattened tokens: [T, heads * head_dim] in and out."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
        causal: bool = True,
    ):
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"
            )
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
        self.spec = AttentionSpec("", num_heads, num_kv_heads, head_dim, scale, sliding_window, causal)

    def bind_layer_name(self, name: str) -> None:
        self.spec = replace(self.spec, layer_name=name)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if not self.spec.layer_name:
            raise RuntimeError(
                "an attention layer ran without a name: call fxllm.models.interface.attention_layers(model) "
                "once after building the model, which names every layer by its module path"
            )
        out = torch.empty_like(query)
        torch.ops.fxllm.attention(query, key, value, out, self.spec.layer_name)
        return out
