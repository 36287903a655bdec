"""Vision-language prompts -> MultiModalPrompt, all checked before anything runs.

Each image goes through the Hugging Face image processor on its own (through the
processed-input cache), and its one placeholder token in the prompt is expanded to
one token per embedding the vision tower will produce, as the HF processor does to
the text. M-RoPE positions follow from where the images landed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fxllm.config import MODALITIES, MultiModalConfig
from fxllm.models.mrope import mrope_positions
from fxllm.runtime.multimodal.cache import ProcessedImage, ProcessedInputCache, image_content_hash
from fxllm.runtime.multimodal.inputs import ImageInput, MultiModalPrompt

# Image-processor arguments fxllm sets itself.
_RESERVED_KWARGS = frozenset({"return_tensors", "images"})
# The resize bounds' older names, which transformers deprecates at call time: mapped onto ``size``.
_PIXEL_BOUNDS = {"min_pixels": "shortest_edge", "max_pixels": "longest_edge"}
# The side of the image that checks mm_processor_kwargs once at start-up.
_PROBE_IMAGE_SIDE = 32


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
        items[modality] = list(value) if isinstance(value, (list, tuple)) else [value]
        limit = config.limit(modality)
        if len(items[modality]) > limit:
            raise ValueError(
                f"prompt {index} has {len(items[modality])} {modality} input(s) but limit_mm_per_prompt allows "
                f"{limit}: pass fewer, or raise it with LLM(..., limit_mm_per_prompt={{'{modality}': {len(items[modality])}}})"
            )
    if items.get("video"):
        raise ValueError(f"prompt {index}: video input is not supported yet, only images are: pass frames as images")
    return items


def _check_images(images: list[Any], index: int) -> None:
    from PIL import Image

    for number, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"prompt {index}: image {number} must be a PIL.Image.Image, got {type(image).__name__}")


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
        self.config = config
        self.image_token_id: int = hf_config.image_token_id
        self.placeholder: str = getattr(processor, "image_token", "<|image_pad|>")
        self.merge: int = hf_config.vision_config.spatial_merge_size
        self.kwargs = self._processor_kwargs(dict(config.processor_kwargs))
        self.cache = ProcessedInputCache(config.input_cache_bytes)

    def process(self, token_ids: list[int], multi_modal_data: Any, index: int) -> MultiModalPrompt:
        images = check_mm_data(multi_modal_data, self.config, index).get("image", [])
        _check_images(images, index)
        placeholders = [position for position, token in enumerate(token_ids) if token == self.image_token_id]
        if len(placeholders) != len(images):
            raise ValueError(
                f"prompt {index} has {len(placeholders)} image placeholder(s) {self.placeholder!r} but {len(images)} "
                f"image(s): put one {self.placeholder} (e.g. <|vision_start|>{self.placeholder}<|vision_end|>) "
                f"where each image goes"
            )
        expanded: list[int] = []
        inputs: list[ImageInput] = []
        cursor = 0
        for position, image in zip(placeholders, images):
            content_hash, processed = self._process_image(image)
            expanded += token_ids[cursor:position]
            length = math.prod(processed.grid) // self.merge**2
            inputs.append(ImageInput(len(expanded), length, content_hash, processed.pixel_values, processed.grid))
            expanded += [self.image_token_id] * length
            cursor = position + 1
        expanded += token_ids[cursor:]
        positions, delta = mrope_positions(len(expanded), [(image.offset, image.grid) for image in inputs], self.merge)
        return MultiModalPrompt(expanded, tuple(inputs), positions, delta)

    def _process_image(self, image: Any) -> tuple[str, ProcessedImage]:
        key = image_content_hash(image, self.config.processor_kwargs)
        processed = self.cache.get(key)
        if processed is None:
            output = self.image_processor(images=[image], return_tensors="pt", **self.kwargs)
            grid = tuple(int(size) for size in output["image_grid_thw"][0])
            processed = ProcessedImage(output["pixel_values"], grid)
            self.cache.put(key, processed)
        return key, processed

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
