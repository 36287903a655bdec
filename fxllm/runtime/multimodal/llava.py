"""LLaVA-1.5 prompts: the checkpoint's image processor (CLIP's resize, center crop and normalization),
and each ``<image>`` token repeated once per embedding the tower gives (a row per patch, plus one
for the class token where the feature strategy keeps it), as LlavaProcessor does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fxllm.config import MultiModalConfig
from fxllm.runtime.multimodal.base import ArchitectureProcessor, Replacement, check_processor_kwargs, load_hf_processor
from fxllm.runtime.multimodal.cache import ProcessedInput


class LlavaProcessor(ArchitectureProcessor):
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
