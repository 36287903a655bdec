"""What one vision-language architecture tells the multimodal processor: how an image (or video)
becomes its vision tower's input, and which tokens take the place of its placeholder.

``MultiModalProcessor`` (processor.py) does the rest the same way for every architecture:
checking prompts against the limits, the processed-input cache, and the expansion of each
placeholder into its replacement, in prompt order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fxllm.runtime.multimodal.cache import ProcessedInput
from fxllm.runtime.multimodal.inputs import VisionInput

# Image-processor arguments fxllm sets itself.
RESERVED_KWARGS = frozenset({"return_tensors", "images", "videos", "return_metadata"})
# The side of the image that checks mm_processor_kwargs once at start-up.
PROBE_IMAGE_SIDE = 32


@dataclass(frozen=True)
class Replacement:
    """The tokens that take the place of one placeholder. The vision tower's embeddings of the
    item fill ``tokens[embed_start : embed_start + embed_length]`` (of those, only the tokens
    equal to ``embed_token`` where one is given); the other tokens are text."""

    tokens: list[int]
    embed_start: int
    embed_length: int
    embed_token: int | None = None


class ArchitectureProcessor:
    """One architecture's part of multimodal processing. Subclasses take
    ``(model_dir, hf_config, config, tokenizer)`` and set ``placeholder_ids``: for each modality
    it takes, the token a prompt holds once per item."""

    placeholder_ids: dict[str, int]
    # How a prompt shows where an item goes, for error messages: modality -> text.
    placeholder_examples: dict[str, str]

    def placeholder_text(self, modality: str) -> str:
        """The placeholder as text (the token's string), for error messages."""
        raise NotImplementedError

    def process(self, modality: str, item: Any) -> ProcessedInput:
        """One image or video -> the vision tower's input (cached by the caller, by content)."""
        raise NotImplementedError

    def replacement(self, modality: str, processed: ProcessedInput) -> Replacement:
        raise NotImplementedError

    def rewrite_text(self, text: str) -> str | None:
        """The prompt text with textual placeholders turned into placeholder tokens, where the
        architecture has such and the text holds them (InternVL's ``<image>``); None to keep the
        tokens as they are."""
        return None

    def arrange(self, token_ids: list[int], counts: dict[str, int], index: int) -> tuple[list[int], list[tuple[int, str]]]:
        """The prompt's tokens and (position, modality) of each item's placeholder, in prompt
        order, checked against ``counts`` (items given per modality). Here: the placeholder
        tokens already in the prompt, one per item."""
        places = []
        for modality, count in counts.items():
            found = [position for position, token in enumerate(token_ids) if token == self.placeholder_ids[modality]]
            if len(found) != count:
                placeholder = self.placeholder_text(modality)
                raise ValueError(
                    f"prompt {index} has {len(found)} {modality} placeholder(s) {placeholder!r} but {count} "
                    f"{modality}(s): put one {placeholder} (e.g. {self.placeholder_examples[modality]}) "
                    f"where each {modality} goes"
                )
            places += [(position, modality) for position in found]
        return token_ids, sorted(places)

    def time_interval(self, processed: ProcessedInput) -> float:
        """M-RoPE temporal positions per frame (see VisionInput.time_interval)."""
        return 1.0

    def positions(self, token_ids: list[int], items: list[VisionInput]) -> tuple[np.ndarray | None, int]:
        """M-RoPE positions [3, T] of the expanded prompt and its decode delta; (None, 0) for a
        model whose positions are token indices."""
        return None, 0


def check_processor_kwargs(image_processor: Any, kwargs: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` checked against a Hugging Face image processor's arguments and tried on a probe
    image once, so a bad name or value is an error when the LLM is built. ``given``: what the
    user passed, for the message."""
    name = type(image_processor).__name__
    known = set(getattr(image_processor.valid_kwargs, "__annotations__", {})) - RESERVED_KWARGS
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(
            f"mm_processor_kwargs has argument(s) {unknown} that {name} does not take; it takes: {', '.join(sorted(known))}"
        )
    if kwargs:
        from PIL import Image

        probe = Image.new("RGB", (PROBE_IMAGE_SIDE, PROBE_IMAGE_SIDE))
        try:
            image_processor(images=[probe], return_tensors="pt", **kwargs)
        except Exception as error:  # transformers raises many types (its strict dataclasses, ...) for bad values
            raise ValueError(f"{name} rejects mm_processor_kwargs={given}: {error}") from error
    return kwargs


def load_hf_processor(model_dir: Path) -> Any:
    """The checkpoint's own Hugging Face processor (AutoProcessor), or a clear error."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(model_dir), trust_remote_code=False)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"could not load the image processor of {model_dir} ({error}): a vision-language checkpoint needs "
            f"its processor files (preprocessor_config.json or processor_config.json)"
        ) from error


def token_id(tokenizer: Any, token: str, model_dir: Path) -> int:
    """The id of a special token the architecture needs, or an error naming it."""
    if tokenizer is None:
        raise ValueError(f"the prompts of {model_dir} need its tokenizer (for {token!r}): drop skip_tokenizer_init")
    found = tokenizer.convert_tokens_to_ids(token)
    if found is None or found == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer of {model_dir} has no {token!r} token, which this architecture needs")
    return found
