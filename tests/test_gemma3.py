"""Gemma 3 text: alternating sliding/global layers, per-type RoPE, soft-capping, against HF."""

from __future__ import annotations

import pytest

from fxllm import LLM, SamplingParams
from fxllm.attention.layer import Attention
from tests.tiny_models import GEMMA3_WINDOW as WINDOW
from tests.tiny_models import gemma3_text_config, hf_greedy, save_config_checkpoint

PROMPTS = ["Once upon a time there was a tiny model that learned to count: one two three", "Hello world", "The quick brown fox"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return save_config_checkpoint(gemma3_text_config(), tmp_path_factory.mktemp("gemma3"))


@pytest.mark.parametrize("budget", [2048, 5], ids=["whole_prompts", "chunked"])
def test_gemma3_text_matches_hf(gemma_dir, budget):
    llm = LLM(model=str(gemma_dir), enforce_eager=True, max_model_len=128, max_num_batched_tokens=budget, max_num_seqs=4)
    windows = [m.spec.sliding_window for m in llm.llm_engine.runner.model.modules() if isinstance(m, Attention)]
    assert windows == [WINDOW, None, WINDOW]
    tokenizer = llm.get_tokenizer()
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == hf_greedy(gemma_dir, tokenizer.encode(prompt), NEW_TOKENS)


def test_gemma3_logits_are_soft_capped(gemma_dir):
    llm = LLM(model=str(gemma_dir), enforce_eager=True, max_model_len=128, max_logprobs=-1)
    output = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=2, logprobs=-1), use_tqdm=False)[0]
    logprobs = [lp.logprob for lp in output.outputs[0].logprobs[0].values()]
    # With |logit| <= 5, no two tokens' logprobs differ by more than 10.
    assert max(logprobs) - min(logprobs) <= 10.0 + 1e-4
