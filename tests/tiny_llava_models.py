"""Tiny random LLaVA-1.5 checkpoints (CLIP tower, MLP projector, Llama decoder) with the checkpoint's
LlavaProcessor, and the transformers oracle for them."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from tests.tiny_models import VOCAB_SIZE, build_tokenizer, randomize_

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = VOCAB_SIZE
LLAVA_VOCAB_SIZE = VOCAB_SIZE + 16
IMAGE_SIZE = 56
PATCH = 14
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH) ** 2  # the class token dropped ("default" strategy)


def save_tiny_llava(directory: Path, seed: int = 0) -> Path:
    """LLaVA-1.5's shape: features from the second-to-last CLIP block, class token dropped."""
    config = LlavaConfig(
        text_config=dict(
            model_type="llama", vocab_size=LLAVA_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ),
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act="quick_gelu", projection_dim=32,
        ),
        image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", tie_word_embeddings=False, architectures=["LlavaForConditionalGeneration"],
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).float()
    randomize_(model, seed)
    model.save_pretrained(directory)
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == IMAGE_TOKEN_ID
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(directory)
    return directory


# LLaVA-NeXT at a tiny size: tiles of 28 pixels (2 x 2 patches), grids of up to three tiles.
NEXT_TILE = 28
NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]


def save_tiny_llava_next(directory: Path, seed: int = 0) -> Path:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor

    config = LlavaNextConfig(
        text_config=dict(
            model_type="mistral", vocab_size=LLAVA_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
            sliding_window=None, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ),
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, image_size=NEXT_TILE, patch_size=PATCH, hidden_act="quick_gelu", projection_dim=32,
        ),
        image_token_id=IMAGE_TOKEN_ID, image_grid_pinpoints=NEXT_PINPOINTS, vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
        architectures=["LlavaNextForConditionalGeneration"],
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).float()
    randomize_(model, seed)
    model.save_pretrained(directory)
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": NEXT_TILE}, crop_size={"height": NEXT_TILE, "width": NEXT_TILE},
        image_grid_pinpoints=NEXT_PINPOINTS,
    )
    LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(directory)
    return directory
