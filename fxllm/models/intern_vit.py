"""InternViT, the vision tower of InternVL: image tiles in, one embedding per patch out.

A ViT with a class token and learned absolute positions; each block is pre-norm (LayerNorm or
RMSNorm) with layer scale on both branches, optionally RMS-normed queries and keys. Every tile
has the same size, so attention is plain bidirectional attention over each tile's patches,
batched over the tiles. It runs outside the compiled language-model graph, once per image.

Both checkpoint layouts load into it: the original one (``vision_model.*``, fused ``qkv``) and
transformers' ``InternVLForConditionalGeneration`` (``model.vision_tower.*``, separate q/k/v),
described by one ``InternVisionSettings``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxllm.models.layers import RMSNorm, activation

NORM_TYPES = ("layer_norm", "rms_norm")


@dataclass(frozen=True)
class InternVisionSettings:
    hidden_size: int
    num_layers: int  # the blocks that run: up to the one whose output the projector reads
    num_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    hidden_act: str
    norm_type: str
    norm_eps: float
    qkv_bias: bool
    qk_norm: bool

    @classmethod
    def from_config(cls, vision: Any, feature_layer: int, hf_layout: bool) -> "InternVisionSettings":
        """From the original ``vision_config`` or transformers' ``InternVLVisionConfig``.
        ``feature_layer``: the hidden state the projector reads (-1: the last block's output,
        0: the embeddings), as ``select_layer`` / ``vision_feature_layer`` count them."""
        depth = vision.num_hidden_layers
        num_layers = depth + 1 + feature_layer if feature_layer < 0 else feature_layer
        if not 0 <= num_layers <= depth:
            raise ValueError(
                f"the vision feature layer {feature_layer} is outside a tower of {depth} blocks: use -{depth + 1}..{depth}"
            )
        norm_type = getattr(vision, "norm_type", "layer_norm")
        if norm_type not in NORM_TYPES:
            raise ValueError(f"vision norm_type {norm_type!r} is not supported; expected one of {', '.join(NORM_TYPES)}")
        image_size, patch_size = vision.image_size, vision.patch_size
        if hf_layout:  # (height, width) pairs; InternVL's tiles are square
            image_size, patch_size = image_size[0], patch_size[0]
        return cls(
            hidden_size=vision.hidden_size,
            num_layers=num_layers,
            num_heads=vision.num_attention_heads,
            intermediate_size=vision.intermediate_size,
            image_size=image_size,
            patch_size=patch_size,
            hidden_act=vision.hidden_act,
            norm_type=norm_type,
            norm_eps=vision.layer_norm_eps,
            qkv_bias=vision.attention_bias if hf_layout else getattr(vision, "qkv_bias", True),
            qk_norm=vision.use_qk_norm if hf_layout else getattr(vision, "qk_normalization", False),
        )

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


def _norm(settings: InternVisionSettings) -> nn.Module:
    if settings.norm_type == "rms_norm":
        return RMSNorm(settings.hidden_size, settings.norm_eps)
    return nn.LayerNorm(settings.hidden_size, eps=settings.norm_eps)


class InternVisionEmbeddings(nn.Module):
    def __init__(self, settings: InternVisionSettings):
        super().__init__()
        dim, patch = settings.hidden_size, settings.patch_size
        self.class_embedding = nn.Parameter(torch.empty(1, 1, dim))
        self.patch_embedding = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.position_embedding = nn.Parameter(torch.empty(1, settings.patches_per_side**2 + 1, dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, size, size] -> [tiles, 1 + patches, dim]."""
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        classes = self.class_embedding.expand(patches.shape[0], -1, -1).to(patches.dtype)
        return torch.cat([classes, patches], dim=1) + self.position_embedding.to(patches.dtype)


class InternAttention(nn.Module):
    def __init__(self, settings: InternVisionSettings):
        super().__init__()
        dim = settings.hidden_size
        self.num_heads, self.head_dim = settings.num_heads, dim // settings.num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=settings.qkv_bias)
        self.qk_norm = settings.qk_norm
        if self.qk_norm:  # over all heads at once, as both layouts do
            self.q_norm = RMSNorm(dim, settings.norm_eps)
            self.k_norm = RMSNorm(dim, settings.norm_eps)
        self.proj = nn.Linear(dim, dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        tiles, length, dim = hidden.shape
        query, key, value = self.qkv(hidden).chunk(3, dim=-1)  # each [tiles, length, dim]
        if self.qk_norm:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key, value = (t.view(tiles, length, self.num_heads, self.head_dim).transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value)  # every patch of a tile sees the whole tile
        return self.proj(out.transpose(1, 2).reshape(tiles, length, dim))


class InternMLP(nn.Module):
    def __init__(self, settings: InternVisionSettings):
        super().__init__()
        self.fc1 = nn.Linear(settings.hidden_size, settings.intermediate_size)
        self.act = activation(settings.hidden_act)
        self.fc2 = nn.Linear(settings.intermediate_size, settings.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden)))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, settings: InternVisionSettings):
        super().__init__()
        self.norm1, self.norm2 = _norm(settings), _norm(settings)
        self.attn = InternAttention(settings)
        self.mlp = InternMLP(settings)
        # Layer scale: a learned gain per channel on each branch.
        self.ls1 = nn.Parameter(torch.empty(settings.hidden_size))
        self.ls2 = nn.Parameter(torch.empty(settings.hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.attn(self.norm1(hidden)) * self.ls1
        return hidden + self.mlp(self.norm2(hidden)) * self.ls2


class InternVisionEncoder(nn.Module):
    def __init__(self, settings: InternVisionSettings):
        super().__init__()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(settings) for _ in range(settings.num_layers))


class InternVisionModel(nn.Module):
    """Tiles [tiles, 3, size, size] -> patch features [tiles, patches, dim] (the class token dropped)."""

    def __init__(self, settings: InternVisionSettings):
        super().__init__()
        self.embeddings = InternVisionEmbeddings(settings)
        self.encoder = InternVisionEncoder(settings)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            hidden = layer(hidden)
        return hidden[:, 1:]

