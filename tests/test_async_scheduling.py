"""Async scheduling: a step is launched before the previous step's tokens reach the host.

The CPU has no device queue to overlap with, but the engine's bookkeeping is the same
there: these tests force ``async_scheduling=True`` and compare every output with the
synchronous engine's on the same workload.
"""

from __future__ import annotations

import random

import pytest
import torch

from fxllm import LLM, SamplingParams
from fxllm.config import resolve_async_scheduling
from fxllm.runtime import step_result
from tests.conftest import assert_all_blocks_free

MAX_MODEL_LEN = 80
# 24 blocks of 16 tokens hold a few of the workload's requests at once: preemption is certain.
NUM_BLOCKS = 24
NUM_PROMPTS = 60
LOGPROB_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def engines(llama_dir):
    def engine(async_scheduling: bool) -> LLM:
        return LLM(
            model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, num_gpu_blocks_override=NUM_BLOCKS,
            async_scheduling=async_scheduling,
        )

    return engine(False), engine(True)


def _signature(outputs) -> tuple[list, list[float]]:
    """Everything but logprob values exactly, and the logprob values apart: steps batch
    requests differently in the two modes, which moves fp32 sums in their last bits."""
    exact, values = [], []
    for output in outputs:
        positions = [p for c in output.outputs for p in c.logprobs or ()] + [p for p in output.prompt_logprobs or () if p]
        exact.append((
            [c.token_ids for c in output.outputs],
            [(c.finish_reason, c.stop_reason, c.text) for c in output.outputs],
            [[(token, entry.rank, entry.decoded_token) for token, entry in p.items()] for p in positions],
        ))
        values += [entry.logprob for p in positions for entry in p.values()]
    return exact, values


def _workload(stop_tokens: list[int]) -> tuple[list[dict], list[SamplingParams]]:
    """Every kind of request the engine treats differently under async scheduling. Sampled
    kinds are seeded: their tokens do not depend on what else shares the step."""
    rng = random.Random(0)
    prompts, params = [], []
    for index in range(NUM_PROMPTS):
        prompts.append({"prompt_token_ids": [rng.randrange(3, 300) for _ in range(rng.randint(1, 40))]})
        max_tokens = rng.randint(1, 20)
        kinds = [
            SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
            SamplingParams(temperature=0.8, top_p=0.9, seed=index, max_tokens=max_tokens, ignore_eos=True),
            SamplingParams(n=2, temperature=1.0, top_k=20, seed=index, max_tokens=max_tokens, ignore_eos=True),
            SamplingParams(temperature=0, logprobs=2, max_tokens=max_tokens, ignore_eos=True),
            # Stops on a token it generates mid-output: a step for it is already in flight.
            SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_tokens[index]]),
            SamplingParams(temperature=0, max_tokens=max_tokens, min_tokens=max_tokens // 2, stop_token_ids=[stop_tokens[index]]),
            # Penalties count the outputs so far on the device, the token in flight included.
            SamplingParams(temperature=0, max_tokens=max_tokens, repetition_penalty=1.3, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=max_tokens, prompt_logprobs=1, ignore_eos=True),
        ]
        params.append(kinds[index % len(kinds)])
    return prompts, params


def test_async_engine_gives_the_sync_engines_outputs_under_preemption(engines):
    sync, overlapped = engines
    assert overlapped.llm_engine.async_scheduling and not sync.llm_engine.async_scheduling
    rng = random.Random(1)
    probe_prompts, _ = _workload([0] * NUM_PROMPTS)
    probe = sync.generate(probe_prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    # A token each greedy output reaches after a few steps, to stop on.
    stop_tokens = [o.outputs[0].token_ids[rng.randrange(2, 10)] for o in probe]
    prompts, params = _workload(stop_tokens)
    expected, expected_logprobs = _signature(sync.generate(prompts, params, use_tqdm=False))
    preemptions = overlapped.llm_engine.scheduler.num_preemptions
    exact, logprobs = _signature(overlapped.generate(prompts, params, use_tqdm=False))
    assert exact == expected
    assert logprobs == pytest.approx(expected_logprobs, abs=LOGPROB_TOLERANCE)
    assert overlapped.llm_engine.scheduler.num_preemptions > preemptions
    stopped = [o for o, p in zip(expected, params) if p.stop_token_ids and o[1][0][0] == "stop"]
    assert stopped, "no request stopped on a token mid-output: the workload misses its case"
    assert_all_blocks_free(overlapped)


def _launch_order(llm: LLM, monkeypatch, params: SamplingParams) -> list[str]:
    """'launch' and 'result' in the order the engine calls them over one generate call."""
    events = []
    real_launch, real_result = llm.llm_engine.executor.execute_model, step_result.LaunchedStep.result

    def launch(step, previous=None):
        events.append("launch")
        return real_launch(step, previous)

    def result(self):
        events.append("result")
        return real_result(self)

    monkeypatch.setattr(llm.llm_engine.executor, "execute_model", launch)
    monkeypatch.setattr(step_result.LaunchedStep, "result", result)
    llm.generate({"prompt_token_ids": [5, 6, 7]}, params, use_tqdm=False)
    return events


def test_each_step_is_launched_before_the_previous_steps_tokens_are_taken(engines, monkeypatch):
    overlapped = engines[1]
    max_tokens = 6
    events = _launch_order(overlapped, monkeypatch, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    # One launch per token (a step whose pending token reaches max_tokens is never launched),
    # each before the previous step's result.
    assert events == ["launch"] + ["launch", "result"] * (max_tokens - 1) + ["result"]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_request_is_detokenized_in_the_step_that_finishes_it(engines, mode):
    """Its text is decoded inside ``step`` (overlapping the next step's device work under
    async scheduling), not left for the output to decode after the run."""
    llm = engines[mode == "async"]
    engine = llm.llm_engine
    finished = []

    def step():
        done = type(engine).step(engine)
        finished.extend((request.detokenizer.num_undecoded, len(request.output_token_ids)) for request in done)
        return done

    engine.step = step
    try:
        llm.generate(["Hello there", "Once upon a time"], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
                     use_tqdm=False)
    finally:
        del engine.step
    assert finished == [(0, 7), (0, 7)]


def test_a_request_whose_sampling_reads_its_outputs_on_the_host_is_run_step_by_step(engines, monkeypatch):
    overlapped = engines[1]
    params = SamplingParams(temperature=0, max_tokens=4, bad_words=["zzz"], ignore_eos=True)
    assert _launch_order(overlapped, monkeypatch, params) == ["launch", "result"] * 4


def test_penalties_count_tokens_on_the_device_so_their_steps_overlap(engines, monkeypatch):
    overlapped = engines[1]
    max_tokens = 4
    params = SamplingParams(temperature=0, max_tokens=max_tokens, frequency_penalty=0.5, ignore_eos=True)
    assert _launch_order(overlapped, monkeypatch, params) == ["launch"] + ["launch", "result"] * (max_tokens - 1) + ["result"]


def test_async_scheduling_defaults_to_cuda_engines_that_support_it():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_async_scheduling(None, cuda, takes_embeds=False)
    assert not resolve_async_scheduling(None, cpu, takes_embeds=False)
    assert not resolve_async_scheduling(None, cuda, takes_embeds=True)
    assert resolve_async_scheduling(True, cpu, takes_embeds=False)
    with pytest.raises(ValueError, match="vision-language"):
        resolve_async_scheduling(True, cuda, takes_embeds=True)
    with pytest.raises(ValueError, match="True, False or None"):
        resolve_async_scheduling("yes", cuda, takes_embeds=False)
