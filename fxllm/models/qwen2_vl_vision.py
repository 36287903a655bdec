"""The vision towers of Qwen2-VL and Qwen2.5-VL: image patches in, one embedding per merged patch out.

They run outside the compiled language-model graph: their token count (patches per
image) and their per-image attention segments change with every image, which the
one-dynamic-dim graph of docs/ARCHITECTURE.md, contract 1 cannot express, and they run once per
image, not once per step. They run eagerly, or with ``compile_mm_encoder`` each block's
two regions around its attention compiled (``compile_regions``). Attention is
bidirectional within an image (Qwen2.5-VL: within a window, except in its
full-attention blocks).

Patches arrive in the processor's order: grouped by ``merge x merge`` blocks, so
each consecutive ``merge**2`` patches become one language-model token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from fxllm.models.layers import RMSNorm, activation, default_inv_freq

Grid = tuple[int, int, int]  # (frames, patch rows, patch columns) of one image
VISION_NORM_EPS = 1e-6


def patch_positions(grids: list[Grid], merge: int) -> torch.Tensor:
    """(row, column) [num_patches, 2] of every patch, in the processor's merge-block order."""
    positions = []
    for frames, height, width in grids:
        rows = torch.arange(height)[:, None].expand(height, width)
        cols = torch.arange(width)[None, :].expand(height, width)
        blocks = (height // merge, merge, width // merge, merge)
        by_block = [index.reshape(blocks).transpose(1, 2).flatten() for index in (rows, cols)]
        positions.append(torch.stack(by_block, -1).repeat(frames, 1))
    return torch.cat(positions)


class VisionRotary(nn.Module):
    """Axial 2-D RoPE: the first half of each head's dims rotates by row, the second by column."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.register_buffer("inv_freq", default_inv_freq(theta, head_dim // 2), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # [N, 2, head_dim / 4]
        freqs = freqs.flatten(1)  # rows' frequencies, then columns'
        freqs = torch.cat([freqs, freqs], dim=-1)  # [N, head_dim]
        return freqs.cos(), freqs.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in fp32 on [N, heads, head_dim], as HF's vision towers do."""
    dtype, x = x.dtype, x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos[:, None] + rotated * sin[:, None]).to(dtype)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def project(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotated query and key, and value, each [N, heads, head_dim]."""
        query, key, value = self.qkv(hidden).view(hidden.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        return _rotate(query, cos, sin), _rotate(key, cos, sin), value


def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: list[int]) -> torch.Tensor:
    """Bidirectional attention within each segment of consecutive patches: [N, heads * head_dim]."""
    outputs = [
        F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None])
        for q, k, v in zip(query.split(segments), key.split(segments), value.split(segments))
    ]  # each [1, heads, segment, head_dim]
    return torch.cat(outputs, dim=2)[0].transpose(0, 1).reshape(query.shape[0], -1)


class Qwen2VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, act: str):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden_dim), activation(act), nn.Linear(hidden_dim, dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden)))


class Qwen25VisionMLP(nn.Module):
    """SwiGLU with biases."""

    def __init__(self, dim: int, hidden_dim: int, act: str):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden_dim), nn.Linear(dim, hidden_dim)
        self.down_proj, self.act = nn.Linear(hidden_dim, dim), activation(act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(hidden)) * self.up_proj(hidden))


class VisionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp: nn.Module, norm: type[nn.Module]):
        super().__init__()
        self.norm1, self.norm2 = norm(dim, eps=VISION_NORM_EPS), norm(dim, eps=VISION_NORM_EPS)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = mlp

    def forward(self, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], segments: list[int]) -> torch.Tensor:
        # The two regions around the attention see only tensors whose one varying dim is the
        # patch count, so ``compile_regions`` compiles each once for every block and image;
        # the per-image segments stay outside them.
        attended = segment_attention(*self.attention_inputs(hidden, *rotary), segments)
        return self.attention_output(hidden, attended)

    def attention_inputs(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.attn.project(self.norm1(hidden), cos, sin)

    def attention_output(self, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.attn.proj(attended)
        return hidden + self.mlp(self.norm2(hidden))


class PatchMerger(nn.Module):
    """Norm each patch, then one MLP over each merge x merge block of patches."""

    def __init__(self, out_dim: int, dim: int, merge: int, norm: type[nn.Module]):
        super().__init__()
        self.merged_dim = dim * merge**2
        self.ln_q = norm(dim, eps=VISION_NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(self.merged_dim, self.merged_dim), nn.GELU(), nn.Linear(self.merged_dim, out_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(hidden).view(-1, self.merged_dim))


class PatchEmbed(nn.Module):
    def __init__(self, config: PretrainedConfig, dim: int):
        super().__init__()
        self.patch_shape = (config.in_channels, config.temporal_patch_size, config.patch_size, config.patch_size)
        kernel = self.patch_shape[1:]
        self.proj = nn.Conv3d(config.in_channels, dim, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = pixel_values.view(-1, *self.patch_shape).to(self.proj.weight.dtype)
        return self.proj(patches).flatten(1)  # [num_patches, dim]


def compile_regions(blocks: nn.ModuleList) -> None:
    """Compile the two regions of every block around its attention. The blocks share the
    compiled code (their parameters are graph inputs), so each region compiles once however
    deep the tower, and once more when a second patch count makes it dynamic."""
    for block in blocks:
        block.attention_inputs = torch.compile(block.attention_inputs)
        block.attention_output = torch.compile(block.attention_output)


class Qwen2VisionTransformer(nn.Module):
    """Qwen2-VL: LayerNorm blocks with a GELU MLP, full attention within each image."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        dim = config.embed_dim
        self.merge = config.spatial_merge_size
        self.patch_embed = PatchEmbed(config, dim)
        self.rotary = VisionRotary(dim // config.num_heads, _vision_rope_theta(config))
        hidden_dim = int(dim * config.mlp_ratio)
        self.blocks = nn.ModuleList(
            VisionBlock(dim, config.num_heads, Qwen2VisionMLP(dim, hidden_dim, config.hidden_act), nn.LayerNorm)
            for _ in range(config.depth)
        )
        self.merger = PatchMerger(config.hidden_size, dim, self.merge, nn.LayerNorm)

    def forward(self, pixel_values: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        """Embeddings [num_patches / merge**2, out_dim] for the images of ``grids``, in order."""
        hidden = self.patch_embed(pixel_values)
        rotary = self.rotary(patch_positions(grids, self.merge).to(hidden.device))
        segments = _frame_lengths(grids)
        for block in self.blocks:
            hidden = block(hidden, rotary, segments)
        return self.merger(hidden)


class Qwen25VisionTransformer(nn.Module):
    """Qwen2.5-VL: RMSNorm blocks with a SwiGLU MLP; window attention except in ``fullatt_block_indexes``.

    Patches are reordered window by window (in units of merged blocks) so every window
    is one contiguous attention segment, and put back in order after the merger."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        dim = config.hidden_size
        self.merge = config.spatial_merge_size
        # The window's side in merged blocks.
        self.window = config.window_size // config.spatial_merge_size // config.patch_size
        self.full_attention_blocks = set(config.fullatt_block_indexes)
        self.patch_embed = PatchEmbed(config, dim)
        self.rotary = VisionRotary(dim // config.num_heads, _vision_rope_theta(config))
        self.blocks = nn.ModuleList(
            VisionBlock(dim, config.num_heads, Qwen25VisionMLP(dim, config.intermediate_size, config.hidden_act), RMSNorm)
            for _ in range(config.depth)
        )
        self.merger = PatchMerger(config.out_hidden_size, dim, self.merge, RMSNorm)

    def forward(self, pixel_values: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        order, windows = self._window_order(grids)
        order = order.to(pixel_values.device)
        hidden = self._by_window(self.patch_embed(pixel_values), order)
        cos, sin = self.rotary(patch_positions(grids, self.merge).to(hidden.device))
        rotary = (self._by_window(cos, order), self._by_window(sin, order))
        frames = _frame_lengths(grids)
        for index, block in enumerate(self.blocks):
            hidden = block(hidden, rotary, frames if index in self.full_attention_blocks else windows)
        return self.merger(hidden)[torch.argsort(order)]

    def _by_window(self, per_patch: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Reorder [N, d] rows so that the merged blocks come in ``order``."""
        unit = self.merge**2
        return per_patch.view(-1, unit, per_patch.shape[-1])[order].view(-1, per_patch.shape[-1])

    def _window_order(self, grids: list[Grid]) -> tuple[torch.Tensor, list[int]]:
        """Merged-block indices window by window (each frame tiled row-major by windows of
        ``self.window`` blocks a side, the last ones clipped), and each window's patch count."""
        order: list[torch.Tensor] = []
        lengths: list[int] = []
        first = 0
        for frames, height, width in grids:
            rows, cols = height // self.merge, width // self.merge
            blocks = torch.arange(frames * rows * cols).view(frames, rows, cols) + first
            for frame in blocks:
                for top in range(0, rows, self.window):
                    for left in range(0, cols, self.window):
                        window = frame[top : top + self.window, left : left + self.window].flatten()
                        order.append(window)
                        lengths.append(window.numel() * self.merge**2)
            first += frames * rows * cols
        return torch.cat(order), lengths


def _frame_lengths(grids: list[Grid]) -> list[int]:
    """Patches per frame: the segments of full attention."""
    return [height * width for frames, height, width in grids for _ in range(frames)]


def _vision_rope_theta(config: PretrainedConfig) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_theta", 10000.0)
