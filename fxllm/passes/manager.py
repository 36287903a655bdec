"""The pass manager: runs the enabled passes on the captured graph in a fixed order.

Each pass is a small class with a ``name``, a stable ``uuid`` (source + config),
``applies(num_tokens)`` and ``__call__(graph) -> matches``. The manager's uuid
goes into the compile-cache key, and the match counts into the compile report.
No fusion pass is registered yet, so the manager runs none.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

from torch import fx

from fxllm.config import PassConfig


class GraphPass(Protocol):
    name: str

    def uuid(self) -> str: ...

    def __call__(self, graph: fx.Graph) -> int: ...


class PassManager:
    def __init__(self, config: PassConfig):
        self.config = config
        self.passes: list[GraphPass] = []

    def uuid(self) -> str:
        parts = [repr(self.config)] + [f"{p.name}:{p.uuid()}" for p in self.passes]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def __call__(self, graph_module: fx.GraphModule) -> dict[str, int]:
        matches = {p.name: p(graph_module.graph) for p in self.passes}
        if self.passes:
            graph_module.graph.lint()
            graph_module.recompile()
        return matches
