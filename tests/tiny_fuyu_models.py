"""Tiny random Persimmon and Fuyu checkpoints (Fuyu with the checkpoint's FuyuProcessor) and the
transformers oracle for them."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from PIL import Image
from tokenizers import processors
from transformers import FuyuConfig, FuyuForCausalLM, FuyuImageProcessor, FuyuProcessor, PersimmonConfig

from tests.tiny_models import VOCAB_SIZE, build_tokenizer, randomize_, save_config_checkpoint

FUYU_TOKENS = ["|SPEAKER|", "|NEWLINE|", "<0x04>"]
SPEAKER, NEWLINE, BOA = VOCAB_SIZE, VOCAB_SIZE + 1, VOCAB_SIZE + 2
FUYU_VOCAB_SIZE = VOCAB_SIZE + 16
BOS = 1
PATCH = 15
# The tiny processor fits images into 60 x 90 pixels: up to 4 rows of 6 patches.
MAX_HEIGHT, MAX_WIDTH = 60, 90


def persimmon_config(vocab_size: int = FUYU_VOCAB_SIZE) -> PersimmonConfig:
    """Persimmon's switches at a tiny size: half of each head rotates, q/k LayerNorms, squared ReLU."""
    return PersimmonConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        hidden_act="relu2", qk_layernorm=True, layer_norm_eps=1e-5, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 25000.0, "partial_rotary_factor": 0.5},
        bos_token_id=BOS, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, architectures=["PersimmonForCausalLM"],
    )


def save_tiny_persimmon(directory: Path, seed: int = 0) -> Path:
    return save_config_checkpoint(persimmon_config(VOCAB_SIZE), directory, seed)


def build_fuyu_tokenizer():
    """The tiny tokenizer with Fuyu's image, newline and beginning-of-answer tokens; like Fuyu's,
    it starts each encoding with BOS."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": FUYU_TOKENS})
    assert tokenizer.convert_tokens_to_ids(FUYU_TOKENS) == [SPEAKER, NEWLINE, BOA]
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return tokenizer


def save_tiny_fuyu(directory: Path, seed: int = 0) -> Path:
    config = FuyuConfig(
        text_config=persimmon_config().to_dict(), patch_size=PATCH, num_channels=3, image_token_id=SPEAKER,
        tie_word_embeddings=False, architectures=["FuyuForCausalLM"],
    )
    torch.manual_seed(seed)
    model = FuyuForCausalLM(config).float()
    randomize_(model, seed)
    model.save_pretrained(directory)
    image_processor = FuyuImageProcessor(
        size={"height": MAX_HEIGHT, "width": MAX_WIDTH}, patch_size={"height": PATCH, "width": PATCH}
    )
    FuyuProcessor(image_processor=image_processor, tokenizer=build_fuyu_tokenizer()).save_pretrained(directory)
    return directory


def hf_fuyu_inputs(model_dir: Path, text: str, image: Image.Image | None) -> tuple[list[int], torch.Tensor | None]:
    """(input ids, image patches) as the checkpoint's FuyuProcessor builds them: its image
    replacement (rows of |SPEAKER| closed by |NEWLINE|, then <s>), the text tokenized without
    special tokens, <0x04>. The replacement's text is tokenized here with the special tokens split
    out, which is what the processor's own tokenization of it yields with Fuyu's tokenizer."""
    processor = FuyuProcessor.from_pretrained(model_dir)
    tokenizer = processor.tokenizer
    if image is None:
        return tokenizer(text)["input_ids"], None
    images, replacements = processor._process_images([image], return_legacy_image_output=False)
    replacement_ids = tokenizer(replacements[0], add_special_tokens=False)["input_ids"]
    text_ids = tokenizer(text + FUYU_TOKENS[2], add_special_tokens=False)["input_ids"]
    return replacement_ids + text_ids, images["pixel_values"]


@functools.lru_cache(maxsize=None)
def fuyu_model(model_dir: Path) -> torch.nn.Module:
    """The transformers oracle, loaded once per checkpoint."""
    return FuyuForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
