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
    assert eos in llm.input_processor.eos_token_ids
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hi."}], tokenize=False, add_generation_prompt=True
    )
    output = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert output.finish_reason == "stop" and output.token_ids[-1] == eos


def test_chat_answers_and_does_not_add_a_second_bos(llm):
    output = llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert "Paris" in output.outputs[0].text
    tokenizer = llm.get_tokenizer()
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    assert output.prompt_token_ids == tokenizer.encode(rendered, add_special_tokens=False)
    if tokenizer.bos_token_id is not None:
        assert output.prompt_token_ids[:2] != [tokenizer.bos_token_id] * 2


def test_chat_takes_a_list_of_conversations(llm):
    conversations = [[{"role": "user", "content": "Say hello."}], [{"role": "user", "content": "Name a color."}]]
    outputs = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(outputs) == 2 and all(o.outputs[0].token_ids for o in outputs)


def _token_boundaries(tokenizer, prompt_ids, token_ids):
    """Character offsets in the completion text where each token ends."""
    from fxllm.runtime.detokenizer import IncrementalDetokenizer

    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, True)
    ends = []
    for token in token_ids:
        detokenizer.add(token)
        ends.append(len(detokenizer.text))
    return detokenizer.text, ends


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_a_token_boundary(llm, include):
    free = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    tokens = free.outputs[0].token_ids
    text, ends = _token_boundaries(llm.get_tokenizer(), free.prompt_token_ids, tokens)
    # A stop string made of the last character of token 0 and the first of token 1.
    boundary = ends[0]
    stop = text[boundary - 1 : boundary + 1]
    assert text.find(stop) == boundary - 1 and 0 < boundary - 1 < boundary < ends[1]
    params = SamplingParams(temperature=0, max_tokens=12, stop=[stop], include_stop_str_in_output=include)
    completion = llm.generate("The capital of France is", params, use_tqdm=False)[0].outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    assert completion.token_ids == tokens[:2]
    assert completion.text == (text[: boundary + 1] if include else text[: boundary - 1])


def test_bad_words_are_never_generated(llm):
    params = SamplingParams(temperature=0, max_tokens=8, bad_words=["Paris"])
    text = llm.generate("The capital of France is", params, use_tqdm=False)[0].outputs[0].text
    assert "Paris" not in text


def test_prompt_logprobs_of_the_default_model_equal_hf_also_when_cached(llm):
    import torch
    from transformers import AutoModelForCausalLM

    prompt = "The capital of France is Paris, and the capital of Italy is"
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)  # caches the prompt
    output = llm.generate(prompt, params, use_tqdm=False)[0]
    hf = AutoModelForCausalLM.from_pretrained(default_model(), dtype=torch.float32).eval()
    ids = output.prompt_token_ids
    with torch.no_grad():
        reference = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    for position in range(1, len(ids)):
        for token_id, logprob in output.prompt_logprobs[position].items():
            assert abs(logprob.logprob - reference[position - 1, token_id].item()) < 1e-3
