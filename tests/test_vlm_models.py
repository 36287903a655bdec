"""InternVL (both layouts; InternLM2, Qwen2 and Phi-3 decoders), Fuyu and LLaVA on the engine: greedy
tokens identical to transformers for batches mixing images of several sizes with text prompts,
eager with chunks that end inside images, and compiled; limits, the processed-input cache, prefix
caching that tells images apart, and preemption, as for Qwen2-VL."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from fxllm import LLM, SamplingParams
from fxllm.config import CompilationLevel, CUDAGraphMode
from tests.conftest import assert_all_blocks_free
from tests.vlm_cases import CASES, IMAGES, VLCase

NEW_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
BLOCK = 4
# Chunks of 7 tokens end inside the images of every prompt below.
CHUNKED_BUDGET = 7
MAX_MODEL_LEN = 160
TEXT = "Once upon a time there was"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("vlm_models")
    return {name: case.build(root) for name, case in CASES.items()}


def batch(case: VLCase) -> list[tuple[str, tuple[str, ...]]]:
    """(prompt text, image names): one image; two or three of different sizes (Fuyu takes one a
    prompt: another size instead); text only."""
    if case.max_images == 1:
        return [("Describe it.\n", ("wide",)), ("What is here?\n", ("tall",)), (TEXT, ())]
    return [
        (case.prompt("Describe it.", 1), ("wide",)),
        (case.prompt("Compare them.", 3), ("tall", "square", "wide")),
        (case.prompt("And these two?", 2), ("square", "tall")),
        (TEXT, ()),
    ]


@functools.lru_cache(maxsize=None)
def oracle(name: str, model_dir: Path, text: str, images: tuple[str, ...]) -> tuple[list[int], list[int]]:
    return CASES[name].oracle(model_dir, text, tuple(IMAGES[image] for image in images), NEW_TOKENS)


def request(text: str, images: tuple[str, ...]) -> str | dict:
    return {"prompt": text, "multi_modal_data": {"image": [IMAGES[n] for n in images]}} if images else text


def engine(checkpoint: Path, **kwargs) -> LLM:
    settings = dict(enforce_eager=True, block_size=BLOCK, max_model_len=MAX_MODEL_LEN)
    return LLM(model=str(checkpoint), **{**settings, **kwargs})


def assert_batch_matches_transformers(llm: LLM, case: VLCase, checkpoints) -> None:
    _, reference = checkpoints[case.name]
    prompts = batch(case)
    outputs = llm.generate([request(text, images) for text, images in prompts], GREEDY, use_tqdm=False)
    for (text, images), output in zip(prompts, outputs):
        prompt_ids, generated = oracle(case.name, reference, text, images)
        assert output.prompt_token_ids == prompt_ids  # placeholders expanded as transformers' processor does
        assert output.outputs[0].token_ids == generated


@pytest.mark.parametrize("name", sorted(CASES))
def test_batches_match_transformers_with_chunks_ending_inside_images(checkpoints, name):
    case = CASES[name]
    llm = engine(checkpoints[name][0], max_num_batched_tokens=CHUNKED_BUDGET)
    assert_batch_matches_transformers(llm, case, checkpoints)
    # Each image is encoded once, however many chunks its tokens span.
    assert llm.llm_engine.runner.embedder.items_encoded <= sum(len(images) for _, images in batch(case))
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_matches_transformers(checkpoints, name, tmp_path):
    """The decoder captured, split at attention and compiled by Inductor from inputs_embeds (the
    vision tower compiled block by block where it has blocks)."""
    case = CASES[name]
    compilation = {"level": 3, "cache_dir": str(tmp_path), "compile_mm_encoder": True}
    llm = LLM(model=str(checkpoints[name][0]), max_model_len=MAX_MODEL_LEN, compilation_config=compilation)
    report = llm.compile_report()
    assert report.level == CompilationLevel.PIECEWISE and report.pieces == 5 and report.dynamo_compiles == 1
    assert report.mm_encoder_compiled == (name != "fuyu")  # Fuyu's patches go through one linear layer
    assert llm.llm_engine_config.compilation.cudagraph_mode is CUDAGraphMode.NONE
    assert_batch_matches_transformers(llm, case, checkpoints)


@pytest.mark.parametrize("name", sorted(CASES))
def test_image_limit_and_placeholder_count_are_checked_before_anything_runs(checkpoints, name):
    case = CASES[name]
    llm = engine(checkpoints[name][0], limit_mm_per_prompt={"image": 1})
    two = request(case.prompt("Two?", 2), ("wide", "square"))
    with pytest.raises(ValueError, match=r"2 image input\(s\) but limit_mm_per_prompt allows 1"):
        llm.generate([request(*batch(case)[0]), two], GREEDY, use_tqdm=False)
    if case.placeholder:
        missing = request(TEXT, ("wide",))
        with pytest.raises(ValueError, match=r"0 image placeholder\(s\) .* but 1 image\(s\)"):
            llm.generate(missing, GREEDY, use_tqdm=False)
    else:
        with pytest.raises(ValueError, match="takes one per prompt"):
            engine(checkpoints[name][0]).generate(two, GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished()
    text, images = batch(case)[0]
    output = llm.generate(request(text, images), GREEDY, use_tqdm=False)[0]  # the engine still serves
    assert output.outputs[0].token_ids == oracle(name, checkpoints[name][1], text, images)[1]


@pytest.mark.parametrize("name", sorted(CASES))
def test_zero_image_limit_builds_no_vision_part_and_runs_text_only(checkpoints, name):
    llm = engine(checkpoints[name][0], limit_mm_per_prompt={"image": 0})
    model = llm.llm_engine.runner.model
    assert llm.mm_processor is None
    assert all(param.startswith("language_model.") for param, _ in model.named_parameters())
    output = llm.generate(TEXT, GREEDY, use_tqdm=False)[0]
    assert output.outputs[0].token_ids == oracle(name, checkpoints[name][1], TEXT, ())[1]
    with pytest.raises(ValueError, match="limit_mm_per_prompt allows 0"):
        llm.generate(request(*batch(CASES[name])[0]), GREEDY, use_tqdm=False)


@pytest.mark.parametrize("name", sorted(CASES))
def test_processed_images_are_cached_by_content(checkpoints, name):
    case = CASES[name]
    llm = engine(checkpoints[name][0])
    text = batch(case)[0][0]
    copy = IMAGES["wide"].copy()  # another object with the same pixels
    prompts = [request(text, ("wide",)), {"prompt": text, "multi_modal_data": {"image": copy}}]
    llm.generate(prompts, GREEDY, use_tqdm=False)
    assert (llm.mm_processor.cache.hits, llm.mm_processor.cache.misses) == (1, 1)


@pytest.mark.parametrize("name", sorted(CASES))
def test_prefix_cache_never_shares_blocks_across_different_images(checkpoints, name):
    case = CASES[name]
    llm = engine(checkpoints[name][0])
    kv_cache = llm.llm_engine.kv_cache
    text = batch(case)[0][0]

    def run(image: str) -> tuple[list[int], int]:
        hits_before = kv_cache.prefix_hits
        output = llm.generate(request(text, (image,)), GREEDY, use_tqdm=False)[0]
        assert output.outputs[0].token_ids == oracle(name, checkpoints[name][1], text, (image,))[1]
        return output.prompt_token_ids, kv_cache.prefix_hits - hits_before

    prompt_ids, _ = run("wide")
    image_start = prompt_ids.index(case.embed_token)
    # The same placeholder tokens, other pixels: only the blocks before the image are shared.
    assert run("wide_other")[1] == image_start // BLOCK * BLOCK
    # The same image again: every full block but the last token's is shared.
    assert run("wide")[1] == (len(prompt_ids) - 1) // BLOCK * BLOCK


@pytest.mark.parametrize("name", sorted(CASES))
def test_preemption_recomputes_images_and_changes_no_token(checkpoints, name):
    case = CASES[name]
    # KV blocks for every prompt at once and one more: as their outputs grow, the newest are preempted.
    lengths = [len(oracle(name, checkpoints[name][1], text, images)[0]) for text, images in batch(case)]
    blocks = sum(-(-length // BLOCK) for length in lengths) + 1
    max_model_len = min(MAX_MODEL_LEN, blocks * BLOCK)  # the cache must hold one request of it
    llm = engine(checkpoints[name][0], max_model_len=max_model_len, num_gpu_blocks_override=blocks, enable_prefix_caching=False)
    assert_batch_matches_transformers(llm, case, checkpoints)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert_all_blocks_free(llm)


# Checkpoint tensor names as transformers' module paths have them, from the saved (hub) layout.
MODULE_PATHS = (("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
                ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."))


@pytest.mark.parametrize("name", ["internvl_hf", "llava"])
def test_module_path_and_hub_layouts_load_alike(checkpoints, name, tmp_path):
    """The saved layout (as transformers writes it), the same tensors under transformers' module
    paths, and for LLaVA the hub's CLIP names (vision_tower.vision_model.*) give the same tokens."""
    import shutil

    from safetensors.torch import load_file, save_file

    saved = checkpoints[name][0]
    tensors = load_file(str(saved / "model.safetensors"))
    variants = {"module_paths": {_renamed(key, MODULE_PATHS): value for key, value in tensors.items()}}
    if name == "llava":
        hub = (("vision_tower.", "vision_tower.vision_model."),)
        variants["hub"] = {_renamed(key, hub): value for key, value in tensors.items()}
    text, images = batch(CASES[name])[1]
    want = engine(saved).generate(request(text, images), GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    for variant, renamed in variants.items():
        directory = tmp_path / variant
        shutil.copytree(saved, directory)
        save_file(renamed, str(directory / "model.safetensors"))
        got = engine(directory).generate(request(text, images), GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        assert got == want, variant


def _renamed(key: str, prefixes: tuple[tuple[str, str], ...]) -> str:
    return next((new + key[len(old) :] for old, new in prefixes if key.startswith(old)), key)
