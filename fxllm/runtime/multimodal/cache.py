"""Processed images kept for reuse, keyed by content hash, least recently used evicted by bytes."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from fxllm.runtime.multimodal.inputs import Grid


def image_content_hash(image: Any, processor_kwargs: tuple[tuple[str, Any], ...]) -> str:
    """What a processed image depends on: its pixels, mode and size, and the processor's arguments."""
    digest = hashlib.sha256()
    digest.update(f"{image.mode}|{image.size}|{processor_kwargs!r}|".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ProcessedImage:
    pixel_values: torch.Tensor  # [num_patches, patch_dim]
    grid: Grid

    @property
    def nbytes(self) -> int:
        return self.pixel_values.numel() * self.pixel_values.element_size()


class ProcessedInputCache:
    """At most ``capacity_bytes`` of pixel values (0: nothing is kept)."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self.entries: OrderedDict[str, ProcessedImage] = OrderedDict()
        self.num_bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> ProcessedImage | None:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: ProcessedImage) -> None:
        if key in self.entries or entry.nbytes > self.capacity_bytes:
            return
        self.entries[key] = entry
        self.num_bytes += entry.nbytes
        while self.num_bytes > self.capacity_bytes:
            _, evicted = self.entries.popitem(last=False)
            self.num_bytes -= evicted.nbytes
