"""Processed images and videos kept for reuse, keyed by content hash, least recently used evicted by bytes."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fxllm.runtime.multimodal.inputs import Grid


def content_hash(item: Any, processor_kwargs: tuple[tuple[str, Any], ...]) -> str:
    """What a processed image or video depends on: its pixels, their layout, and the processor's
    arguments. ``item``: a PIL image, a video as a list of PIL frames, or an array of frames."""
    digest = hashlib.sha256()
    digest.update(f"{processor_kwargs!r}|".encode())
    frames = item if isinstance(item, (list, tuple)) else [item]
    for frame in frames:
        if isinstance(frame, (np.ndarray, torch.Tensor)):
            array = np.ascontiguousarray(frame.numpy() if isinstance(frame, torch.Tensor) else frame)
            digest.update(f"array|{array.dtype}|{array.shape}|".encode())
            digest.update(array.tobytes())
        else:
            digest.update(f"{frame.mode}|{frame.size}|".encode())
            digest.update(frame.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ProcessedInput:
    pixel_values: torch.Tensor  # in the layout the architecture's vision tower reads
    grid: Grid
    seconds_per_grid: float = 0.0  # videos: the seconds one temporal patch spans (0 for images)

    @property
    def nbytes(self) -> int:
        return self.pixel_values.numel() * self.pixel_values.element_size()


class ProcessedInputCache:
    """At most ``capacity_bytes`` of pixel values (0: nothing is kept)."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self.entries: OrderedDict[str, ProcessedInput] = OrderedDict()
        self.num_bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> ProcessedInput | None:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: ProcessedInput) -> None:
        if key in self.entries or entry.nbytes > self.capacity_bytes:
            return
        self.entries[key] = entry
        self.num_bytes += entry.nbytes
        while self.num_bytes > self.capacity_bytes:
            _, evicted = self.entries.popitem(last=False)
            self.num_bytes -= evicted.nbytes
