"""Tiny random-weight vision-language checkpoints (Qwen2-VL, Qwen2.5-VL, Gemma 3) with real processors,
generated test images, and the HF oracle for them."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from tests.tiny_models import build_tokenizer, randomize_, save_random_checkpoint

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = range(320, 324)  # ids after the tiny tokenizer's 320
VL_VOCAB_SIZE = 336
PATCH = 14
MERGE = 2
# Resize bounds of the tiny processor: 4 to 16 merged patches (image tokens) per image.
MIN_PIXELS = (PATCH * MERGE) ** 2 * 4
MAX_PIXELS = (PATCH * MERGE) ** 2 * 16
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"

_TEXT = dict(
    vocab_size=VL_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
    # head_dim 16: 8 rotary frequencies, split temporal 2, height 3, width 3.
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
)
_SPECIAL_IDS = dict(
    image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END
)
_VISION = dict(depth=2, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2)

VL_CONFIGS = {
    "qwen2_vl": lambda: Qwen2VLConfig(
        text_config=_TEXT, vision_config=dict(**_VISION, embed_dim=32, mlp_ratio=2, hidden_size=64), **_SPECIAL_IDS,
        tie_word_embeddings=False, architectures=["Qwen2VLForConditionalGeneration"],
    ),
    # Windows of 2 x 2 merged patches (window_size 56 pixels), full attention in block 1 only; tied embeddings.
    "qwen2_5_vl": lambda: Qwen2_5_VLConfig(
        text_config=_TEXT,
        vision_config=dict(
            **_VISION, hidden_size=32, intermediate_size=48, out_hidden_size=64, window_size=56, fullatt_block_indexes=[1]
        ),
        **_SPECIAL_IDS, tie_word_embeddings=True, architectures=["Qwen2_5_VLForConditionalGeneration"],
    ),
}
_VL_CLASSES = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}
# Each architecture's own processor: Qwen2.5-VL's also reports the seconds per temporal patch.
_PROCESSOR_CLASSES = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor}


def build_vl_tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    assert tokenizer.convert_tokens_to_ids(VISION_TOKENS) == [VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
    return tokenizer


def save_tiny_vl_model(arch: str, directory: Path, seed: int = 0) -> Path:
    """A random-weight checkpoint of ``arch`` (a key of VL_CONFIGS) with its processor."""
    torch.manual_seed(seed)
    model = _VL_CLASSES[arch](VL_CONFIGS[arch]()).float()
    randomize_(model, seed)
    model.save_pretrained(directory)
    image_processor = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    video_processor = Qwen2VLVideoProcessor(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})
    processor = _PROCESSOR_CLASSES[arch](
        image_processor=image_processor, tokenizer=build_vl_tokenizer(), video_processor=video_processor
    )
    processor.save_pretrained(directory)
    return directory


def save_tiny_gemma3_vl_model(directory: Path, seed: int = 0) -> Path:
    """A Gemma3ForConditionalGeneration checkpoint (SigLIP tower and projector included)."""
    config = Gemma3Config(
        text_config=dict(
            vocab_size=VL_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=256, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"], bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
        ),
        mm_tokens_per_image=1, image_token_index=IMAGE_PAD, architectures=["Gemma3ForConditionalGeneration"],
    )
    torch.manual_seed(seed)
    return save_random_checkpoint(Gemma3ForConditionalGeneration(config).float(), directory, seed)


def make_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def make_video(frames: int, width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


_HF_VISION_INPUTS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def hf_vl_greedy(
    model_dir: Path, prompt: str, images: list[Image.Image], max_new_tokens: int, videos: list[np.ndarray] = ()
) -> tuple[list[int], list[int]]:
    """The oracle: HF's processor and model, fp32, one prompt, each step a full forward without
    a KV cache (so M-RoPE positions come from HF's own get_rope_index every step).
    Returns (prompt ids, generated ids)."""
    inputs = AutoProcessor.from_pretrained(model_dir)(
        text=[prompt], images=images or None, videos=list(videos) or None, return_tensors="pt"
    )
    prompt_ids = inputs["input_ids"][0].tolist()
    type_ids = inputs["mm_token_type_ids"]
    extra = {key: inputs[key] for key in _HF_VISION_INPUTS if key in inputs}
    return prompt_ids, _greedy(model_dir, prompt_ids, max_new_tokens, mm_token_type_ids=type_ids, **extra)


def hf_text_greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The oracle for a text-only prompt on a vision-language checkpoint."""
    return _greedy(model_dir, prompt_ids, max_new_tokens)


def _greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int, **inputs) -> list[int]:
    model = _hf_model(model_dir)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if "mm_token_type_ids" in inputs:  # generated tokens are text (type 0)
                inputs["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, 1))[:, : ids.shape[1]]
            logits = model(input_ids=ids, use_cache=False, **inputs).logits
            ids = torch.cat([ids, logits[0, -1].argmax().view(1, 1)], dim=1)
    return ids[0, len(prompt_ids) :].tolist()


@functools.lru_cache(maxsize=None)
def _hf_model(model_dir: Path) -> torch.nn.Module:
    """The HF oracle model, loaded once per checkpoint."""
    return AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
