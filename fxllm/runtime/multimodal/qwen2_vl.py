"""Qwen2-VL and Qwen2.5-VL prompts: the checkpoint's own image and video processors, one
placeholder token per item expanded to one token per merged patch, and M-RoPE positions."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fxllm.config import MultiModalConfig
from fxllm.models.mrope import mrope_positions
from fxllm.runtime.multimodal.base import (
    RESERVED_KWARGS,
    ArchitectureProcessor,
    Replacement,
    check_processor_kwargs,
    load_hf_processor,
)
from fxllm.runtime.multimodal.cache import ProcessedInput
from fxllm.runtime.multimodal.inputs import VisionInput

# The resize bounds' older names, which transformers deprecates at call time: mapped onto ``size``.
_PIXEL_BOUNDS = {"min_pixels": "shortest_edge", "max_pixels": "longest_edge"}


class Qwen2VLProcessor(ArchitectureProcessor):
    def __init__(self, model_dir: Path, hf_config: Any, config: MultiModalConfig, tokenizer: Any):
        processor = load_hf_processor(model_dir)
        self.image_processor = getattr(processor, "image_processor", None)
        if self.image_processor is None:
            raise ValueError(f"the processor of {model_dir} ({type(processor).__name__}) has no image processor")
        self.video_processor = getattr(processor, "video_processor", None)
        video_token_id = getattr(hf_config, "video_token_id", None)
        self.placeholder_ids = {"image": hf_config.image_token_id}
        if self.video_processor is not None and video_token_id is not None:
            self.placeholder_ids["video"] = video_token_id
        self.placeholders = {
            "image": getattr(processor, "image_token", "<|image_pad|>"),
            "video": getattr(processor, "video_token", "<|video_pad|>"),
        }
        self.placeholder_examples = {
            modality: f"<|vision_start|>{token}<|vision_end|>" for modality, token in self.placeholders.items()
        }
        self.merge: int = hf_config.vision_config.spatial_merge_size
        # Qwen2.5-VL spaces a video's temporal positions by time: this many per second.
        self.tokens_per_second: float | None = getattr(hf_config.vision_config, "tokens_per_second", None)
        given = dict(config.processor_kwargs)
        self.kwargs = check_processor_kwargs(self.image_processor, self._with_size(dict(given)), given)
        self.video_kwargs = self._video_kwargs() if self.video_processor is not None else {}

    def placeholder_text(self, modality: str) -> str:
        return self.placeholders[modality]

    def process(self, modality: str, item: Any) -> ProcessedInput:
        if modality == "image":
            output = self.image_processor(images=[item], return_tensors="pt", **self.kwargs)
            return ProcessedInput(output["pixel_values"], tuple(int(size) for size in output["image_grid_thw"][0]))
        output = self.video_processor(videos=[item], return_tensors="pt", return_metadata=True, **self.video_kwargs)
        grid = tuple(int(size) for size in output["video_grid_thw"][0])
        # Without a frame rate in its metadata transformers assumes 24 frames per second.
        fps = output["video_metadata"][0].sampled_fps
        return ProcessedInput(output["pixel_values_videos"], grid, self.video_processor.temporal_patch_size / fps)

    def replacement(self, modality: str, processed: ProcessedInput) -> Replacement:
        length = math.prod(processed.grid) // self.merge**2
        return Replacement([self.placeholder_ids[modality]] * length, 0, length)

    def time_interval(self, processed: ProcessedInput) -> float:
        if not processed.seconds_per_grid or self.tokens_per_second is None:
            return 1.0
        # float32, as transformers computes it, so positions floor the same way.
        return float(np.float32(self.tokens_per_second) * np.float32(processed.seconds_per_grid))

    def positions(self, token_ids: list[int], items: list[VisionInput]) -> tuple[np.ndarray | None, int]:
        return mrope_positions(len(token_ids), [(item.offset, item.grid, item.time_interval) for item in items], self.merge)

    def _with_size(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``min_pixels`` / ``max_pixels`` folded into ``size``, as the image processor takes them."""
        if any(bound in kwargs for bound in _PIXEL_BOUNDS):
            default_size = self.image_processor.size
            size = dict(kwargs.pop("size", None) or {key: getattr(default_size, key) for key in _PIXEL_BOUNDS.values()})
            for bound, key in _PIXEL_BOUNDS.items():
                if bound in kwargs:
                    size[key] = kwargs.pop(bound)
            kwargs["size"] = size
        return kwargs

    def _video_kwargs(self) -> dict[str, Any]:
        """The mm_processor_kwargs the video processor takes too (resize bounds, normalization)."""
        known = set(getattr(self.video_processor.valid_kwargs, "__annotations__", {})) - RESERVED_KWARGS
        return {key: value for key, value in self.kwargs.items() if key in known}
