"""One request's place in its grammar: which tokens may come next, and the tokens it took.

The matcher advances only on tokens the request keeps (``Request.append_output``): a
preempted request keeps its outputs and recomputes them, so its matcher stays where it
was. A request whose grammar reads its outputs on the host runs step by step under
async scheduling (``Request.samples_from_output``), so its mask always follows its
last token.
"""

from __future__ import annotations

from typing import Any

from fxllm.runtime.structured_outputs import import_xgrammar


class RequestGrammar:
    def __init__(self, compiled: Any, stop_token_ids: frozenset[int]):
        xgr = import_xgrammar()
        # The grammar ends on the EOS ids (the compiler's) or on one of the request's stop tokens;
        # with ignore_eos the EOS ids still end it (nothing else could).
        stop = sorted(set(compiled.tokenizer_info.stop_token_ids) | stop_token_ids)
        self._matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stop or None)
        self.num_accepted = 0  # tokens taken: the request's output length, checked by the tests

    def fill_bitmask(self, bitmask: Any, row: int) -> bool:
        """Write the allowed next tokens into ``bitmask[row]``; False when every token is allowed."""
        return self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advance on a sampled token; False when the grammar does not allow it."""
        accepted = self._matcher.accept_token(token_id)
        self.num_accepted += accepted
        return accepted

    @property
    def terminated(self) -> bool:
        """The grammar is complete and took its stop token: the request is done."""
        return self._matcher.is_terminated()
