"""Vision-language prompts -> MultiModalPrompt, all checked before anything runs.

Each image goes through the Hugging Face image processor on its own, each video
through the video processor (both through the processed-input cache), and its one
placeholder token in the prompt is expanded to one token per embedding the vision
tower will produce, as the HF processor does to the text. M-RoPE positions follow
from where the images and videos landed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fxllm.config import MODALITIES, MultiModalConfig
from fxllm.models.mrope import mrope_positions
from fxllm.runtime.multimodal.cache import ProcessedInput, ProcessedInputCache, content_hash
from fxllm.runtime.multimodal.inputs import MultiModalPrompt, VisionInput

# Image-processor arguments fxllm sets itself.
_RESERVED_KWARGS = frozenset({"return_tensors", "images", "videos", "return_metadata"})
# The resize bounds' older names, which transformers deprecates at call time: mapped onto ``size``.
_PIXEL_BOUNDS = {"min_pixels": "shortest_edge", "max_pixels": "longest_edge"}
# The side of the image that checks mm_processor_kwargs once at start-up.
_PROBE_IMAGE_SIDE = 32
VIDEO_ARRAY_DIMS = 4  # [frames, height, width, channels]


def _is_pil_image(value: Any) -> bool:
    from PIL import Image

    return isinstance(value, Image.Image)


def _as_items(modality: str, value: Any) -> list[Any]:
    """One item or a list of them. A video is an array [frames, H, W, 3] or a list of PIL
    frames, so a list of PIL images given as a video is one video."""
    if modality == "video" and isinstance(value, (list, tuple)) and value and _is_pil_image(value[0]):
        return [list(value)]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_mm_data(multi_modal_data: Any, config: MultiModalConfig, index: int) -> dict[str, list[Any]]:
    """The items of each modality of one prompt, within ``limit_mm_per_prompt``."""
    if not isinstance(multi_modal_data, dict):
        raise TypeError(
            f"prompt {index}: multi_modal_data must be a dict like {{'image': image}}, got {type(multi_modal_data).__name__}"
        )
    unknown = sorted(set(multi_modal_data) - set(MODALITIES))
    if unknown:
        raise ValueError(f"prompt {index}: multi_modal_data has unknown modalities {unknown}; known: {', '.join(MODALITIES)}")
    items = {}
    for modality, value in multi_modal_data.items():
        items[modality] = _as_items(modality, value)
        limit = config.limit(modality)
        if modality not in config.modalities and items[modality]:
            raise ValueError(
                f"prompt {index} has {modality} input but this model takes {' and '.join(sorted(config.modalities)) or 'none'}"
            )
        if len(items[modality]) > limit:
            raise ValueError(
                f"prompt {index} has {len(items[modality])} {modality} input(s) but limit_mm_per_prompt allows "
                f"{limit}: pass fewer, or raise it with LLM(..., limit_mm_per_prompt={{'{modality}': {len(items[modality])}}})"
            )
    return items


def _check_images(images: list[Any], index: int) -> None:
    for number, image in enumerate(images):
        if not _is_pil_image(image):
            raise TypeError(f"prompt {index}: image {number} must be a PIL.Image.Image, got {type(image).__name__}")


def _check_videos(videos: list[Any], index: int) -> None:
    for number, video in enumerate(videos):
        if isinstance(video, (np.ndarray, torch.Tensor)):
            if video.ndim != VIDEO_ARRAY_DIMS or video.shape[0] == 0:
                raise ValueError(
                    f"prompt {index}: video {number} must be an array [frames, height, width, 3] with at least one "
                    f"frame, got shape {tuple(video.shape)}"
                )
        elif not (isinstance(video, list) and video and all(_is_pil_image(frame) for frame in video)):
            raise TypeError(
                f"prompt {index}: video {number} must be a numpy array [frames, height, width, 3] or a list of "
                f"PIL images (its frames), got {type(video).__name__}"
            )


class MultiModalProcessor:
    """The checkpoint's HF image processor with fxllm's limits, checked arguments and input cache."""

    def __init__(self, model_dir: Path, hf_config: Any, config: MultiModalConfig):
        from transformers import AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(str(model_dir))
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(
                f"could not load the image processor of {model_dir} ({error}): a vision-language checkpoint needs "
                f"its processor files (preprocessor_config.json or processor_config.json)"
            ) from error
        self.image_processor = getattr(processor, "image_processor", None)
        if self.image_processor is None:
            raise ValueError(f"the processor of {model_dir} ({type(processor).__name__}) has no image processor")
        self.video_processor = getattr(processor, "video_processor", None)
        self.config = config
        self.token_ids = {"image": hf_config.image_token_id, "video": getattr(hf_config, "video_token_id", None)}
        self.placeholders = {
            "image": getattr(processor, "image_token", "<|image_pad|>"),
            "video": getattr(processor, "video_token", "<|video_pad|>"),
        }
        self.merge: int = hf_config.vision_config.spatial_merge_size
        # Qwen2.5-VL spaces a video's temporal positions by time: this many per second.
        self.tokens_per_second: float | None = getattr(hf_config.vision_config, "tokens_per_second", None)
        self.kwargs = self._processor_kwargs(dict(config.processor_kwargs))
        self.video_kwargs = self._video_kwargs() if self.video_processor is not None else {}
        self.cache = ProcessedInputCache(config.input_cache_bytes)

    def clear_cache(self) -> None:
        """Drop every processed image and video kept for reuse (LLM.reset_mm_cache)."""
        self.cache = ProcessedInputCache(self.config.input_cache_bytes)

    def process(self, token_ids: list[int], multi_modal_data: Any, index: int) -> MultiModalPrompt:
        given = check_mm_data(multi_modal_data, self.config, index)
        _check_images(given.get("image", []), index)
        _check_videos(given.get("video", []), index)
        if given.get("video") and (self.video_processor is None or self.token_ids["video"] is None):
            raise ValueError(f"prompt {index}: this checkpoint has no video processor or video token; pass images")
        entries = []  # (placeholder position, modality, item)
        for modality in MODALITIES:
            items = given.get(modality, [])
            places = [position for position, token in enumerate(token_ids) if token == self.token_ids[modality]]
            if len(places) != len(items):
                placeholder = self.placeholders[modality]
                raise ValueError(
                    f"prompt {index} has {len(places)} {modality} placeholder(s) {placeholder!r} but {len(items)} "
                    f"{modality}(s): put one {placeholder} (e.g. <|vision_start|>{placeholder}<|vision_end|>) "
                    f"where each {modality} goes"
                )
            entries += [(position, modality, item) for position, item in zip(places, items)]
        expanded: list[int] = []
        inputs: list[VisionInput] = []
        cursor = 0
        for position, modality, item in sorted(entries, key=lambda entry: entry[0]):
            key, processed = self._process_item(modality, item)
            expanded += token_ids[cursor:position]
            length = math.prod(processed.grid) // self.merge**2
            inputs.append(VisionInput(
                modality, len(expanded), length, key, processed.pixel_values, processed.grid,
                self._time_interval(processed),
            ))
            expanded += [self.token_ids[modality]] * length
            cursor = position + 1
        expanded += token_ids[cursor:]
        positions, delta = mrope_positions(
            len(expanded), [(item.offset, item.grid, item.time_interval) for item in inputs], self.merge
        )
        return MultiModalPrompt(expanded, tuple(inputs), positions, delta)

    def _time_interval(self, processed: ProcessedInput) -> float:
        if not processed.seconds_per_grid or self.tokens_per_second is None:
            return 1.0
        # float32, as transformers computes it, so positions floor the same way.
        return float(np.float32(self.tokens_per_second) * np.float32(processed.seconds_per_grid))

    def _process_item(self, modality: str, item: Any) -> tuple[str, ProcessedInput]:
        key = content_hash(item, (("modality", modality), *self.config.processor_kwargs))
        processed = self.cache.get(key)
        if processed is None:
            processed = self._process_image(item) if modality == "image" else self._process_video(item)
            self.cache.put(key, processed)
        return key, processed

    def _process_image(self, image: Any) -> ProcessedInput:
        output = self.image_processor(images=[image], return_tensors="pt", **self.kwargs)
        return ProcessedInput(output["pixel_values"], tuple(int(size) for size in output["image_grid_thw"][0]))

    def _process_video(self, video: Any) -> ProcessedInput:
        output = self.video_processor(videos=[video], return_tensors="pt", return_metadata=True, **self.video_kwargs)
        grid = tuple(int(size) for size in output["video_grid_thw"][0])
        # Without a frame rate in its metadata transformers assumes 24 frames per second.
        fps = output["video_metadata"][0].sampled_fps
        return ProcessedInput(output["pixel_values_videos"], grid, self.video_processor.temporal_patch_size / fps)

    def _video_kwargs(self) -> dict[str, Any]:
        """The mm_processor_kwargs the video processor takes too (resize bounds, normalization)."""
        known = set(getattr(self.video_processor.valid_kwargs, "__annotations__", {})) - _RESERVED_KWARGS
        return {key: value for key, value in self.kwargs.items() if key in known}

    def _processor_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``mm_processor_kwargs`` checked against the image processor's arguments and tried once."""
        name = type(self.image_processor).__name__
        known = set(getattr(self.image_processor.valid_kwargs, "__annotations__", {})) - _RESERVED_KWARGS
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"mm_processor_kwargs has argument(s) {unknown} that {name} does not take; it takes: {', '.join(sorted(known))}"
            )
        if any(bound in kwargs for bound in _PIXEL_BOUNDS):
            default_size = self.image_processor.size
            size = dict(kwargs.pop("size", None) or {key: getattr(default_size, key) for key in _PIXEL_BOUNDS.values()})
            for bound, key in _PIXEL_BOUNDS.items():
                if bound in kwargs:
                    size[key] = kwargs.pop(bound)
            kwargs["size"] = size
        if kwargs:
            from PIL import Image

            probe = Image.new("RGB", (_PROBE_IMAGE_SIDE, _PROBE_IMAGE_SIDE))
            try:
                self.image_processor(images=[probe], return_tensors="pt", **kwargs)
            except Exception as error:  # transformers raises many types (its strict dataclasses, ...) for bad values
                given = dict(self.config.processor_kwargs)
                raise ValueError(f"{name} rejects mm_processor_kwargs={given}: {error}") from error
        return kwargs
