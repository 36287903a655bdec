"""InternVL prompts, both checkpoint layouts: each image becomes dynamic tiles, and its placeholder
becomes ``<img>``, ``num_image_token`` x tiles ``<IMG_CONTEXT>`` tokens (the image's embeddings),
``</img>``.

A prompt marks an image with ``<image>`` in its text (as InternVL's chat format does; fxllm
turns it into the context token before tokenizing) or with one ``<IMG_CONTEXT>`` token (the only
way with ``prompt_token_ids``, and transformers' processor's convention).

The original layout has no Hugging Face processor: fxllm tiles the images itself (tiling.py) with
the config's ``force_image_size``, ``min/max_dynamic_patch``, ``dynamic_image_size`` and
``use_thumbnail``, which ``mm_processor_kwargs`` may override. transformers' layout uses the
checkpoint's own image processor (``GotOcr2ImageProcessor`` cropping to patches), which also
takes those four names for its own (``min/max_patches``, ``crop_to_patches``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fxllm.config import MultiModalConfig
from fxllm.runtime.multimodal.base import (
    ArchitectureProcessor,
    Replacement,
    check_processor_kwargs,
    load_hf_processor,
    token_id,
)
from fxllm.runtime.multimodal.cache import ProcessedInput
from fxllm.runtime.multimodal.tiling import Tiling, tile_image

IMAGE_PLACEHOLDER = "<image>"
IMAGE_START, IMAGE_END, IMAGE_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
# mm_processor_kwargs of the original layout -> the Tiling field each sets.
TILING_KWARGS = {
    "max_dynamic_patch": "max_tiles",
    "min_dynamic_patch": "min_tiles",
    "dynamic_image_size": "dynamic",
    "use_thumbnail": "use_thumbnail",
}
# The same names for transformers' GotOcr2ImageProcessor (which always adds the thumbnail).
_GOT_OCR2_KWARGS = {"max_dynamic_patch": "max_patches", "min_dynamic_patch": "min_patches", "dynamic_image_size": "crop_to_patches"}


class _InternVLPrompts(ArchitectureProcessor):
    """What both layouts share: placeholders and the ``<img>`` ... ``</img>`` replacement."""

    def __init__(self, model_dir: Path, tokenizer: Any, num_image_token: int):
        self.start_id = token_id(tokenizer, IMAGE_START, model_dir)
        self.end_id = token_id(tokenizer, IMAGE_END, model_dir)
        self.context_id = token_id(tokenizer, IMAGE_CONTEXT, model_dir)
        self.placeholder_ids = {"image": self.context_id}
        self.placeholder_examples = {"image": f"{IMAGE_PLACEHOLDER}\\n before the question"}
        self.num_image_token = num_image_token

    def placeholder_text(self, modality: str) -> str:
        return IMAGE_PLACEHOLDER

    def rewrite_text(self, text: str) -> str | None:
        return text.replace(IMAGE_PLACEHOLDER, IMAGE_CONTEXT) if IMAGE_PLACEHOLDER in text else None

    def replacement(self, modality: str, processed: ProcessedInput) -> Replacement:
        (tiles,) = processed.grid
        length = tiles * self.num_image_token
        return Replacement([self.start_id, *[self.context_id] * length, self.end_id], 1, length)


class InternVLChatProcessor(_InternVLPrompts):
    """The original layout: fxllm's tiling."""

    def __init__(self, model_dir: Path, hf_config: Any, config: MultiModalConfig, tokenizer: Any):
        vision = hf_config.vision_config
        image_size = getattr(hf_config, "force_image_size", None) or vision.image_size
        super().__init__(model_dir, tokenizer, int((image_size // vision.patch_size) ** 2 * hf_config.downsample_ratio**2))
        given = dict(config.processor_kwargs)
        unknown = sorted(set(given) - set(TILING_KWARGS))
        if unknown:
            raise ValueError(
                f"mm_processor_kwargs has argument(s) {unknown} that InternVL's tiling does not take; "
                f"it takes: {', '.join(sorted(TILING_KWARGS))}"
            )
        settings = {
            "max_tiles": getattr(hf_config, "max_dynamic_patch", 12),
            "min_tiles": getattr(hf_config, "min_dynamic_patch", 1),
            "dynamic": getattr(hf_config, "dynamic_image_size", True),
            "use_thumbnail": getattr(hf_config, "use_thumbnail", True),
        }
        settings.update({TILING_KWARGS[key]: value for key, value in given.items()})
        for key in ("max_tiles", "min_tiles"):
            if not isinstance(settings[key], int) or isinstance(settings[key], bool):
                raise ValueError(f"mm_processor_kwargs: the tile limits must be ints, got {given}")
        self.tiling = Tiling(tile_size=image_size, **settings)

    def process(self, modality: str, item: Any) -> ProcessedInput:
        tiles = tile_image(item, self.tiling)
        return ProcessedInput(tiles, (tiles.shape[0],))


class InternVLHFProcessor(_InternVLPrompts):
    """transformers' layout: the checkpoint's image processor, cropping to patches."""

    def __init__(self, model_dir: Path, hf_config: Any, config: MultiModalConfig, tokenizer: Any):
        processor = load_hf_processor(model_dir)
        self.image_processor = processor.image_processor
        super().__init__(model_dir, tokenizer, processor.image_seq_length)
        given = dict(config.processor_kwargs)
        kwargs = {"crop_to_patches": True, **{_GOT_OCR2_KWARGS.get(key, key): value for key, value in given.items()}}
        self.kwargs = check_processor_kwargs(self.image_processor, kwargs, given)

    def process(self, modality: str, item: Any) -> ProcessedInput:
        output = self.image_processor(images=[item], return_tensors="pt", **self.kwargs)
        return ProcessedInput(output["pixel_values"], (int(output["num_patches"][0]),))
