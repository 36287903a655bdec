"""Fuyu prompts, laid out as the checkpoint's FuyuProcessor lays them out: the image first, as
rows of ``|SPEAKER|`` tokens (one per patch) each closed by ``|NEWLINE|``, then BOS, the prompt's
text, and the beginning-of-answer token ``<0x04>``. The prompt holds no placeholder; one image per
prompt, as the processor takes. Patches come from the checkpoint's image processor (resized to
fit, padded, cut to the patch rows and columns the image covers).
"""

from __future__ import annotations

import math
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

IMAGE_TOKEN, NEWLINE_TOKEN = "|SPEAKER|", "|NEWLINE|"
BEGINNING_OF_ANSWER = "<0x04>"


class FuyuProcessor(ArchitectureProcessor):
    def __init__(self, model_dir: Path, hf_config: Any, config: MultiModalConfig, tokenizer: Any):
        processor = load_hf_processor(model_dir)
        self.image_processor = processor.image_processor
        self.image_id = token_id(tokenizer, IMAGE_TOKEN, model_dir)
        self.newline_id = token_id(tokenizer, NEWLINE_TOKEN, model_dir)
        self.answer_id = token_id(tokenizer, BEGINNING_OF_ANSWER, model_dir)
        if tokenizer.bos_token_id is None:
            raise ValueError(f"the tokenizer of {model_dir} has no BOS token, which Fuyu prompts need")
        self.bos_id = tokenizer.bos_token_id
        self.placeholder_ids = {"image": self.bos_id}  # the image goes where the BOS token is
        self.placeholder_examples = {"image": "nothing: the image goes before the text"}
        given = dict(config.processor_kwargs)
        self.kwargs = check_processor_kwargs(self.image_processor, dict(given), given)

    def placeholder_text(self, modality: str) -> str:
        return IMAGE_TOKEN

    def arrange(self, token_ids: list[int], counts: dict[str, int], index: int) -> tuple[list[int], list[tuple[int, str]]]:
        """BOS, the text (without a BOS the tokenizer added), ``<0x04>``; the image replaces the BOS."""
        if not counts["image"]:
            return token_ids, []
        if counts.get("image", 0) > 1:
            raise ValueError(
                f"prompt {index} has {counts['image']} images but Fuyu takes one per prompt (its processor puts "
                f"it before the text): pass one, with limit_mm_per_prompt={{'image': 1}} to check it up front"
            )
        text = token_ids[1:] if token_ids[:1] == [self.bos_id] else token_ids
        answer = [] if text[-1:] == [self.answer_id] else [self.answer_id]
        return [self.bos_id, *text, *answer], [(0, "image")]

    def process(self, modality: str, item: Any) -> ProcessedInput:
        """Patches [rows x columns, patch * patch * 3] of the area the resized image covers."""
        output = self.image_processor(images=[item], return_tensors="pt", **self.kwargs)
        padded = output["images"][0]  # [1, 3, padded height, padded width]
        patch = self.image_processor.patch_size
        height = min(padded.shape[-2], math.ceil(int(output["image_unpadded_heights"][0][0]) / patch.height) * patch.height)
        width = min(padded.shape[-1], math.ceil(int(output["image_unpadded_widths"][0][0]) / patch.width) * patch.width)
        patches = self.image_processor.patchify_image(padded[..., :height, :width], patch_size=patch)[0]
        return ProcessedInput(patches, (height // patch.height, width // patch.width))

    def replacement(self, modality: str, processed: ProcessedInput) -> Replacement:
        rows, columns = processed.grid
        image = ([self.image_id] * columns + [self.newline_id]) * rows
        return Replacement([*image, self.bos_id], 0, len(image), embed_token=self.image_id)
