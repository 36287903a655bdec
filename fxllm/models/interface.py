"""What the engine reads from a model: every top-level model class derives from ``Model``.

A model is a plain single-device module. Its forward takes the step's flattened tokens
(``input_ids[T]``, or ``inputs_embeds[T, H]`` where ``takes_inputs_embeds``) and
positions (``[T]``, or ``[3, T]`` where ``uses_mrope``) and returns hidden states
``[T, H]``; it calls ``fxllm.attention.Attention`` layers and nothing about scheduling.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable, Mapping

import torch
from torch import nn

from fxllm.attention.layer import Attention, AttentionSpec


class Model(nn.Module):
    # A vision-language model: the runner embeds tokens and merges images before the graph.
    takes_inputs_embeds: ClassVar[bool] = False
    uses_mrope: ClassVar[bool] = False  # positions are [3, T] (M-RoPE)
    # HF checkpoint module name -> (our fused parameter, shard index): q/k/v and gate/up
    # kept apart in the checkpoint, fused into one projection here (see weights.FusedShard).
    fused_weights: ClassVar[Mapping[str, Any]] = {}
    # MoE layers: an expert's checkpoint module name (``experts.<i>.<name>``) -> where its weight
    # goes in the layer's stacked expert parameters (see weights.ExpertShard).
    expert_weights: ClassVar[Mapping[str, Any]] = {}

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the checkpoint's tensors (HF names) into the parameters; every one must be written."""
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, vocab] from hidden states [rows, H]."""
        raise NotImplementedError(f"{type(self).__name__} has no LM head: it pools, it does not generate")

    def fused_shard_sizes(self, fused_name: str) -> list[int]:
        """Output rows of each checkpoint layer fused into ``fused_name``, in shard order."""
        raise NotImplementedError(f"{type(self).__name__} fuses no checkpoint layers")

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [T, H] (models that take ``inputs_embeds``)."""
        raise NotImplementedError(f"{type(self).__name__} takes token ids, not embeddings")

    def encode_images(self, pixel_values: torch.Tensor, grids: list[tuple[int, ...]]) -> list[torch.Tensor]:
        """One embedding [tokens, H] per image or video: ``pixel_values`` are the items' processed
        inputs concatenated along dim 0, ``grids`` each item's layout in the architecture's terms
        (Qwen2-VL's patch grid, InternVL's tile count, Fuyu's patch rows and columns)."""
        raise NotImplementedError(f"{type(self).__name__} has no vision encoder")

    def compile_vision_encoder(self) -> bool:
        """Compile the vision tower, where there is one; whether it did."""
        return False


ModelClass = type[Model]


def attention_layers(model: nn.Module) -> dict[str, AttentionSpec]:
    """Every attention layer of ``model`` by its module path (the name the attention op and the
    KV cache know it by), each named from ``named_modules()`` on the first call."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            module.bind_layer_name(name)
            layers[name] = module.spec
    return layers
