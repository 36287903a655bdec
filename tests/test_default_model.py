"""The real default model (SmolLM2-135M-Instruct), end to end."""

from __future__ import annotations

import pytest

from fxllm import LLM, SamplingParams, default_model
from fxllm.models.default_model import default_model_gguf_path

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


@pytest.fixture(scope="module")
def llm():
    return LLM(enforce_eager=True, max_model_len=512)


def test_default_model_knows_the_capital_of_france(llm):
    output = llm.generate("The capital of France is", GREEDY, use_tqdm=False)[0]
    assert "Paris" in output.outputs[0].text


def test_gguf_file_loads_directly_and_matches_the_converted_directory(llm):
    default_model()  # make sure the .gguf is in the cache
    from_gguf = LLM(model=str(default_model_gguf_path()), enforce_eager=True, max_model_len=512)
    prompt = "The capital of France is"
    assert (
        from_gguf.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        == llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    )


def test_eos_from_the_gguf_ends_generation(llm):
    tokenizer = llm.get_tokenizer()
    eos = tokenizer.eos_token_id
    assert eos in llm.llm_engine_config.model.eos_token_ids
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hi."}], tokenize=False, add_generation_prompt=True
    )
    output = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert output.finish_reason == "stop" and output.token_ids[-1] == eos
