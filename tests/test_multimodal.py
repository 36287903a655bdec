"""Vision-language models: Qwen2-VL and Qwen2.5-VL against HF with images and videos, limits,
processor arguments, the processed-input cache, and prefix caching that tells images apart."""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace


import pytest
import torch
from PIL import Image

from fxllm import LLM, SamplingParams
from fxllm.forward_context import GraphDispatch
from fxllm.config import CompilationLevel, CUDAGraphMode
from fxllm.models.mrope import mrope_positions
from fxllm.runtime.multimodal.cache import ProcessedInput, ProcessedInputCache
from fxllm.runtime.multimodal.inputs import MultiModalPrompt
from fxllm.runtime.step_inputs import PADDING_SLOT, StepInputs
from tests.tiny_vl_models import (
    IMAGE,
    IMAGE_PAD,
    MIN_PIXELS,
    PATCH,
    VIDEO,
    VIDEO_PAD,
    VL_CONFIGS,
    hf_text_greedy,
    hf_vl_greedy,
    make_image,
    make_video,
    save_tiny_gemma3_vl_model,
    save_tiny_vl_model,
)

VL_ARCHITECTURES = ["qwen2_vl", "qwen2_5_vl"]
NEW_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
BLOCK = 4
# A chunk of 7 tokens ends inside the images of every prompt below.
CHUNKED_BUDGET = 7
# 84 x 56 pixels -> 4 x 6 patches -> 6 image tokens; 112 x 112 -> 8 x 8 patches -> 16 tokens.
IMAGES = {
    "small": make_image(84, 56, seed=0),
    "small_other": make_image(84, 56, seed=2),  # the same size: the same placeholder tokens
    "square": make_image(112, 112, seed=1),
}
SMALL_TOKENS, SQUARE_TOKENS = 6, 16
ONE_IMAGE = "Hello " + IMAGE + " world"
# (prompt, image names): one image, two images of two sizes, text only.
BATCH = [
    (ONE_IMAGE, ("small",)),
    ("The capital " + IMAGE + " and " + IMAGE + " of France", ("square", "small_other")),
    ("Once upon a time there was a tiny model", ()),
]


@pytest.fixture(scope="module")
def vl_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_vl_models")
    return {arch: save_tiny_vl_model(arch, root / arch) for arch in VL_ARCHITECTURES}


@functools.lru_cache(maxsize=None)
def _hf(model_dir: Path, prompt: str, image_names: tuple[str, ...]) -> tuple[list[int], list[int]]:
    return hf_vl_greedy(model_dir, prompt, [IMAGES[name] for name in image_names], NEW_TOKENS)


def _prompt(text: str, image_names: tuple[str, ...]) -> str | dict:
    return {"prompt": text, "multi_modal_data": {"image": [IMAGES[n] for n in image_names]}} if image_names else text


def _vl_engine(model_dir: Path, **kwargs) -> LLM:
    return LLM(model=str(model_dir), enforce_eager=True, block_size=BLOCK, max_model_len=256, **kwargs)


def _assert_batch_matches_hf(llm: LLM, model_dir: Path) -> None:
    outputs = llm.generate([_prompt(text, names) for text, names in BATCH], GREEDY, use_tqdm=False)
    for (text, names), output in zip(BATCH, outputs):
        prompt_ids, generated = _hf(model_dir, text, names)
        assert output.prompt_token_ids == prompt_ids  # placeholders expanded as HF's processor does
        assert output.outputs[0].token_ids == generated


@pytest.mark.parametrize("budget", [2048, CHUNKED_BUDGET], ids=["whole_prompts", "chunked"])
@pytest.mark.parametrize("arch", VL_ARCHITECTURES)
def test_image_prompts_match_hf_one_prompt_at_a_time(vl_dirs, arch, budget):
    llm = _vl_engine(vl_dirs[arch], max_num_batched_tokens=budget)
    _assert_batch_matches_hf(llm, vl_dirs[arch])
    # Chunks that end inside an image still encode each image once (and slice its embeddings).
    assert llm.llm_engine.runner.embedder.items_encoded == 3


def test_piecewise_compiled_matches_hf_without_cuda_graphs(vl_dirs, tmp_path):
    # The one compiled run: inputs_embeds[T, H] and positions[3, T] through capture, split and
    # Inductor, and the vision tower's compiled regions.
    llm = LLM(
        model=str(vl_dirs["qwen2_vl"]), block_size=BLOCK, max_model_len=256, max_num_batched_tokens=CHUNKED_BUDGET,
        compilation_config={"level": 3, "cache_dir": str(tmp_path), "compile_mm_encoder": True},
    )
    report = llm.compile_report()
    assert report.level == CompilationLevel.PIECEWISE and report.pieces == 5 and report.dynamo_compiles == 1
    assert report.mm_encoder_compiled
    assert llm.llm_engine_config.compilation.cudagraph_mode is CUDAGraphMode.NONE
    _assert_batch_matches_hf(llm, vl_dirs["qwen2_vl"])


COMPILED_TOWER_DEPTH = 4
PIXELS_PER_PATCH = 3 * 2 * PATCH * PATCH  # channels x temporal patch x patch x patch


def test_compiled_vision_regions_match_eager_and_compile_once_for_every_block():
    from torch._dynamo.utils import counters

    from fxllm.models.qwen2_vl_vision import Qwen25VisionTransformer, compile_regions

    config = VL_CONFIGS["qwen2_5_vl"]().vision_config
    config.depth = COMPILED_TOWER_DEPTH
    torch.manual_seed(0)
    tower = Qwen25VisionTransformer(config).eval()
    images = [[(1, 4, 6)], [(1, 8, 8), (2, 4, 4)]]  # window and full blocks, two patch counts
    inputs = [(torch.randn(sum(t * h * w for t, h, w in grids), PIXELS_PER_PATCH), grids) for grids in images]
    with torch.inference_mode():
        eager = [tower(pixels, grids) for pixels, grids in inputs]
        compile_regions(tower.blocks)
        graphs_before = counters["stats"]["unique_graphs"]
        compiled = [tower(pixels, grids) for pixels, grids in inputs]
    for want, got in zip(eager, compiled):
        torch.testing.assert_close(got, want)
    # Two regions, each traced for the first patch count and once more as dynamic; traced per
    # block it would be 2 x COMPILED_TOWER_DEPTH.
    traced = counters["stats"]["unique_graphs"] - graphs_before
    assert 2 <= traced <= 2 * 2


def test_prompts_over_the_image_limit_are_rejected_before_anything_runs(vl_dirs):
    llm = _vl_engine(vl_dirs["qwen2_vl"], limit_mm_per_prompt={"image": 1})
    two_images = _prompt(*BATCH[1])
    with pytest.raises(ValueError, match=r"2 image input\(s\) but limit_mm_per_prompt allows 1"):
        llm.generate([_prompt(*BATCH[0]), two_images], GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished()
    with pytest.raises(TypeError, match="video 0 must be a numpy array .* got str"):
        llm.generate({"prompt": ONE_IMAGE, "multi_modal_data": {"video": "clip.mp4"}}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=r"2 image placeholder\(s\) '<\|image_pad\|>' but 1 image"):
        llm.generate({"prompt": ONE_IMAGE + IMAGE, "multi_modal_data": {"image": IMAGES["small"]}}, GREEDY, use_tqdm=False)
    # The engine still serves.
    output = llm.generate(_prompt(*BATCH[0]), GREEDY, use_tqdm=False)[0]
    assert output.outputs[0].token_ids == _hf(vl_dirs["qwen2_vl"], *BATCH[0])[1]


def test_zero_limits_build_no_vision_tower_and_run_text_only(vl_dirs):
    llm = _vl_engine(vl_dirs["qwen2_vl"], limit_mm_per_prompt={"image": 0, "video": 0})
    assert llm.llm_engine.runner.model.visual is None and llm.mm_processor is None
    text = BATCH[2][0]
    output = llm.generate(text, GREEDY, use_tqdm=False)[0]
    assert output.outputs[0].token_ids == hf_text_greedy(vl_dirs["qwen2_vl"], output.prompt_token_ids, NEW_TOKENS)
    with pytest.raises(ValueError, match="limit_mm_per_prompt allows 0"):
        llm.generate(_prompt(*BATCH[0]), GREEDY, use_tqdm=False)


def test_gemma3_vision_checkpoint_runs_text_only_with_a_zero_image_limit(tmp_path):
    model_dir = save_tiny_gemma3_vl_model(tmp_path / "gemma3_vl")
    with pytest.raises(ValueError, match=r"limit_mm_per_prompt=\{'image': 0\}"):
        LLM(model=str(model_dir), enforce_eager=True)
    llm = LLM(model=str(model_dir), enforce_eager=True, limit_mm_per_prompt={"image": 0}, max_num_batched_tokens=5)
    prompts = [text for text, _ in BATCH]
    for output in llm.generate(prompts, GREEDY, use_tqdm=False):
        assert output.outputs[0].token_ids == hf_text_greedy(model_dir, output.prompt_token_ids, NEW_TOKENS)


def test_mm_processor_kwargs_change_the_number_of_image_tokens(vl_dirs):
    square = ("Look: " + IMAGE, ("square",))
    default = _vl_engine(vl_dirs["qwen2_vl"]).generate(_prompt(*square), GREEDY, use_tqdm=False)[0]
    assert default.prompt_token_ids.count(IMAGE_PAD) == SQUARE_TOKENS
    small = _vl_engine(vl_dirs["qwen2_vl"], mm_processor_kwargs={"max_pixels": MIN_PIXELS})
    assert small.generate(_prompt(*square), GREEDY, use_tqdm=False)[0].prompt_token_ids.count(IMAGE_PAD) == 4
    with pytest.raises(ValueError, match=r"\['max_pixel'\] that Qwen2VLImageProcessor does not take"):
        _vl_engine(vl_dirs["qwen2_vl"], mm_processor_kwargs={"max_pixel": MIN_PIXELS})


def test_processed_images_are_cached_by_content(vl_dirs, monkeypatch):
    llm = _vl_engine(vl_dirs["qwen2_vl"])
    cache = llm.mm_processor.cache
    copy = IMAGES["small"].copy()  # another object with the same pixels
    llm.generate([_prompt(*BATCH[0]), {"prompt": ONE_IMAGE, "multi_modal_data": {"image": copy}}], GREEDY, use_tqdm=False)
    assert (cache.hits, cache.misses) == (1, 1)
    llm.generate({"prompt": ONE_IMAGE, "multi_modal_data": {"image": IMAGES["small_other"]}}, GREEDY, use_tqdm=False)
    assert (cache.hits, cache.misses) == (1, 2)
    monkeypatch.setenv("FXLLM_MM_INPUT_CACHE_GIB", "0")
    uncached = _vl_engine(vl_dirs["qwen2_vl"])
    uncached.generate([_prompt(*BATCH[0])] * 2, GREEDY, use_tqdm=False)
    assert uncached.mm_processor.cache.hits == 0 and not uncached.mm_processor.cache.entries
    monkeypatch.setenv("FXLLM_MM_INPUT_CACHE_GIB", "-1")
    with pytest.raises(ValueError, match="FXLLM_MM_INPUT_CACHE_GIB must be >= 0"):
        _vl_engine(vl_dirs["qwen2_vl"])


def test_input_cache_evicts_the_least_recently_used_by_bytes():
    def entry() -> ProcessedInput:
        return ProcessedInput(torch.zeros(4, 8), (1, 2, 2))  # 128 bytes

    cache = ProcessedInputCache(capacity_bytes=256)
    cache.put("a", entry())
    cache.put("b", entry())
    assert cache.get("a") is not None  # b is now the least recently used
    cache.put("c", entry())
    assert list(cache.entries) == ["a", "c"] and cache.num_bytes == 256


def test_prefix_cache_never_shares_blocks_across_different_images(vl_dirs):
    model_dir = vl_dirs["qwen2_vl"]
    llm = _vl_engine(model_dir)
    kv_cache = llm.llm_engine.kv_cache

    def run(text: str, image: str) -> tuple[list[int], int]:
        hits_before = kv_cache.prefix_hits
        output = llm.generate(_prompt(text, (image,)), GREEDY, use_tqdm=False)[0]
        assert output.outputs[0].token_ids == _hf(model_dir, text, (image,))[1]
        return output.prompt_token_ids, kv_cache.prefix_hits - hits_before

    prompt_ids, _ = run(ONE_IMAGE, "small")
    image_start = prompt_ids.index(IMAGE_PAD)
    assert _hf(model_dir, ONE_IMAGE, ("small",))[1] != _hf(model_dir, ONE_IMAGE, ("small_other",))[1]
    # Same placeholder tokens, other pixels: only the blocks before the image are shared.
    _, hits = run(ONE_IMAGE, "small_other")
    assert hits == image_start // BLOCK * BLOCK
    # The same image again: every full block but the last token's is shared.
    _, hits = run(ONE_IMAGE, "small")
    assert hits == (len(prompt_ids) - 1) // BLOCK * BLOCK > image_start + SMALL_TOKENS
    # A shared prefix that ends inside the image: the rest of it comes from the image's embeddings.
    other_ids, hits = run("Hello " + IMAGE + " there friend", "small")
    common = next(i for i, (a, b) in enumerate(zip(prompt_ids, other_ids)) if a != b)
    assert image_start < hits < image_start + SMALL_TOKENS and hits == common // BLOCK * BLOCK


def test_image_inputs_need_a_vision_language_model(llama_dir):
    with pytest.raises(ValueError, match="limit_mm_per_prompt apply to vision-language models"):
        LLM(model=str(llama_dir), enforce_eager=True, limit_mm_per_prompt={"image": 1})
    llm = LLM(model=str(llama_dir), enforce_eager=True)
    with pytest.raises(ValueError, match="text-only model"):
        llm.generate({"prompt": "Hello", "multi_modal_data": {"image": IMAGES["small"]}}, GREEDY, use_tqdm=False)


def test_mrope_step_positions_are_a_3_by_t_view_with_delta_and_zero_padding():
    # Prompt: 2 text tokens, a 1 x 4 x 4 patch grid (2 x 2 merged: 4 tokens), 1 text token; then 2 decoded.
    positions, delta = mrope_positions(7, [(2, (1, 4, 4), 1.0)], spatial_merge_size=2)
    assert positions.tolist() == [[0, 1, 2, 2, 2, 2, 4], [0, 1, 2, 2, 3, 3, 4], [0, 1, 2, 3, 2, 3, 4]] and delta == -2
    prompt = MultiModalPrompt(list(range(7)), (), positions, delta)
    with_image = SimpleNamespace(num_computed_tokens=5, all_token_ids=list(range(9)), block_ids=[0, 1, 2], multimodal=prompt)
    text_only = SimpleNamespace(num_computed_tokens=1, all_token_ids=[5, 6], block_ids=[3], multimodal=None)
    step = [SimpleNamespace(request=r, num_new_tokens=n, samples=True) for r, n in ((with_image, 4), (text_only, 1))]
    inputs = StepInputs(16, max_num_requests=4, max_blocks_per_seq=4, block_size=BLOCK, device=torch.device("cpu"), mrope=True)
    prepared = inputs.prepare(step, GraphDispatch(CUDAGraphMode.PIECEWISE, 8, 2))
    # Tokens 5, 6 from the prompt's table, 7 and 8 at index + delta, the text request's index 1, padding 0.
    assert prepared.positions.tolist() == [
        [2, 4, 5, 6, 1, 0, 0, 0], [3, 4, 5, 6, 1, 0, 0, 0], [3, 4, 5, 6, 1, 0, 0, 0]
    ]
    assert prepared.positions.stride() == (1, 3)  # as captured, whatever T
    assert prepared.metadata.slot_mapping.tolist()[5:] == [PADDING_SLOT] * 3


# 4 frames (2 temporal patches) of 84 x 56 -> a 2 x 4 x 6 grid -> 12 video tokens; 3 frames pad to 4.
VIDEOS = {"four_frames": make_video(4, 84, 56, seed=3), "three_frames": make_video(3, 112, 56, seed=4)}
VIDEO_BATCH = [
    ("Look " + VIDEO + " at this", (), ("four_frames",)),
    ("An image " + IMAGE + " then a video " + VIDEO + " end", ("small",), ("three_frames",)),
]


@functools.lru_cache(maxsize=None)
def _hf_video(model_dir: Path, prompt: str, image_names: tuple[str, ...], video_names: tuple[str, ...]):
    images, videos = [IMAGES[n] for n in image_names], [VIDEOS[n] for n in video_names]
    return hf_vl_greedy(model_dir, prompt, images, NEW_TOKENS, videos=videos)


@pytest.mark.parametrize("arch", VL_ARCHITECTURES)
def test_video_prompts_match_hf_one_prompt_at_a_time(vl_dirs, arch):
    """Videos through the video processor and the vision tower; Qwen2.5-VL's temporal positions
    spaced by time (seconds per temporal patch from the processor, as HF's get_rope_index)."""
    llm = _vl_engine(vl_dirs[arch], max_num_batched_tokens=CHUNKED_BUDGET)
    prompts = [
        {"prompt": text, "multi_modal_data": {"image": [IMAGES[n] for n in images], "video": [VIDEOS[n] for n in videos]}}
        for text, images, videos in VIDEO_BATCH
    ]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for (text, images, videos), output in zip(VIDEO_BATCH, outputs):
        prompt_ids, generated = _hf_video(vl_dirs[arch], text, images, videos)
        assert output.prompt_token_ids == prompt_ids
        assert output.prompt_token_ids.count(VIDEO_PAD) == {"four_frames": 12, "three_frames": 16}[videos[0]]
        assert output.outputs[0].token_ids == generated
    assert llm.llm_engine.runner.embedder.items_encoded == 3


def test_a_video_given_as_pil_frames_equals_the_array(vl_dirs):
    llm = _vl_engine(vl_dirs["qwen2_vl"])
    frames = [Image.fromarray(frame) for frame in VIDEOS["four_frames"]]
    text = VIDEO_BATCH[0][0]
    as_frames = llm.generate({"prompt": text, "multi_modal_data": {"video": frames}}, GREEDY, use_tqdm=False)[0]
    assert as_frames.outputs[0].token_ids == _hf_video(vl_dirs["qwen2_vl"], text, (), ("four_frames",))[1]


def test_video_limits_and_bad_videos_are_clear_errors(vl_dirs):
    llm = _vl_engine(vl_dirs["qwen2_vl"], limit_mm_per_prompt={"image": 1, "video": 0})
    text = VIDEO_BATCH[0][0]
    with pytest.raises(ValueError, match=r"1 video input\(s\) but limit_mm_per_prompt allows 0"):
        llm.generate({"prompt": text, "multi_modal_data": {"video": VIDEOS["four_frames"]}}, GREEDY, use_tqdm=False)
    llm = _vl_engine(vl_dirs["qwen2_vl"])
    with pytest.raises(ValueError, match=r"video 0 must be an array \[frames, height, width, 3\]"):
        llm.generate({"prompt": text, "multi_modal_data": {"video": VIDEOS["four_frames"][0]}}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=r"1 video placeholder\(s\) '<\|video_pad\|>' but 2 video\(s\)"):
        video = VIDEOS["four_frames"]
        llm.generate({"prompt": text, "multi_modal_data": {"video": [video, video]}}, GREEDY, use_tqdm=False)
    output = llm.generate({"prompt": text, "multi_modal_data": {"video": VIDEOS["four_frames"]}}, GREEDY, use_tqdm=False)
    assert output[0].outputs[0].token_ids == _hf_video(vl_dirs["qwen2_vl"], text, (), ("four_frames",))[1]


def test_a_video_only_model_config_builds_the_vision_tower(vl_dirs):
    llm = _vl_engine(vl_dirs["qwen2_vl"], limit_mm_per_prompt={"image": 0, "video": 1})
    assert llm.llm_engine.runner.model.visual is not None and llm.mm_processor is not None
    with pytest.raises(ValueError, match=r"1 image input\(s\) but limit_mm_per_prompt allows 0"):
        llm.generate(_prompt(*BATCH[0]), GREEDY, use_tqdm=False)


def test_temporal_positions_follow_the_time_interval():
    # A 4-frame grid of 1 x 2 x 2 merged patches at 0.5 positions per frame: t = 0, 0, 1, 1.
    positions, delta = mrope_positions(4 * 1 + 1, [(0, (4, 2, 2), 0.5)], spatial_merge_size=2)
    assert positions[0].tolist() == [0, 0, 1, 1, 1] and positions[1].tolist() == [0, 0, 0, 0, 1]
    assert delta == 2 - 5
