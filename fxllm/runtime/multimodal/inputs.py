"""A processed multimodal prompt: its expanded token ids, its images and videos, its M-RoPE positions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# What a model's vision tower reads besides the pixel values of one item, in that architecture's
# terms: Qwen2-VL's (frames, patch rows, patch columns), InternVL's (tiles,), Fuyu's (rows, columns).
Grid = tuple[int, ...]


@dataclass(frozen=True)
class VisionInput:
    """One image or video of a prompt, processed: it fills ``length`` placeholder tokens from ``offset``."""

    modality: str  # "image" or "video"
    offset: int
    length: int
    content_hash: str  # of the pixels and the processor arguments: equal hashes, equal embeddings
    pixel_values: torch.Tensor  # on the host, in the layout the architecture's vision tower reads
    grid: Grid
    # M-RoPE temporal positions of its frames are floor(frame * time_interval): 1 for images
    # and Qwen2-VL videos; Qwen2.5-VL spaces video frames by their time.
    time_interval: float = 1.0
    # Which of its ``length`` tokens take its embeddings, one each in order ([length] bool); the
    # others stay text (Fuyu's row-end newlines). None: every one.
    embed_mask: torch.Tensor | None = None

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class MultiModalPrompt:
    token_ids: list[int]  # each placeholder expanded to one token per embedding
    items: tuple[VisionInput, ...]  # images and videos, in prompt order
    # M-RoPE models only (None for the others, whose positions are token indices):
    mrope_positions: np.ndarray | None = None  # [3, len(token_ids)] int64
    mrope_delta: int = 0  # a token at index i >= len(token_ids) has position i + mrope_delta in every row

    def content_hashes(self, start: int, end: int) -> tuple[str, ...]:
        """Content hashes of the images and videos whose placeholders overlap tokens [start, end)."""
        return tuple(item.content_hash for item in self.items if item.offset < end and start < item.end)
