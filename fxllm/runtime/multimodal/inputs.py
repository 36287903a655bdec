"""A processed multimodal prompt: its expanded token ids, its images and its M-RoPE positions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

Grid = tuple[int, int, int]  # (frames, patch rows, patch columns)


@dataclass(frozen=True)
class ImageInput:
    """One image of a prompt, processed: it fills ``length`` placeholder tokens from ``offset``."""

    offset: int
    length: int
    content_hash: str  # of the image and the processor arguments: equal hashes, equal embeddings
    pixel_values: torch.Tensor  # [num_patches, channels * temporal_patch * patch * patch], on the host
    grid: Grid

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class MultiModalPrompt:
    token_ids: list[int]  # each image's placeholder expanded to one token per embedding
    images: tuple[ImageInput, ...]
    mrope_positions: np.ndarray  # [3, len(token_ids)] int64
    mrope_delta: int  # a token at index i >= len(token_ids) has position i + mrope_delta in every row

    def image_hashes(self, start: int, end: int) -> tuple[str, ...]:
        """Content hashes of the images whose placeholders overlap tokens [start, end)."""
        return tuple(image.content_hash for image in self.images if image.offset < end and start < image.end)
