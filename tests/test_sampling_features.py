"""The rest of vLLM's SamplingParams, beam search and logprobs, checked against formulas and HF."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from fxllm import LLM, SamplingParams
from fxllm.runtime.detokenizer import IncrementalDetokenizer
from fxllm.runtime.request import Request
from fxllm.runtime.penalty_state import PenaltyState
from fxllm.runtime.sampler import Penalties, SamplingBatch, _apply_min_p
from fxllm.sampling_params import BeamSearchParams

PROMPT = "The capital of France is"
MAX_MODEL_LEN = 96
VOCAB = 8


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def hf_model(llama_dir):
    return AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


def _greedy(llm, max_tokens=8, **kwargs):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kwargs)
    return llm.generate(PROMPT, params, use_tqdm=False)[0]


class _NoTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return ""


def _penalty_state() -> PenaltyState:
    return PenaltyState(max_rows=4, vocab_size=VOCAB, device=torch.device("cpu"))


def _request(prompt: list[int], output: list[int], **params) -> Request:
    request = Request(
        request_id="r", prompt=None, prompt_token_ids=prompt, sampling_params=SamplingParams(**params),
        max_tokens=16, stop_token_ids=frozenset(), detokenizer=IncrementalDetokenizer(_NoTokenizer(), prompt, True),
    )
    for token in output:
        request.output_token_ids.append(token)
        request.all_token_ids.append(token)
    return request


# ---- formulas on fixed logits ------------------------------------------------------------


def test_presence_frequency_and_repetition_penalties_follow_their_formulas():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0, 0.0, -0.5]] * 2)
    requests = [
        _request([1, 2], [3, 3, 4], presence_penalty=0.5, frequency_penalty=0.25),
        _request([1, 2], [3, 3, 4], repetition_penalty=1.5),
    ]
    penalties = Penalties.from_requests(requests, _penalty_state())
    got = penalties.apply(logits)
    expected = logits[0].clone()
    for token, count in {3: 2, 4: 1}.items():  # generated tokens only
        expected[token] -= 0.5 + 0.25 * count
    torch.testing.assert_close(got[0], expected)
    hf = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([[1, 2, 3, 3, 4]]), logits[1:].clone())
    torch.testing.assert_close(got[1:], hf)


@pytest.mark.parametrize(
    "penalties", [{"repetition_penalty": 1.8}, {"presence_penalty": 1.5, "frequency_penalty": 0.7}],
    ids=["repetition", "presence_frequency"],
)
def test_penalties_kept_on_the_device_match_a_reference_loop_over_a_whole_generation(llm, hf_model, penalties):
    """The counts grow token by token on the device (runtime/penalty_state.py); a loop over HF's
    logits applying the formulas to the whole history each step gives the same greedy tokens,
    whatever else shares the batch."""
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    max_tokens = 24
    ids, expected = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = hf_model(torch.tensor([ids])).logits[0, -1]
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[ids] = True
            counts = torch.zeros_like(logits)
            for token in expected:
                counts[token] += 1
            if "repetition_penalty" in penalties:
                penalty = penalties["repetition_penalty"]
                logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
            else:
                logits = logits - penalties["presence_penalty"] * (counts > 0) - penalties["frequency_penalty"] * counts
            expected.append(int(logits.argmax()))
            ids.append(expected[-1])
    params = [
        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **penalties),
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),  # shares the batch, without penalties
    ]
    outputs = llm.generate([PROMPT, "Other"], params, use_tqdm=False)
    assert outputs[0].outputs[0].token_ids == expected
    assert len(set(expected)) > max_tokens // 3  # the penalties took effect: no single token repeats throughout


def test_min_p_keeps_tokens_within_a_fraction_of_the_top_probability():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    probs = logits.softmax(-1)[0]
    kept = torch.isfinite(_apply_min_p(logits, torch.tensor([0.3])))[0]
    assert kept.tolist() == (probs >= 0.3 * probs.max()).tolist() == [True, True, False, False, False]


def test_min_tokens_and_bad_words_ban_the_right_next_tokens():
    early = _request([1], [5], min_tokens=3)
    early.stop_token_ids = frozenset({2, 7})
    assert sorted(early.banned_next_tokens()) == [2, 7]
    late = _request([1], [5, 6, 4], min_tokens=3)
    late.stop_token_ids = frozenset({2})
    assert late.banned_next_tokens() == []
    words = _request([1], [5, 6])
    words.bad_word_ids = [[6, 3], [5, 3], [4]]  # only the first completes after ... 6
    assert sorted(words.banned_next_tokens()) == [3, 4]
    batch = SamplingBatch.from_requests([early, words], VOCAB, torch.device("cpu"), _penalty_state())
    rows, tokens = batch.banned
    assert sorted(zip(rows.tolist(), tokens.tolist())) == [(0, 2), (0, 7), (1, 3), (1, 4)]


def test_per_row_settings_shared_by_the_batch_are_filled_on_the_device(monkeypatch):
    shared = dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1)
    uniform = [_request([1], [5], **shared) for _ in range(3)]
    mixed = [_request([1], [5], **shared), _request([1], [5], **{**shared, "temperature": 0.3})]
    made_from_lists = []
    tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *args, **kwargs: made_from_lists.append(args) or tensor(*args, **kwargs))
    batch = SamplingBatch.from_requests(uniform, VOCAB, torch.device("cpu"), _penalty_state())
    assert made_from_lists == []  # no host list copied to the device
    assert batch.temperature.tolist() == pytest.approx([0.7] * 3) and batch.top_k.tolist() == [5] * 3
    assert batch.top_p.tolist() == pytest.approx([0.9] * 3) and batch.min_p.tolist() == pytest.approx([0.1] * 3)
    assert batch.temperature.dtype == torch.float32 and batch.top_k.dtype == torch.long
    # Rows that differ still get their own values, from the list.
    assert SamplingBatch.from_requests(mixed, VOCAB, torch.device("cpu"), _penalty_state()).temperature.tolist() == pytest.approx([0.7, 0.3])
    assert ([0.7, 0.3],) in made_from_lists


# ---- against the tiny model and HF --------------------------------------------------------


def test_logprobs_equal_hf_log_softmax(llm, hf_model):
    output = _greedy(llm, max_tokens=5, logprobs=3)
    completion = output.outputs[0]
    ids = list(output.prompt_token_ids)
    total = 0.0
    for token, entry in zip(completion.token_ids, completion.logprobs):
        with torch.no_grad():
            reference = hf_model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        top = reference.topk(3)
        assert list(entry)[:3] == top.indices.tolist()
        for token_id, logprob in entry.items():
            assert abs(logprob.logprob - reference[token_id].item()) < 1e-4
        assert entry[token].rank == 1  # greedy picks the most likely token
        total += entry[token].logprob
        ids.append(token)
    assert completion.cumulative_logprob == pytest.approx(total, abs=1e-5)


def test_logprobs_zero_returns_only_the_sampled_token(llm):
    completion = _greedy(llm, max_tokens=3, logprobs=0).outputs[0]
    assert [list(entry) for entry in completion.logprobs] == [[t] for t in completion.token_ids]


def test_prompt_logprobs_equal_hf_and_skip_the_prefix_cache(llm, hf_model):
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2)
    first = llm.generate(PROMPT, params, use_tqdm=False)[0]
    again = llm.generate(PROMPT, params, use_tqdm=False)[0]  # its prompt is now cached
    ids = first.prompt_token_ids
    with torch.no_grad():
        reference = hf_model(torch.tensor([ids])).logits[0].log_softmax(-1)
    for output in (first, again):
        assert output.prompt_logprobs[0] is None
        assert len(output.prompt_logprobs) == len(ids)
        for position in range(1, len(ids)):
            entry = output.prompt_logprobs[position]
            assert ids[position] in entry
            for token_id, logprob in entry.items():
                assert abs(logprob.logprob - reference[position - 1, token_id].item()) < 1e-4


def test_prompt_logprobs_survive_chunked_prefill(llama_dir, llm):
    chunked = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=2, max_num_seqs=1)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    whole = llm.generate(PROMPT, params, use_tqdm=False)[0].prompt_logprobs
    pieces = chunked.generate(PROMPT, params, use_tqdm=False)[0].prompt_logprobs
    assert [list(e) if e else None for e in pieces] == [list(e) if e else None for e in whole]


def test_allowed_token_ids_restrict_every_token(llm):
    allowed = [11, 12, 13]
    completion = llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=0, max_tokens=12, ignore_eos=True, allowed_token_ids=allowed), use_tqdm=False)[0].outputs[0]
    assert set(completion.token_ids) <= set(allowed)
    free = llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert not set(free.token_ids) <= set(allowed)


def test_logit_bias_steers_sampling(llm):
    greedy = _greedy(llm).outputs[0].token_ids
    target = next(t for t in range(20, 300) if t not in greedy)
    biased = _greedy(llm, logit_bias={target: 100.0}).outputs[0].token_ids
    assert biased == [target] * len(biased)


def test_min_tokens_holds_back_eos(llama_dir):
    probe = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN)
    greedy = _greedy(probe, max_tokens=10).outputs[0].token_ids
    eos = greedy[2]
    llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, hf_overrides={"eos_token_id": eos})
    stops_early = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0].outputs[0]
    assert len(stops_early.token_ids) <= 3
    held = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10, min_tokens=6), use_tqdm=False)[0].outputs[0]
    assert len(held.token_ids) >= 6 and eos not in held.token_ids[:5]


def test_n_returns_indexed_completions(llm):
    output = llm.generate(PROMPT, SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert len(output) == 1
    completions = output[0].outputs
    assert [c.index for c in completions] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 6 for c in completions)
    assert len({tuple(c.token_ids) for c in completions}) > 1


def test_detokenize_false_gives_tokens_without_text(llm):
    completion = _greedy(llm, detokenize=False).outputs[0]
    assert completion.text == "" and len(completion.token_ids) == 8


def test_beam_search_matches_hf_num_beams(llm, llama_dir, hf_model):
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    ours = llm.beam_search([{"prompt_token_ids": prompt_ids}], BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True))
    config = GenerationConfig(
        num_beams=3, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0, length_penalty=1.0
    )
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([prompt_ids]), generation_config=config)[0].tolist()
    best = ours[0].sequences[0]
    assert best.tokens == theirs
    assert len(ours[0].sequences) == 3
    assert best.text == llm.get_tokenizer().decode(best.tokens)
    scores = [s.cum_logprob / len(s.tokens) for s in ours[0].sequences]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"n": 0}, ValueError, "n must be"),
        ({"presence_penalty": 3.0}, ValueError, "presence_penalty"),
        ({"presence_penalty": float("nan")}, ValueError, "presence_penalty must be a finite number"),
        ({"frequency_penalty": float("nan")}, ValueError, "frequency_penalty must be a finite number"),
        ({"repetition_penalty": 0.0}, ValueError, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, ValueError, "repetition_penalty must be a finite number"),
        ({"temperature": float("nan")}, ValueError, "temperature must be a finite number"),
        ({"temperature": float("-inf")}, ValueError, "temperature must be a finite number"),
        ({"min_p": 1.5}, ValueError, "min_p"),
        ({"min_tokens": 5, "max_tokens": 2}, ValueError, "min_tokens"),
        ({"logprobs": -2}, ValueError, "logprobs"),
        ({"stop": [""]}, ValueError, "stop"),
        ({"stop": 123}, TypeError, "stop must be a string or a list of strings"),
        ({"stop_token_ids": 5}, TypeError, "stop_token_ids must be a list of ints"),
        ({"stop": "x", "detokenize": False}, ValueError, "detokenize"),
        ({"logit_bias": {"a": 1.0}}, TypeError, "logit_bias"),
        ({"logit_bias": {3: float("nan")}}, ValueError, r"logit_bias\[3\] must be a finite number"),
        ({"allowed_token_ids": []}, ValueError, "allowed_token_ids"),
        ({"bad_words": [" "]}, ValueError, "bad_words"),
        ({"seed": 2**64}, ValueError, "seed must be an int in"),
        ({"ignore_eos": "no"}, TypeError, "ignore_eos must be True or False"),
        ({"max_tokens": 2.0}, TypeError, "max_tokens must be an int"),
        ({"n": 2, "temperature": 0.0}, ValueError, "n must be 1 when sampling greedily"),
    ],
)
def test_every_field_is_validated(kwargs, error, message):
    with pytest.raises(error, match=message):
        SamplingParams(**kwargs)


def test_fields_set_after_construction_are_checked_at_submission(llm):
    params = SamplingParams(temperature=0.5, max_tokens=2)
    params.temperature = float("nan")
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        llm.generate(PROMPT, params, use_tqdm=False)
    assert _greedy(llm).outputs[0].token_ids  # still serving


def test_parameters_are_normalized_as_vllm_does():
    with pytest.warns(UserWarning, match="raised to 0.01"):
        assert SamplingParams(temperature=0.001).temperature == 0.01
    greedy = SamplingParams(temperature=0, top_p=0.5, top_k=3, min_p=0.2)
    assert (greedy.top_p, greedy.top_k, greedy.min_p) == (1.0, 0, 0.0)
    assert SamplingParams(seed=-1).seed is None
    assert SamplingParams(logprobs=True).logprobs == 1
    params = SamplingParams(stop_token_ids=[5], extra_args={"k": 1})
    clone = params.clone()
    assert clone == params and clone.stop_token_ids is not params.stop_token_ids


def test_token_ids_in_sampling_params_are_checked_against_the_vocabulary(llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate(PROMPT, SamplingParams(logit_bias={10**6: 1.0}), use_tqdm=False)
    assert _greedy(llm).outputs[0].token_ids  # still serving
