"""LLaVA-1.5 and LLaVA-NeXT prompts: the checkpoint's image processor, and each ``<image>`` token
repeated once per embedding the model makes of the image, as LlavaProcessor and
LlavaNextProcessor do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fxllm.config import MultiModalConfig
from fxllm.models.llava_next import num_image_tokens
from fxllm.runtime.multimodal.base import ArchitectureProcessor, Replacement, check_processor_kwargs, load_hf_processor
from fxllm.runtime.multimodal.cache import ProcessedInput


class LlavaProcessor(ArchitectureProcessor):
    """LLaVA-1.5: CLIP's resize, center crop and normalization; a token per patch (and one for the
    class token where the feature strategy keeps it)."""

    def __init__(self, model_dir: Path, hf_config: Any, config: MultiModalConfig, tokenizer: Any):
        processor = load_hf_processor(model_dir)
        self.image_processor = processor.image_processor
        self.placeholder = getattr(processor, "image_token", "<image>")
        self.placeholder_ids = {"image": hf_config.image_token_id}
        self.placeholder_examples = {"image": f"USER: {self.placeholder}\\nWhat is this? ASSISTANT:"}
        self.patch_size = hf_config.vision_config.patch_size
        self.class_token = int(hf_config.vision_feature_select_strategy != "default")
        given = dict(config.processor_kwargs)
        self.kwargs = check_processor_kwargs(self.image_processor, dict(given), given)

    def placeholder_text(self, modality: str) -> str:
        return self.placeholder

    def process(self, modality: str, item: Any) -> ProcessedInput:
        return ProcessedInput(self.image_processor(images=[item], return_tensors="pt", **self.kwargs)["pixel_values"], ())

    def replacement(self, modality: str, processed: ProcessedInput) -> Replacement:
        height, width = processed.pixel_values.shape[-2:]
        length = (height // self.patch_size) * (width // self.patch_size) + self.class_token
        return Replacement([self.placeholder_ids["image"]] * length, 0, length)


class LlavaNextProcessor(LlavaProcessor):
    """LLaVA-NeXT: the image processor's any-resolution tiles (base tile first), and as many
    ``<image>`` tokens as the tiles' unpadded features and row newlines take."""

    def __init__(self, model_dir: Path, hf_config: Any, config: MultiModalConfig, tokenizer: Any):
        super().__init__(model_dir, hf_config, config, tokenizer)
        self.hf_config = hf_config

    def process(self, modality: str, item: Any) -> ProcessedInput:
        output = self.image_processor(images=[item], return_tensors="pt", **self.kwargs)
        height, width = (int(size) for size in output["image_sizes"][0])
        return ProcessedInput(output["pixel_values"][0], (height, width))

    def replacement(self, modality: str, processed: ProcessedInput) -> Replacement:
        length = num_image_tokens(self.hf_config, *processed.grid)
        return Replacement([self.placeholder_ids["image"]] * length, 0, length)
