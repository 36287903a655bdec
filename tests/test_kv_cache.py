"""The block pool: allocation, prefix hits with ref counts, LRU eviction, freeing."""

from __future__ import annotations

from fxllm.runtime.detokenizer import IncrementalDetokenizer
from fxllm.runtime.kv_cache import KVCacheManager
from fxllm.runtime.request import Request
from fxllm.sampling_params import SamplingParams

BLOCK = 4


class _NoTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return ""


def _request(token_ids: list[int]) -> Request:
    return Request(
        request_id="r",
        prompt=None,
        prompt_token_ids=token_ids,
        sampling_params=SamplingParams(),
        max_tokens=4,
        stop_token_ids=frozenset(),
        detokenizer=IncrementalDetokenizer(_NoTokenizer(), token_ids, True),
    )


def _run_prefill(cache: KVCacheManager, request: Request) -> int:
    num_new = cache.allocate_new(request, token_budget=1000)
    request.num_computed_tokens += num_new
    cache.commit_full_blocks(request)
    return num_new


def test_shared_full_blocks_are_hit_and_ref_counted():
    cache = KVCacheManager(num_blocks=10, block_size=BLOCK, enable_prefix_caching=True)
    first = _request(list(range(10)))  # 2 full blocks + 2 tokens
    _run_prefill(cache, first)
    second = _request(list(range(8)) + [99, 98, 97])
    assert _run_prefill(cache, second) == 3  # 8 tokens came from the cache
    assert second.block_ids[:2] == first.block_ids[:2]
    assert cache.ref_counts[first.block_ids[0]] == 2
    cache.free(first)
    cache.free(second)
    assert cache.num_free_blocks == 10


def test_last_token_is_always_computed_even_on_a_full_hit():
    cache = KVCacheManager(num_blocks=10, block_size=BLOCK, enable_prefix_caching=True)
    _run_prefill(cache, _request(list(range(8))))
    again = _request(list(range(8)))
    assert _run_prefill(cache, again) == 4  # one block hit; the block holding the last token recomputed


def test_freed_blocks_stay_cached_until_evicted_oldest_first():
    cache = KVCacheManager(num_blocks=4, block_size=BLOCK, enable_prefix_caching=True)
    old = _request(list(range(9)))
    _run_prefill(cache, old)
    cache.free(old)
    hit = _request(list(range(8)) + [5])
    assert _run_prefill(cache, hit) == 1
    cache.free(hit)
    # A different prompt needing every block evicts the cached ones.
    other = _request([50 + i for i in range(16)])
    assert _run_prefill(cache, other) == 16
    cache.free(other)
    assert _run_prefill(cache, _request(list(range(9)))) == 9


def test_allocation_fails_cleanly_when_the_pool_is_full():
    cache = KVCacheManager(num_blocks=2, block_size=BLOCK, enable_prefix_caching=False)
    running = _request(list(range(8)))
    _run_prefill(cache, running)
    waiting = _request([7, 7, 7])
    assert cache.allocate_new(waiting, token_budget=100) is None
    assert waiting.block_ids == [] and cache.num_free_blocks == 0
    assert not cache.allocate(running, 1)


def test_prefix_caching_off_never_hits():
    cache = KVCacheManager(num_blocks=10, block_size=BLOCK, enable_prefix_caching=False)
    _run_prefill(cache, _request(list(range(9))))
    assert _run_prefill(cache, _request(list(range(9)))) == 9
    assert cache.prefix_hits == 0
