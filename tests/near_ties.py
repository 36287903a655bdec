"""The rule half-precision runs are held to: greedy outputs may differ only between near ties.

At the first token where two greedy completions differ, each side's token must be among
the other's top-k (both runs sampled with ``logprobs=k``).
"""

from __future__ import annotations

TOP_K = 5


def top_tokens(completion, position: int, k: int = TOP_K) -> list[int]:
    ranked = sorted(completion.logprobs[position].items(), key=lambda item: item[1].rank)
    return [token for token, _ in ranked[:k]]


def assert_diverge_only_between_near_ties(outputs, reference, k: int = TOP_K) -> None:
    """``outputs`` and ``reference``: CompletionOutputs of the same prompts, in order."""
    for mine, theirs in zip(outputs, reference, strict=True):
        if mine.token_ids == theirs.token_ids:
            continue
        first = next(i for i, (a, b) in enumerate(zip(mine.token_ids, theirs.token_ids)) if a != b)
        assert mine.token_ids[first] in top_tokens(theirs, first, k)
        assert theirs.token_ids[first] in top_tokens(mine, first, k)
