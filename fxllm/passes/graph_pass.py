"""What every pass is: a name, a stable uuid and ``__call__(graph) -> matches``.

Passes run once, on the captured graph that serves every T, before it is split."""

from __future__ import annotations

import hashlib
import inspect
import types
from typing import Protocol

from torch import fx


class GraphPass(Protocol):
    name: str

    def uuid(self) -> str: ...

    def __call__(self, graph: fx.Graph) -> int:
        """Rewrite ``graph`` in place; return the number of matches rewritten."""
        ...


def source_uuid(*modules: types.ModuleType) -> str:
    """A hash of the source of the modules that make a pass (the switches that choose
    passes are hashed by the pass manager)."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()[:16]


def example_value(node: fx.Node) -> object:
    """The fake tensor (or SymInt) Dynamo recorded for ``node``; None where it recorded none."""
    return node.meta.get("example_value", node.meta.get("val"))
