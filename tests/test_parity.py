"""Greedy parity with HF transformers (fp32, CPU, one prompt at a time) for every architecture."""

from __future__ import annotations

import pytest

from fxllm import LLM, SamplingParams
from tests.conftest import ARCHITECTURES
from tests.tiny_models import hf_greedy

PROMPTS = [
    "The capital of France is",
    "Hello",
    "Once upon a time there was a tiny model that learned to count: one two three",
    "Compilers turn graphs into fast kernels; attention reads",
    "How are you today? I am fine, thank you. The quick brown fox jumps over the lazy dog again and again",
]
NEW_TOKENS = 12


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batched_greedy_matches_hf_one_prompt_at_a_time(arch, tiny_model_dirs):
    model_dir = tiny_model_dirs[arch]
    llm = LLM(model=str(model_dir), enforce_eager=True)
    tokenizer = llm.get_tokenizer()
    prompt_ids = [tokenizer.encode(p) for p in PROMPTS]
    assert len({len(ids) for ids in prompt_ids}) == len(PROMPTS), "prompts should differ in length"
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for ids, output in zip(prompt_ids, outputs):
        assert output.prompt_token_ids == ids
        assert output.outputs[0].token_ids == hf_greedy(model_dir, ids, NEW_TOKENS)
        assert output.outputs[0].finish_reason == "length"
