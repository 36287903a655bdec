"""Sampling as vLLM defines it for greedy, temperature, top-k, top-p, seeds and stop tokens."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fxllm import LLM, SamplingParams
from fxllm.runtime.detokenizer import BULK_DECODE_MIN_TOKENS, IncrementalDetokenizer
from fxllm.runtime.sampler import _apply_top_k_top_p

PROMPTS = ["The capital of France is", "Hello world", "Once upon a time"]
MAX_MODEL_LEN = 96


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN)


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def _greedy(llm, max_tokens=10):
    return _tokens(llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False))


def test_same_seed_gives_same_tokens_whatever_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=10, ignore_eos=True)
    alone = _tokens(llm.generate(PROMPTS[:1], seeded, use_tqdm=False))[0]
    others = [SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)] * 2
    batched = _tokens(llm.generate(PROMPTS, [seeded, *others], use_tqdm=False))[0]
    assert alone == batched


def test_different_seeds_give_different_samples(llm):
    samples = {
        tuple(_tokens(llm.generate(PROMPTS[:1], SamplingParams(temperature=1.5, seed=s, max_tokens=12, ignore_eos=True), use_tqdm=False))[0])
        for s in range(4)
    }
    assert len(samples) > 1


@pytest.mark.parametrize("cut", [{"top_k": 1}, {"top_p": 1e-6}])
def test_top_k_one_or_tiny_top_p_is_greedy(llm, cut):
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True, **cut)
    assert _tokens(llm.generate(PROMPTS, params, use_tqdm=False)) == _greedy(llm)


def test_greedy_and_sampled_requests_mix_in_one_batch(llm):
    params = [
        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=5, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
    ]
    tokens = _tokens(llm.generate(PROMPTS, params, use_tqdm=False))
    greedy = _greedy(llm)
    assert tokens[0] == greedy[0] and tokens[2] == greedy[2]


def test_stop_token_ids_end_the_completion_and_are_reported(llm):
    greedy = _greedy(llm)[0]
    stop = greedy[3]
    output = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop]), use_tqdm=False)[0]
    completion = output.outputs[0]
    assert completion.token_ids == greedy[: greedy.index(stop) + 1]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop


def test_eos_ends_the_completion_unless_ignore_eos(llama_dir):
    probe = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN)
    greedy = _greedy(probe)[0]
    # Make the 3rd greedy token the EOS through hf_overrides, as a checkpoint would declare it.
    llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, hf_overrides={"eos_token_id": greedy[2]})
    stopped = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == greedy[: greedy.index(greedy[2]) + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason is None
    ignored = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    assert ignored.outputs[0].token_ids == greedy


@pytest.mark.parametrize("text", [" Hello world! How are you today?", " café — naïve 東京 ✓"])
def test_incremental_detokenization_equals_a_full_decode(llm, text):
    tokenizer = llm.get_tokenizer()
    prompt_ids = tokenizer.encode("The capital of France is")
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=True)
    output_ids = tokenizer.encode(text)
    for token_id in output_ids:
        detokenizer.add(token_id)
    assert detokenizer.text == tokenizer.decode(output_ids) == text


def test_tokens_are_decoded_when_the_text_is_read_and_reads_in_between_change_nothing(llm):
    tokenizer = llm.get_tokenizer()
    text = " café — naïve 東京 ✓ and more words"
    output_ids = tokenizer.encode(text)
    prompt_ids = tokenizer.encode("The capital of France is")
    lazy = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=True)
    steps = []
    stream_step = lazy._stream.step
    lazy._stream = type("CountingStream", (), {"step": lambda self, *args: steps.append(args) or stream_step(*args)})()
    for token_id in output_ids:
        lazy.add(token_id)
    assert steps == []  # nothing decoded while tokens arrive: no step pays for it
    eager = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=True)
    partial = []
    for token_id in output_ids:
        eager.add(token_id)
        partial.append(eager.text)  # as a request with stop strings reads it
    assert len(output_ids) >= BULK_DECODE_MIN_TOKENS
    assert lazy.text == eager.text == text
    assert steps == []  # read once, at the end: one decode of all the tokens, no stream steps
    assert all(text.startswith(prefix) for prefix in partial)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_a_bulk_decode_gives_the_streams_text(llm, skip_special_tokens):
    """Text of words (multi-byte characters among them) with random ids mixed in (stray bytes,
    special tokens): reading the text once at the end (in bulk where it can) and reading it
    after every token (the stream) agree, also when tokens arrive after a bulk read."""
    import random

    tokenizer = llm.get_tokenizer()
    words = [" Hello", " world", "!", " café", " —", " naïve", " 東京", " ✓", "\n", " the", " count"]
    rng = random.Random(0)
    in_bulk = 0
    for case in range(200):
        prompt_ids = tokenizer.encode("".join(rng.choice(words) for _ in range(rng.randint(1, 4))))
        output_ids = tokenizer.encode("".join(rng.choice(words) for _ in range(rng.randint(8, 20))))
        for ids in (prompt_ids, output_ids):
            for _ in range(case % 3):  # a third of the cases without random ids
                ids.insert(rng.randrange(len(ids) + 1), rng.randrange(len(tokenizer)))
        streamed = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
        bulk = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
        for token_id in output_ids:
            streamed.add(token_id)
            _ = streamed.text
            bulk.add(token_id)
        assert bulk.text == streamed.text
        in_bulk += bulk._streamed == 0
        for token_id in output_ids[:3]:
            streamed.add(token_id)
            bulk.add(token_id)
        assert bulk.text == streamed.text
    assert in_bulk >= 50  # the bulk decode, not only its fallback, was compared


def test_completion_text_is_the_decoded_tokens_up_to_an_incomplete_character(llm):
    output = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    full = llm.get_tokenizer().decode(output.outputs[0].token_ids, skip_special_tokens=True)
    text = output.outputs[0].text
    # Random weights emit stray bytes; a trailing partial UTF-8 character is held back.
    assert text and full.startswith(text) and set(full[len(text) :]) <= {"\ufffd"}


def test_default_sampling_params_come_from_generation_config(llama_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(llama_dir, model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "top_p": 0.9, "top_k": 20}))
    llm = LLM(model=str(model_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.top_k) == (0.3, 0.9, 20)
    vllm_defaults = LLM(model=str(model_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, generation_config="vllm")
    assert vllm_defaults.get_default_sampling_params().temperature == 1.0


def test_top_k_top_p_masks_match_their_definition():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    masked = _apply_top_k_top_p(logits, torch.tensor([2, 5]), None)
    assert torch.isinf(masked[0, 2:]).all() and torch.isfinite(masked[0, :2]).all()
    assert torch.isfinite(masked[1]).all()
    probs = logits.softmax(-1)  # [0.636, 0.234, 0.086, 0.032, 0.012] for row 0
    masked = _apply_top_k_top_p(logits, None, torch.tensor([0.7, 0.5]))
    kept = torch.isfinite(masked)
    assert kept[0].tolist() == [True, True, False, False, False]  # 0.636 < 0.7 needs a 2nd token
    assert kept[1].tolist() == [False, False, False, False, True]
    assert probs[0, 0] < 0.7
