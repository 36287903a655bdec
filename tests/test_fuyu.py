"""Persimmon as a text model and Fuyu specifics: vLLM's example call, the prompt layout around the
image, one image per prompt."""

from __future__ import annotations

from pathlib import Path

import pytest

from fxllm import LLM, SamplingParams
from tests.tiny_fuyu_models import BOA, BOS, NEWLINE, SPEAKER, save_tiny_fuyu, save_tiny_persimmon
from tests.tiny_models import hf_greedy
from tests.tiny_vl_models import make_image
from tests.vlm_cases import CASES

NEW_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
PROMPTS = ["The capital of France is", "Once upon a time there was a tiny model that learned to count: one two three"]
IMAGE = make_image(70, 40, seed=4)  # 3 rows of 5 patches


@pytest.fixture(scope="module")
def persimmon_dir(tmp_path_factory) -> Path:
    return save_tiny_persimmon(tmp_path_factory.mktemp("persimmon") / "persimmon")


@pytest.fixture(scope="module")
def fuyu_dir(tmp_path_factory) -> Path:
    return save_tiny_fuyu(tmp_path_factory.mktemp("fuyu") / "fuyu")


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "compiled"])
def test_persimmon_text_model_matches_transformers(persimmon_dir, enforce_eager, tmp_path):
    compilation = None if enforce_eager else {"level": 3, "cache_dir": str(tmp_path)}
    llm = LLM(model=str(persimmon_dir), enforce_eager=enforce_eager, max_model_len=128, compilation_config=compilation)
    for output in llm.generate(PROMPTS, GREEDY, use_tqdm=False):
        assert output.outputs[0].token_ids == hf_greedy(persimmon_dir, output.prompt_token_ids, NEW_TOKENS)


def test_vllm_example_call_matches_transformers(fuyu_dir):
    """LLM(model=..., max_model_len=2048, max_num_seqs=2) as on vLLM's example page, prompts as there:
    the question and a newline, the image given beside it."""
    llm = LLM(model=str(fuyu_dir), max_model_len=2048, max_num_seqs=2, enforce_eager=True)
    questions = ["What is in this image?\n", "Describe the picture.\n", "What color is it?\n"]
    outputs = llm.generate([{"prompt": q, "multi_modal_data": {"image": IMAGE}} for q in questions], GREEDY, use_tqdm=False)
    for question, output in zip(questions, outputs):
        prompt_ids, generated = CASES["fuyu"].oracle(fuyu_dir, question, (IMAGE,), NEW_TOKENS)
        assert output.prompt_token_ids == prompt_ids
        assert output.outputs[0].token_ids == generated


def test_prompt_layout_is_image_rows_bos_text_and_one_answer_token(fuyu_dir):
    llm = LLM(model=str(fuyu_dir), enforce_eager=True, max_model_len=128)
    tokenizer = llm.get_tokenizer()
    output = llm.generate({"prompt": "Hi\n", "multi_modal_data": {"image": IMAGE}}, GREEDY, use_tqdm=False)[0]
    rows = ([SPEAKER] * 5 + [NEWLINE]) * 3
    text = tokenizer.encode("Hi\n", add_special_tokens=False)
    assert output.prompt_token_ids == rows + [BOS] + text + [BOA]
    # A prompt that already ends with the answer token keeps one.
    again = llm.generate({"prompt": "Hi\n<0x04>", "multi_modal_data": {"image": IMAGE}}, GREEDY, use_tqdm=False)[0]
    assert again.prompt_token_ids == output.prompt_token_ids
