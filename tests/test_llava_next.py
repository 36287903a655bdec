"""LLaVA-NeXT specifics: the embeddings fxllm makes of an image (base tile, unpadded tile grid, row
newlines) number as many as LlavaNextProcessor's <image> tokens, for images of every shape."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, AutoProcessor

from fxllm.models.llava_next import num_image_tokens
from tests.tiny_llava_models import IMAGE_TOKEN_ID, save_tiny_llava_next
from tests.tiny_vl_models import make_image

SIZES = [(120, 50), (50, 120), (28, 28), (300, 31), (31, 300), (64, 60), (90, 200), (17, 29), (500, 499)]


@pytest.fixture(scope="module")
def llava_next_dir(tmp_path_factory):
    return save_tiny_llava_next(tmp_path_factory.mktemp("llava_next") / "llava_next")


def test_image_token_count_equals_transformers_processor(llava_next_dir):
    processor = AutoProcessor.from_pretrained(llava_next_dir)
    config = AutoConfig.from_pretrained(llava_next_dir)
    for width, height in SIZES:
        ids = processor(text=["<image>"], images=[make_image(width, height, seed=width)], return_tensors="pt")["input_ids"]
        assert num_image_tokens(config, height, width) == int((ids == IMAGE_TOKEN_ID).sum()), (width, height)
