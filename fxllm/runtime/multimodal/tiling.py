"""InternVL's dynamic tiling: an image resized onto a grid of square tiles whose shape is closest to
the image's aspect ratio, plus a thumbnail of the whole image when there is more than one tile.

The grid is chosen among every (columns, rows) with ``min_tiles <= columns x rows <= max_tiles``,
in order of tile count (then columns before rows, as transformers' ``GotOcr2ImageProcessor``
lists them): the closest aspect ratio wins; on a tie, the later (larger) grid wins while the
image's area is above half of that grid's pixels. Resizing is PIL's bicubic, normalization
ImageNet's, as the original InternVL preprocessing does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIXEL_MAX = 255.0


@dataclass(frozen=True)
class Tiling:
    tile_size: int  # pixels on a side
    min_tiles: int
    max_tiles: int
    dynamic: bool = True  # False: the whole image as one tile
    use_thumbnail: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(
                f"min_dynamic_patch ({self.min_tiles}) and max_dynamic_patch ({self.max_tiles}) must satisfy "
                f"1 <= min_dynamic_patch <= max_dynamic_patch"
            )


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """(columns, rows) with min_tiles <= columns x rows <= max_tiles, fewest tiles first."""
    grids = [
        (columns, rows)
        for columns in range(1, max_tiles + 1)
        for rows in range(1, max_tiles + 1)
        if min_tiles <= columns * rows <= max_tiles
    ]
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def tile_grid(width: int, height: int, tiling: Tiling) -> tuple[int, int]:
    """(columns, rows) of tiles for an image of ``width`` x ``height`` pixels."""
    if not tiling.dynamic:
        return 1, 1
    aspect_ratio = width / height
    area = width * height
    best, best_difference = (1, 1), float("inf")
    for columns, rows in candidate_grids(tiling.min_tiles, tiling.max_tiles):
        difference = abs(aspect_ratio - columns / rows)
        if difference < best_difference:
            best, best_difference = (columns, rows), difference
        elif difference == best_difference and area > 0.5 * tiling.tile_size**2 * columns * rows:
            best = (columns, rows)
    return best


def num_tiles(width: int, height: int, tiling: Tiling) -> int:
    columns, rows = tile_grid(width, height, tiling)
    thumbnail = tiling.use_thumbnail and columns * rows > 1
    return columns * rows + int(thumbnail)


def tile_image(image: Any, tiling: Tiling) -> torch.Tensor:
    """A PIL image -> normalized tiles [tiles, 3, size, size], row by row, the thumbnail last."""
    from PIL import Image

    image = image.convert("RGB")
    size = tiling.tile_size
    columns, rows = tile_grid(*image.size, tiling)
    resized = image.resize((size * columns, size * rows), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((column * size, row * size, (column + 1) * size, (row + 1) * size))
        for row in range(rows)
        for column in range(columns)
    ]
    if tiling.use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((size, size), Image.Resampling.BICUBIC))
    pixels = torch.from_numpy(np.stack([np.asarray(tile, dtype=np.float32) for tile in tiles]))  # [tiles, size, size, 3]
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return ((pixels / PIXEL_MAX - mean) / std).permute(0, 3, 1, 2).contiguous()
