"""InternVL specifics: fxllm's dynamic tiling against transformers' GotOcr2ImageProcessor, the
tiling arguments of mm_processor_kwargs (vLLM's example call among them), how prompts mark images,
and the pixel shuffle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fxllm import LLM, SamplingParams
from fxllm.models.internvl import pixel_shuffle
from fxllm.runtime.multimodal.tiling import Tiling, num_tiles, tile_image
from tests.tiny_internvl_models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMG_CONTEXT,
    MAX_TILES,
    TILE,
    TOKENS_PER_TILE,
    original_internvl_pixels,
    save_internvl_hf,
    save_tiny_internvl,
)
from tests.tiny_vl_models import make_image
from tests.vlm_cases import greedy_with_images, hf_model, processor_inputs

NEW_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
# Aspect ratio 5: 5 x 1 tiles within 6, 4 x 1 within vLLM's example limit of 4 (each with a thumbnail).
LONG = make_image(500, 100, seed=3)
PROMPT = "<image>\nWhat is in the picture?"


@pytest.fixture(scope="module")
def internvl_dirs(tmp_path_factory) -> tuple[Path, Path]:
    return save_tiny_internvl(tmp_path_factory.mktemp("internvl"), "qwen2")


@pytest.fixture(scope="module")
def internvl_hf_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("internvl_hf") / "hf"
    save_internvl_hf(directory, "qwen2", feature_layer=-1, pil_processor=False)
    return directory


SIZES = [(120, 50), (60, 150), (56, 56), (500, 100), (100, 500), (300, 290), (37, 211), (1000, 31), (84, 112)]
LIMITS = [(1, 6), (1, 4), (1, 1), (2, 12), (3, 9)]


@pytest.mark.parametrize("min_tiles, max_tiles", LIMITS)
def test_tile_count_and_order_equal_transformers_got_ocr2(min_tiles, max_tiles):
    """The same grid for every size and limit (closest aspect ratio, ties to the larger grid while
    the image covers half of it), tiles row by row, the thumbnail last when there is more than one.
    Pixels differ by resizing (PIL's, as InternVL's own code, against torchvision's): each tile is
    checked to be closest to the tile at its own place."""
    from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor

    reference = GotOcr2ImageProcessor(
        size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=min_tiles, max_patches=max_tiles,
        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
    )
    tiling = Tiling(TILE, min_tiles, max_tiles)
    for seed, (width, height) in enumerate(SIZES):
        image = make_image(width, height, seed)
        theirs = reference(images=[image], return_tensors="pt")["pixel_values"]
        ours = tile_image(image, tiling)
        assert ours.shape == theirs.shape and num_tiles(width, height, tiling) == ours.shape[0], (width, height)
        distances = (theirs[:, None] - ours[None]).abs().mean(dim=(2, 3, 4))  # [theirs, ours]
        assert distances.argmin(dim=1).tolist() == list(range(ours.shape[0])), (width, height)


def test_tiles_are_internvl_own_preprocessing():
    for width, height in SIZES:
        image = make_image(width, height, seed=width)
        assert torch.equal(tile_image(image, Tiling(TILE, 1, MAX_TILES)), original_internvl_pixels(image))


def test_vllm_example_call_limits_the_tiles_and_matches_transformers(internvl_dirs):
    """LLM(model=..., mm_processor_kwargs={"max_dynamic_patch": 4}) as on vLLM's example page."""
    model_dir, twin = internvl_dirs
    request = {"prompt": PROMPT, "multi_modal_data": {"image": LONG}}
    default = LLM(model=str(model_dir), enforce_eager=True).generate(request, GREEDY, use_tqdm=False)[0]
    assert default.prompt_token_ids.count(IMG_CONTEXT) == (5 + 1) * TOKENS_PER_TILE
    llm = LLM(model=str(model_dir), enforce_eager=True, mm_processor_kwargs={"max_dynamic_patch": 4})
    output = llm.generate(request, GREEDY, use_tqdm=False)[0]
    assert output.prompt_token_ids.count(IMG_CONTEXT) == (4 + 1) * TOKENS_PER_TILE
    prompt_ids, _ = processor_inputs(twin, PROMPT, (LONG,), max_patches=4)
    pixels = {"pixel_values": original_internvl_pixels(LONG, max_tiles=4)}
    assert output.prompt_token_ids == prompt_ids
    assert output.outputs[0].token_ids == greedy_with_images(hf_model(twin), prompt_ids, pixels, NEW_TOKENS)


@pytest.mark.parametrize(
    "kwargs, tiles",
    [({"dynamic_image_size": False}, 1), ({"use_thumbnail": False}, 5), ({"min_dynamic_patch": 6, "max_dynamic_patch": 8}, 7)],
)
def test_tiling_arguments_override_the_config(internvl_dirs, kwargs, tiles):
    llm = LLM(model=str(internvl_dirs[0]), enforce_eager=True, mm_processor_kwargs=kwargs)
    output = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": LONG}}, GREEDY, use_tqdm=False)[0]
    assert output.prompt_token_ids.count(IMG_CONTEXT) == tiles * TOKENS_PER_TILE


def test_bad_tiling_arguments_are_errors_when_the_llm_is_built(internvl_dirs, internvl_hf_dir):
    model_dir = str(internvl_dirs[0])
    with pytest.raises(ValueError, match=r"\['max_pixels'\] that InternVL's tiling does not take; it takes: dynamic_image_size"):
        LLM(model=model_dir, enforce_eager=True, mm_processor_kwargs={"max_pixels": 100})
    with pytest.raises(ValueError, match="1 <= min_dynamic_patch <= max_dynamic_patch"):
        LLM(model=model_dir, enforce_eager=True, mm_processor_kwargs={"min_dynamic_patch": 5, "max_dynamic_patch": 4})
    with pytest.raises(ValueError, match=r"\['use_thumbnail'\] that GotOcr2ImageProcessor does not take"):
        LLM(model=str(internvl_hf_dir), enforce_eager=True, mm_processor_kwargs={"use_thumbnail": False})


def test_transformers_layout_takes_the_tiling_names_for_its_own(internvl_hf_dir):
    llm = LLM(model=str(internvl_hf_dir), enforce_eager=True, mm_processor_kwargs={"max_dynamic_patch": 4})
    output = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": LONG}}, GREEDY, use_tqdm=False)[0]
    assert output.prompt_token_ids.count(IMG_CONTEXT) == (4 + 1) * TOKENS_PER_TILE
    prompt_ids, pixels = processor_inputs(internvl_hf_dir, PROMPT, (LONG,), max_patches=4)
    assert output.prompt_token_ids == prompt_ids
    assert output.outputs[0].token_ids == greedy_with_images(hf_model(internvl_hf_dir), prompt_ids, pixels, NEW_TOKENS)


def test_images_are_marked_by_image_text_or_the_context_token(internvl_dirs):
    """<image> in the text, <IMG_CONTEXT> in the text, or the <IMG_CONTEXT> id in prompt_token_ids:
    the same expanded prompt and tokens."""
    llm = LLM(model=str(internvl_dirs[0]), enforce_eager=True)
    tokenizer = llm.get_tokenizer()
    as_text = PROMPT.replace("<image>", "<IMG_CONTEXT>")
    prompts = [
        {"prompt": PROMPT, "multi_modal_data": {"image": LONG}},
        {"prompt": as_text, "multi_modal_data": {"image": LONG}},
        {"prompt_token_ids": tokenizer.encode(as_text), "multi_modal_data": {"image": LONG}},
    ]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert outputs[0].prompt_token_ids == outputs[1].prompt_token_ids == outputs[2].prompt_token_ids
    assert outputs[0].outputs[0].token_ids == outputs[1].outputs[0].token_ids == outputs[2].outputs[0].token_ids
    # Token ids given by the caller are kept as they are: "<image>" there is plain text, not an image.
    with pytest.raises(ValueError, match=r"0 image placeholder\(s\) '<image>' but 1 image"):
        llm.generate({"prompt_token_ids": tokenizer.encode(PROMPT), "multi_modal_data": {"image": LONG}}, GREEDY, use_tqdm=False)


def test_pixel_shuffle_folds_blocks_of_patches_and_v1_leaves_the_sides_transposed():
    features = torch.arange(2 * 4 * 4 * 3, dtype=torch.float).reshape(2, 4, 4, 3)  # [tiles, rows, columns, dim]
    v2 = pixel_shuffle(features, 0.5, "v2")
    assert v2.shape == (2, 2, 2, 12)
    # Output (r, c) gathers input rows 2r, 2r+1 and columns 2c, 2c+1.
    assert torch.equal(v2[0, 1, 0], torch.cat([features[0, 2, 0], features[0, 2, 1], features[0, 3, 0], features[0, 3, 1]]))
    assert torch.equal(pixel_shuffle(features, 0.5, "v1"), v2.transpose(1, 2))
