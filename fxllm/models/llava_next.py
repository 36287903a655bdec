"""LLaVA-NeXT (LLaVA-1.6): LLaVA's CLIP tower, projector and decoder over any-resolution tiles.

The image processor resizes each image onto the best of ``image_grid_pinpoints`` (padded to keep
its aspect ratio) and cuts it into tower-sized tiles, after a base tile of the whole image. The
tiles' features are laid back out as one grid, the padding cropped off ("unpadded"), and a
learned ``image_newline`` embedding closes each row; the base tile's features come first. All of
them take ``<image>`` tokens (as many as ``num_image_tokens`` counts), so an item's span is all
embeddings, newlines included.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.image_processing_utils import select_best_resolution

from fxllm.config import MultiModalConfig
from fxllm.models.llava import LlavaForConditionalGeneration


def tile_grid(config: PretrainedConfig, height: int, width: int) -> tuple[int, int]:
    """(rows, columns) of tower-sized tiles for an image of ``height`` x ``width`` pixels."""
    best_height, best_width = select_best_resolution((height, width), config.image_grid_pinpoints)
    tile = config.vision_config.image_size
    return best_height // tile, best_width // tile


def unpadded_shape(rows: int, columns: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The part of a (rows x columns) feature grid the image covers: (top, bottom, left, right),
    as transformers crops the padding of the resized image (rounding the scaled side to 7 places)."""
    if width / height > columns / rows:
        scaled = int(round(height * (columns / width), 7))
        padding = (rows - scaled) // 2
        return padding, rows - padding, 0, columns
    scaled = int(round(width * (rows / height), 7))
    padding = (columns - scaled) // 2
    return 0, rows, padding, columns - padding


def num_image_tokens(config: PretrainedConfig, height: int, width: int) -> int:
    """Embeddings of one image: the base tile's patches, then the unpadded grid of the other tiles'
    patches with a newline closing each of its rows (plus each tile's class token where kept)."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    class_token = int(config.vision_feature_select_strategy != "default")
    rows, columns = tile_grid(config, height, width)
    top, bottom, left, right = unpadded_shape(rows * side, columns * side, height, width)
    return side * side + class_token + (bottom - top) * (right - left + 1)


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, config: PretrainedConfig, max_positions: int, multimodal: MultiModalConfig):
        super().__init__(config, max_positions, multimodal)
        if config.vision_feature_select_strategy != "default":
            raise ValueError("LLaVA-NeXT's tiles are laid out without class tokens: vision_feature_select_strategy must be 'default'")
        self.config = config
        self.image_newline = None
        if self.vision_tower is not None:
            self.image_newline = nn.Parameter(torch.empty(config.get_text_config().hidden_size))

    def encode_images(self, pixel_values: torch.Tensor, grids: list[tuple[int, ...]]) -> list[torch.Tensor]:
        """The tiles of every image [tiles, 3, size, size], base tile first -> one
        [num_image_tokens, hidden] per image; ``grids``: (height, width) of each image in pixels."""
        features = super().encode_images(pixel_values, grids)  # one [patches, hidden] per tile
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        embeddings, first = [], 0
        for height, width in grids:
            rows, columns = tile_grid(self.config, height, width)
            tiles = torch.stack(features[first : first + 1 + rows * columns])  # [1 + tiles, patches, hidden]
            first += 1 + rows * columns
            grid = tiles[1:].view(rows, columns, side, side, -1).permute(0, 2, 1, 3, 4)
            grid = grid.reshape(rows * side, columns * side, -1)  # [grid rows, grid columns, hidden]
            top, bottom, left, right = unpadded_shape(rows * side, columns * side, height, width)
            grid = grid[top:bottom, left:right]
            newlines = self.image_newline.to(grid.dtype).expand(grid.shape[0], 1, -1)
            embeddings.append(torch.cat([tiles[0], torch.cat([grid, newlines], dim=1).flatten(0, 1)]))
        return embeddings

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        newline: list[torch.Tensor] = []
        super().load_weights(self._newline_apart(weights, newline))
        if self.image_newline is not None:
            if not newline:
                raise ValueError("checkpoint is missing weights for: image_newline")
            with torch.no_grad():
                self.image_newline.copy_(newline[0])

    @staticmethod
    def _newline_apart(weights: Iterable[tuple[str, torch.Tensor]], newline: list) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if name.removeprefix("model.") == "image_newline":
                newline.append(tensor)
            else:
                yield name, tensor
