"""The KV-cache block pool: allocation, prefix caching and freeing, all in one place.

Blocks hold ``block_size`` tokens. A FULL block's hash chains its parent's hash
and its token ids (and the content hashes of the images and videos whose placeholder tokens it
overlaps: equal placeholders of different images never share), so equal hashes mean
equal prefixes. Freed blocks keep their
hash and wait in an LRU queue; a later request with the same prefix takes them
back (ref counts), and allocation evicts from the queue's old end.
"""

from __future__ import annotations

from collections import OrderedDict

from fxllm.runtime.request import Request
from fxllm.utils import cdiv

_ROOT_HASH = 0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached_blocks: dict[int, int] = {}  # hash -> block id
        # Blocks with ref count 0, least recently freed first (evicted first).
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.prefix_hits = 0  # tokens served from the cache, for stats and tests
        self.prefix_queries = 0  # tokens looked up in the cache

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def allocate_new(self, request: Request, token_budget: int) -> int | None:
        """First allocation of a waiting request: reuse cached prefix blocks, then allocate
        for up to ``token_budget`` new tokens. Returns the number of tokens to compute,
        or None (nothing taken) when the pool cannot hold them."""
        hits = self._match_prefix(request)
        num_computed = len(hits) * self.block_size
        num_new = min(request.num_tokens - num_computed, token_budget)
        needed = self.blocks_for(num_computed + num_new) - len(hits)
        hits_in_free_queue = sum(1 for block in hits if self.ref_counts[block] == 0)
        if needed > self.num_free_blocks - hits_in_free_queue:
            return None
        for block in hits:
            self._take(block)
        request.block_ids = list(hits)
        request.num_committed_blocks = len(hits)  # hits are cached blocks already
        request.num_computed_tokens = num_computed
        self.prefix_hits += num_computed
        self.prefix_queries += request.num_tokens
        self._grow(request, needed)
        return num_new

    def allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Make the block table of a running request cover ``num_new_tokens`` more tokens."""
        needed = self.blocks_for(request.num_computed_tokens + num_new_tokens) - len(request.block_ids)
        if needed > self.num_free_blocks:
            return False
        self._grow(request, needed)
        return True

    def commit_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that became full and computed, for later hits."""
        if not self.enable_prefix_caching:
            return
        # Only tokens the host knows can be hashed: a pending output's K/V may be launched already.
        known = min(request.num_computed_tokens, len(request.all_token_ids))
        num_full = known // self.block_size
        self._extend_hashes(request, num_full)
        for index in range(request.num_committed_blocks, num_full):
            block = request.block_ids[index]
            if self.block_hash[block] is not None:
                continue
            block_hash = request.block_hashes[index]
            if block_hash in self.cached_blocks:
                continue  # another request computed the same prefix; keep the first copy
            self.block_hash[block] = block_hash
            self.cached_blocks[block_hash] = block
        request.num_committed_blocks = num_full

    @property
    def usage(self) -> float:
        """The share of blocks held by requests (cached free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; False (nothing done) while a request holds blocks."""
        if self.num_free_blocks != self.num_blocks:
            return False
        self.cached_blocks.clear()
        self.block_hash = [None] * self.num_blocks
        return True

    def free(self, request: Request) -> None:
        """Release a request's blocks; the tail goes into the queue first, so it is evicted first."""
        for block in reversed(request.block_ids):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None
        request.block_ids = []
        request.num_committed_blocks = 0

    def _match_prefix(self, request: Request) -> list[int]:
        # Cached tokens have no logits, so requests that ask for prompt logprobs take no hits.
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return []
        # Leave at least one token to compute: its logits are needed to sample.
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._extend_hashes(request, max_blocks)
        hits = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.cached_blocks.get(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def _extend_hashes(self, request: Request, num_blocks: int) -> None:
        hashes, size = request.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            start, end = len(hashes) * size, (len(hashes) + 1) * size
            parent = hashes[-1] if hashes else hash((_ROOT_HASH, request.cache_salt))
            tokens = tuple(request.all_token_ids[start:end])
            contents = request.multimodal.content_hashes(start, end) if request.multimodal is not None else ()
            hashes.append(hash((parent, tokens, contents) if contents else (parent, tokens)))

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_queue[block]
        self.ref_counts[block] += 1

    def _grow(self, request: Request, num_blocks: int) -> None:
        for _ in range(num_blocks):
            block, _ = self.free_queue.popitem(last=False)
            stale_hash = self.block_hash[block]
            if stale_hash is not None:  # evict: its contents are about to be overwritten
                del self.cached_blocks[stale_hash]
                self.block_hash[block] = None
            self.ref_counts[block] = 1
            request.block_ids.append(block)
