"""Vision-language prompts -> MultiModalPrompt, all checked before anything runs.

Each image or video goes through its architecture's processing on its own (through the
processed-input cache), and its placeholder in the prompt is replaced by the tokens the
architecture says stand for it (for Qwen2-VL, one token per embedding the vision tower will
produce, as the HF processor does to the text). What differs between architectures lives in
one ``ArchitectureProcessor`` each (base.py); M-RoPE positions follow from where the items
landed, for the models that use them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fxllm.config import MODALITIES, MultiModalConfig
from fxllm.runtime.multimodal.base import ArchitectureProcessor, Replacement
from fxllm.runtime.multimodal.cache import ProcessedInput, ProcessedInputCache, content_hash
from fxllm.runtime.multimodal.inputs import MultiModalPrompt, VisionInput
from fxllm.runtime.multimodal.fuyu import FuyuProcessor
from fxllm.runtime.multimodal.internvl import InternVLChatProcessor, InternVLHFProcessor
from fxllm.runtime.multimodal.llava import LlavaNextProcessor, LlavaProcessor
from fxllm.runtime.multimodal.qwen2_vl import Qwen2VLProcessor

# Architecture (config.json) -> its part of the processing.
ARCHITECTURE_PROCESSORS: dict[str, type[ArchitectureProcessor]] = {
    "Qwen2VLForConditionalGeneration": Qwen2VLProcessor,
    "Qwen2_5_VLForConditionalGeneration": Qwen2VLProcessor,
    "InternVLChatModel": InternVLChatProcessor,
    "InternVLForConditionalGeneration": InternVLHFProcessor,
    "FuyuForCausalLM": FuyuProcessor,
    "LlavaForConditionalGeneration": LlavaProcessor,
    "LlavaNextForConditionalGeneration": LlavaNextProcessor,
}
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


def _embed_mask(replacement: Replacement) -> torch.Tensor | None:
    if replacement.embed_token is None:
        return None
    span = replacement.tokens[replacement.embed_start : replacement.embed_start + replacement.embed_length]
    return torch.tensor(span) == replacement.embed_token


class MultiModalProcessor:
    """Prompts with images and videos -> expanded token ids and processed items, for the
    checkpoint's architecture, with fxllm's limits, checked arguments and input cache."""

    def __init__(self, model_dir: Path, hf_config: Any, config: MultiModalConfig, tokenizer: Any):
        architecture = next((name for name in hf_config.architectures or () if name in ARCHITECTURE_PROCESSORS), None)
        if architecture is None:
            raise ValueError(
                f"no multimodal processing for {hf_config.architectures}; fxllm has it for "
                f"{', '.join(sorted(ARCHITECTURE_PROCESSORS))}"
            )
        self.architecture = ARCHITECTURE_PROCESSORS[architecture](model_dir, hf_config, config, tokenizer)
        self.tokenizer = tokenizer
        self.config = config
        self.cache = ProcessedInputCache(config.input_cache_bytes)

    def clear_cache(self) -> None:
        """Drop every processed image and video kept for reuse (LLM.reset_mm_cache)."""
        self.cache = ProcessedInputCache(self.config.input_cache_bytes)

    def process(
        self, token_ids: list[int], multi_modal_data: Any, index: int, text: str | None = None,
        add_special_tokens: bool = True,
    ) -> MultiModalPrompt:
        """``text``: the prompt's text where ``token_ids`` were tokenized from it (with
        ``add_special_tokens``), which lets an architecture with textual placeholders (InternVL's
        ``<image>``) find them."""
        given = check_mm_data(multi_modal_data, self.config, index)
        _check_images(given.get("image", []), index)
        _check_videos(given.get("video", []), index)
        architecture = self.architecture
        for modality, items in given.items():
            if items and modality not in architecture.placeholder_ids:
                raise ValueError(f"prompt {index}: this checkpoint has no {modality} processor or {modality} token")
        # Every placeholder needs an item and every item a placeholder, zero of a modality included.
        counts = {modality: len(given.get(modality, [])) for modality in architecture.placeholder_ids}
        rewritten = None if text is None else architecture.rewrite_text(text)
        if rewritten is not None:
            token_ids = self.tokenizer.encode(rewritten, add_special_tokens=add_special_tokens)
        token_ids, places = architecture.arrange(token_ids, counts, index)
        remaining = {modality: iter(given.get(modality, [])) for modality in counts}
        expanded: list[int] = []
        inputs: list[VisionInput] = []
        cursor = 0
        for position, modality in places:
            key, processed = self._process_item(modality, next(remaining[modality]))
            replacement = architecture.replacement(modality, processed)
            expanded += token_ids[cursor:position]
            inputs.append(VisionInput(
                modality, len(expanded) + replacement.embed_start, replacement.embed_length, key,
                processed.pixel_values, processed.grid, architecture.time_interval(processed), _embed_mask(replacement),
            ))
            expanded += replacement.tokens
            cursor = position + 1
        expanded += token_ids[cursor:]
        positions, delta = architecture.positions(expanded, inputs)
        return MultiModalPrompt(expanded, tuple(inputs), positions, delta)

    def _process_item(self, modality: str, item: Any) -> tuple[str, ProcessedInput]:
        key = content_hash(item, (("modality", modality), *self.config.processor_kwargs))
        processed = self.cache.get(key)
        if processed is None:
            processed = self.architecture.process(modality, item)
            self.cache.put(key, processed)
        return key, processed
