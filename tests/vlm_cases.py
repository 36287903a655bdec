"""The vision-language checkpoints the runtime tests drive alike (InternVL in both layouts and with
each of its decoders, Fuyu, LLaVA, LLaVA-NeXT): how to build each, how its prompts place images, and its
transformers oracle (fp32, one prompt at a time, each step a full forward without a KV cache)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from tests.tiny_fuyu_models import SPEAKER, fuyu_model, hf_fuyu_inputs, save_tiny_fuyu
from tests.tiny_internvl_models import IMG_CONTEXT, original_internvl_pixels, save_internvl_hf, save_tiny_internvl
from tests.tiny_llava_models import IMAGE_TOKEN_ID, save_tiny_llava, save_tiny_llava_next
from tests.tiny_vl_models import make_image

# (oracle checkpoint, text, images) -> (transformers model, prompt ids, get_image_features' arguments or None)
InputsMaker = Callable[[Path, str, tuple[Image.Image, ...]], tuple[torch.nn.Module, list[int], dict | None]]


@dataclass(frozen=True)
class VLCase:
    name: str
    build: Callable[[Path], tuple[Path, Path]]  # a root folder -> (checkpoint, the oracle's checkpoint)
    placeholder: str  # what the prompt text holds per image ("" where images need none)
    oracle_inputs: InputsMaker
    embed_token: int  # the token whose rows take image embeddings
    max_images: int = 3  # per prompt

    def prompt(self, text: str, num_images: int) -> str:
        """``text`` with ``num_images`` images placed before it."""
        return "".join(f"Image-{i + 1}: {self.placeholder}\n" for i in range(num_images) if self.placeholder) + text

    def oracle(self, model_dir: Path, text: str, images: tuple[Image.Image, ...], max_new_tokens: int):
        """(prompt ids, greedy tokens) from transformers."""
        model, prompt_ids, image_inputs = self.oracle_inputs(model_dir, text, images)
        return prompt_ids, greedy_with_images(model, prompt_ids, image_inputs, max_new_tokens)


def _processor_inputs_for(model_dir: Path, text: str, images: tuple[Image.Image, ...]):
    """transformers' own processor and model (InternVL's with <IMG_CONTEXT> where fxllm reads <image>)."""
    return (hf_model(model_dir), *processor_inputs(model_dir, text, images))


def _internvl_chat_inputs(model_dir: Path, text: str, images: tuple[Image.Image, ...]):
    """The original layout's oracle: the transformers twin, fed the prompt ids its processor expands
    (the same tile counts) and the pixels of InternVL's own preprocessing (original_internvl_pixels)."""
    prompt_ids, _ = processor_inputs(model_dir, text, images)
    pixel_values = torch.cat([original_internvl_pixels(image) for image in images]) if images else None
    return hf_model(model_dir), prompt_ids, None if pixel_values is None else {"pixel_values": pixel_values}


def _fuyu_inputs(model_dir: Path, text: str, images: tuple[Image.Image, ...]):
    prompt_ids, patches = hf_fuyu_inputs(model_dir, text, images[0] if images else None)
    return fuyu_model(model_dir), prompt_ids, None if patches is None else {"pixel_values": patches[None]}


def processor_inputs(
    model_dir: Path, text: str, images: tuple[Image.Image, ...], **processor_kwargs
) -> tuple[list[int], dict | None]:
    """Prompt ids and the image inputs (pixel values, and image sizes where the processor gives
    them) from the checkpoint's transformers processor."""
    processor = AutoProcessor.from_pretrained(model_dir)
    text = text.replace("<image>", "<IMG_CONTEXT>") if "internvl" in type(processor).__name__.lower() else text
    inputs = processor(text=[text], images=list(images) or None, return_tensors="pt", **processor_kwargs)
    image_inputs = {key: inputs[key] for key in ("pixel_values", "image_sizes") if key in inputs} if images else None
    return inputs["input_ids"][0].tolist(), image_inputs


def greedy_with_images(model: torch.nn.Module, prompt_ids: list[int], image_inputs: dict | None, max_new_tokens: int) -> list[int]:
    """Greedy tokens of a transformers vision-language model (see ``greedy_steps``)."""
    return [token for token, _ in greedy_steps(model, prompt_ids, image_inputs, max_new_tokens)]


def greedy_steps(
    model: torch.nn.Module, prompt_ids: list[int], image_inputs: dict | None, max_new_tokens: int, top_k: int = 1
) -> list[tuple[int, list[int]]]:
    """(greedy token, the top_k tokens) of each step of a transformers vision-language model.
    The prompt's embeddings are merged with the image features once, as the model merges them
    (its get_image_features, placeholder mask and scatter); generated tokens are then embedded as
    text, so a generated image token (a tiny random model makes them) stays a token, as in fxllm,
    instead of asking for image features."""
    ids = torch.tensor([prompt_ids])
    embed = model.get_input_embeddings()
    steps: list[tuple[int, list[int]]] = []
    with torch.no_grad():
        embeds = embed(ids)
        if image_inputs is not None:
            output = model.model.get_image_features(**image_inputs, return_dict=True)
            features = output.pooler_output if output.pooler_output is not None else output.last_hidden_state
            features = torch.cat([f.reshape(-1, embeds.shape[-1]) for f in features], dim=0)
            mask = model.model.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=features)
            embeds = embeds.masked_scatter(mask, features.to(embeds.dtype))
        for _ in range(max_new_tokens):
            logits = model(inputs_embeds=embeds, use_cache=False).logits[0, -1]
            steps.append((int(logits.argmax()), logits.topk(top_k).indices.tolist()))
            embeds = torch.cat([embeds, embed(torch.tensor([[steps[-1][0]]]))], dim=1)
    return steps


@functools.lru_cache(maxsize=None)
def hf_model(model_dir: Path) -> torch.nn.Module:
    return AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()


def _internvl_hf(root: Path) -> tuple[Path, Path]:
    directory = root / "internvl_hf"
    save_internvl_hf(directory, "qwen2", feature_layer=-1, pil_processor=False)
    return directory, directory


def _same_dir(save: Callable[[Path], Path], name: str) -> Callable[[Path], tuple[Path, Path]]:
    def build(root: Path) -> tuple[Path, Path]:
        directory = save(root / name)
        return directory, directory

    return build


CASES = {
    **{
        f"internvl_chat_{language_model}": VLCase(
            f"internvl_chat_{language_model}", functools.partial(save_tiny_internvl, language_model=language_model),
            "<image>", _internvl_chat_inputs, IMG_CONTEXT,
        )
        for language_model in ("internlm2", "qwen2", "phi3")
    },
    "internvl_hf": VLCase("internvl_hf", _internvl_hf, "<image>", _processor_inputs_for, IMG_CONTEXT),
    "fuyu": VLCase("fuyu", _same_dir(save_tiny_fuyu, "fuyu"), "", _fuyu_inputs, SPEAKER, max_images=1),
    "llava": VLCase("llava", _same_dir(save_tiny_llava, "llava"), "<image>", _processor_inputs_for, IMAGE_TOKEN_ID),
    "llava_next": VLCase(
        "llava_next", _same_dir(save_tiny_llava_next, "llava_next"), "<image>", _processor_inputs_for, IMAGE_TOKEN_ID,
    ),
}

# Sizes and aspect ratios the towers see differently: InternVL tiles the wide one 2 x 1 and the
# tall one 1 x 3 (each with a thumbnail) and the square one not at all; Fuyu cuts them into 3 x 6,
# 4 x 2 and 4 x 4 patches; LLaVA crops each to its square.
IMAGES = {
    "wide": make_image(120, 50, seed=0),
    "wide_other": make_image(120, 50, seed=5),  # the wide one's size: the same placeholder tokens
    "tall": make_image(60, 150, seed=1),
    "square": make_image(56, 56, seed=2),
}
