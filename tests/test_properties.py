"""Property tests for the scheduler and the KV-cache manager (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxllm import LLM, SamplingParams
from fxllm.config import SchedulerConfig
from fxllm.runtime.detokenizer import IncrementalDetokenizer
from fxllm.runtime.kv_cache import KVCacheManager
from fxllm.runtime.request import Request
from fxllm.runtime.scheduler import Scheduler

MAX_STEPS = 5000
ALPHABET = 3  # few distinct token ids, so prompts share prefixes and hit the cache
BLOCK_SIZE = 4


class _NoTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return ""


def _fake_next_token(tokens: list[int]) -> int:
    """A deterministic 'model': the next token depends on the whole sequence."""
    return (sum((i + 1) * t for i, t in enumerate(tokens)) * 31 + len(tokens)) % ALPHABET


def _check_block_accounting(cache: KVCacheManager, holders: list[Request]) -> None:
    held: dict[int, int] = {}
    for request in holders:
        assert len(request.block_ids) == len(set(request.block_ids)), "a request holds a block twice"
        for block in request.block_ids:
            held[block] = held.get(block, 0) + 1
    for block in range(cache.num_blocks):
        assert cache.ref_counts[block] == held.get(block, 0)
        assert (block in cache.free_queue) == (held.get(block, 0) == 0)
    for block_hash, block in cache.cached_blocks.items():
        assert cache.block_hash[block] == block_hash


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    num_blocks = draw(st.integers(4, 24))
    max_len = num_blocks * block_size
    requests = []
    for _ in range(draw(st.integers(1, 12))):
        prompt_len = draw(st.integers(1, max(1, min(max_len - 1, 40))))
        max_tokens = draw(st.integers(1, max(1, min(max_len - prompt_len, 12))))
        prompt = draw(st.lists(st.integers(0, ALPHABET - 1), min_size=prompt_len, max_size=prompt_len))
        requests.append((draw(st.integers(0, 10)), prompt, max_tokens))
    return dict(
        block_size=block_size,
        num_blocks=num_blocks,
        max_len=max_len,
        max_num_seqs=draw(st.integers(1, 6)),
        budget=draw(st.integers(1, 48)),
        prefix_caching=draw(st.booleans()),
        requests=requests,
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_scheduler_keeps_its_limits_and_never_leaks_or_double_frees(workload):
    cache = KVCacheManager(workload["num_blocks"], workload["block_size"], workload["prefix_caching"])
    config = SchedulerConfig(max_num_seqs=workload["max_num_seqs"], max_num_batched_tokens=workload["budget"])
    scheduler = Scheduler(config, cache)
    pending = sorted(enumerate(workload["requests"]), key=lambda item: item[1][0])
    requests = []
    for index, (_, prompt, max_tokens) in pending:
        requests.append(
            Request(
                request_id=str(index), prompt=None, prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=max_tokens),
                max_tokens=max_tokens, stop_token_ids=frozenset(), detokenizer=IncrementalDetokenizer(_NoTokenizer(), prompt, True),
            )
        )
    arrivals = [arrival for _, (arrival, _, _) in pending]
    for step in range(MAX_STEPS):
        while arrivals and arrivals[0] <= step:
            arrivals.pop(0)
            scheduler.add(requests[len(requests) - len(arrivals) - 1])
        output = scheduler.schedule()
        assert output.num_tokens <= workload["budget"]
        assert len(scheduler.running) <= workload["max_num_seqs"]
        assert all(s.num_new_tokens > 0 for s in output.scheduled)
        for scheduled in output.scheduled:
            request = scheduled.request
            assert cache.blocks_for(request.num_computed_tokens + scheduled.num_new_tokens) <= len(request.block_ids)
            samples = scheduled.samples
            request.num_computed_tokens += scheduled.num_new_tokens
            cache.commit_full_blocks(request)
            if samples:
                request.append_output(_fake_next_token(request.all_token_ids))
                if request.finish_reason is not None:
                    scheduler.finish(request)
        _check_block_accounting(cache, scheduler.running + list(scheduler.waiting))
        if not arrivals and not scheduler.has_unfinished():
            break
    assert not scheduler.has_unfinished(), "requests starved"
    assert cache.num_free_blocks == cache.num_blocks
    for request in requests:
        expected = list(request.prompt_token_ids)
        for _ in range(request.max_tokens):
            expected.append(_fake_next_token(expected))
        assert request.all_token_ids == expected


@pytest.fixture(scope="module")
def engines(llama_dir):
    def make(prefix_caching):
        return LLM(model=str(llama_dir), enforce_eager=True, max_model_len=64, block_size=BLOCK_SIZE,
                   enable_prefix_caching=prefix_caching, num_gpu_blocks_override=40)
    return make(True), make(False)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.lists(st.integers(3, 12), min_size=1, max_size=20), min_size=1, max_size=6))
def test_prefix_cache_hits_never_change_outputs(engines, prompts):
    cached, uncached = engines
    requests = [{"prompt_token_ids": p} for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    without = [o.outputs[0].token_ids for o in uncached.generate(requests, params, use_tqdm=False)]
    hits_before = cached.llm_engine.kv_cache.prefix_hits
    # Twice: the second run finds the first one's full blocks in the cache.
    for _ in range(2):
        with_cache = [o.outputs[0].token_ids for o in cached.generate(requests, params, use_tqdm=False)]
        assert with_cache == without
    if any(len(p) > BLOCK_SIZE for p in prompts):  # a full block before the token a prompt must compute
        assert cached.llm_engine.kv_cache.prefix_hits > hits_before
