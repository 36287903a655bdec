"""The CLIP vision tower of LLaVA: an image at the tower's size in, the hidden states of one (or
more) of its layers out, one row per patch plus the class token.

A pre-LayerNorm ViT (``pre_layrnorm`` on the embeddings, LayerNorm before attention and MLP,
quick-GELU). Only the blocks up to the deepest layer the projector reads are built and loaded.
It runs outside the compiled language-model graph, batched over a step's images (one size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from fxllm.models.layers import activation


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        dim, patch = config.hidden_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.empty(dim))
        self.patch_embedding = nn.Conv2d(config.num_channels, dim, kernel_size=patch, stride=patch, bias=False)
        self.position_embedding = nn.Embedding((config.image_size // patch) ** 2 + 1, dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[images, 3, size, size] -> [images, 1 + patches, dim]."""
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        classes = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([classes, patches], dim=1) + self.position_embedding.weight


class CLIPAttention(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, dim // config.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        images, length, dim = hidden.shape
        query, key, value = (
            projection(hidden).view(images, length, self.num_heads, self.head_dim).transpose(1, 2)
            for projection in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(query, key, value)  # every patch sees the whole image
        return self.out_proj(out.transpose(1, 2).reshape(images, length, dim))


class CLIPMLP(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.layer_norm1(hidden))
        return hidden + self.mlp(self.layer_norm2(hidden))


class CLIPEncoder(nn.Module):
    def __init__(self, config: PretrainedConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(num_layers))


class CLIPVisionTransformer(nn.Module):
    def __init__(self, config: PretrainedConfig, num_layers: int):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config, num_layers)


class CLIPVisionTower(nn.Module):
    """``feature_layers``: the hidden states the projector reads, as transformers counts them
    (0: the embeddings after ``pre_layrnorm``, i: block i's output, negative from the end)."""

    def __init__(self, config: PretrainedConfig, feature_layers: list[int]):
        super().__init__()
        depth = config.num_hidden_layers
        self.feature_layers = [layer if layer >= 0 else depth + 1 + layer for layer in feature_layers]
        if not all(0 <= layer <= depth for layer in self.feature_layers):
            raise ValueError(f"vision_feature_layer {feature_layers} is outside a tower of {depth} blocks")
        self.vision_model = CLIPVisionTransformer(config, max(self.feature_layers))

    @property
    def num_layers(self) -> int:
        return len(self.vision_model.encoder.layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[images, 1 + patches, dim x len(feature_layers)]: the chosen layers side by side."""
        model = self.vision_model
        hidden = model.pre_layrnorm(model.embeddings(pixel_values))
        states = [hidden]
        for layer in model.encoder.layers:
            hidden = layer(hidden)
            states.append(hidden)
        return torch.cat([states[layer] for layer in self.feature_layers], dim=-1)
