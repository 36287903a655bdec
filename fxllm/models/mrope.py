"""Multimodal RoPE (M-RoPE) of Qwen2-VL: three position rows (temporal, height, width).

Text tokens carry the same position in all three rows, which is plain RoPE. An
image's or video's tokens count up along its merged patch grid instead (a video's
frames along the temporal row), and the text after it
resumes at the image's start plus its larger side, so a prompt's last position is
usually below its length: decode tokens continue from there (position index +
delta, HF's ``rope_deltas``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig

from fxllm.models.layers import RotaryTables, default_inv_freq, rope_parameters

NUM_MROPE_ROWS = 3
# RoPE types whose M-RoPE frequencies are the plain default ones.
_MROPE_TYPES = ("default", "mrope")


class MRotaryEmbedding(nn.Module):
    """cos/sin for positions [3, T]: frequency band ``i`` of ``mrope_section`` reads row ``i % 3``."""

    def __init__(self, config: PretrainedConfig, head_dim: int, max_positions: int):
        super().__init__()
        params = rope_parameters(config)
        if params["rope_type"] not in _MROPE_TYPES:
            raise ValueError(f"M-RoPE supports rope_type 'default' only, got {params['rope_type']!r}")
        sections = list(params.get("mrope_section") or ())
        if sum(sections) != head_dim // 2:
            raise ValueError(
                f"mrope_section {sections} must sum to head_dim / 2 = {head_dim // 2}; check rope_parameters in config.json"
            )
        bounds = np.cumsum([0, *sections]).tolist()
        self.bands = [(index % NUM_MROPE_ROWS, start, end) for index, (start, end) in enumerate(zip(bounds, bounds[1:]))]
        inv_freq = default_inv_freq(params["rope_theta"], head_dim)
        freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq[None, :]  # [max_positions, head_dim / 2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryTables:
        """Tables [T, 1, head_dim] for positions [3, T]."""
        return RotaryTables(self._select(self.cos[positions], dtype), self._select(self.sin[positions], dtype))

    def _select(self, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # table: [3, T, head_dim / 2] -> each band from its own row
        half = torch.cat([table[row, :, start:end] for row, start, end in self.bands], dim=-1)
        return half.repeat(1, 2).unsqueeze(1).to(dtype)


def mrope_positions(
    num_tokens: int, items: Sequence[tuple[int, tuple[int, int, int], float]], spatial_merge_size: int
) -> tuple[np.ndarray, int]:
    """Positions [3, num_tokens] of a prompt and its decode delta.

    ``items``: (offset of the first placeholder token, (t, h, w) patch grid, time interval)
    of each image or video, in prompt order; one holds t * (h / merge) * (w / merge)
    tokens, and frame f has temporal position floor(f * time interval).
    """
    positions = np.empty((NUM_MROPE_ROWS, num_tokens), dtype=np.int64)
    cursor, next_position = 0, 0  # token index, and the position the next text token gets
    for offset, (frames, height, width), time_interval in items:
        positions[:, cursor:offset] = next_position + np.arange(offset - cursor)
        next_position += offset - cursor
        temporal = (np.arange(frames) * time_interval).astype(np.int64)
        grid = np.meshgrid(
            temporal, np.arange(height // spatial_merge_size), np.arange(width // spatial_merge_size), indexing="ij"
        )
        item_positions = np.stack(grid).reshape(NUM_MROPE_ROWS, -1)
        cursor = offset + item_positions.shape[1]
        positions[:, offset:cursor] = next_position + item_positions
        # As transformers: the text after resumes past the larger spatial side, whatever the frames.
        next_position += max(height, width) // spatial_merge_size
    positions[:, cursor:] = next_position + np.arange(num_tokens - cursor)
    delta = int(positions.max()) + 1 - num_tokens if num_tokens else 0
    return positions, delta
