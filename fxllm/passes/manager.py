"""The pass manager: runs the enabled passes on the captured graph in a fixed order.

Each pass is a small class with a ``name``, a stable ``uuid`` (source + config),
and ``__call__(graph) -> matches`` (passes/graph_pass.py).
The manager's uuid goes into the compile-cache key, and the match counts into the
compile report. No-op elimination runs first, so fusions see the graph without it.
"""

from __future__ import annotations

import hashlib

from torch import fx

from fxllm.config import PassConfig
from fxllm.passes.graph_pass import GraphPass
from fxllm.passes.noop import NoOpElimination
from fxllm.passes.qk_norm_rope import QKNormRopeFusion
from fxllm.passes.rms_norm_fusion import RMSNormFusion


def enabled_passes(config: PassConfig) -> list[GraphPass]:
    passes: list[GraphPass] = []
    if config.enable_noop:
        passes.append(NoOpElimination())
    if config.enable_fusion and config.enable_qk_norm_rope_fusion:
        passes.append(QKNormRopeFusion())
    if config.enable_fusion and config.enable_rms_norm_fusion:
        passes.append(RMSNormFusion())
    return passes


class PassManager:
    def __init__(self, config: PassConfig):
        self.config = config
        self.passes = enabled_passes(config)

    def uuid(self) -> str:
        parts = [repr(self.config)] + [f"{p.name}:{p.uuid()}" for p in self.passes]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def __call__(self, graph_module: fx.GraphModule) -> dict[str, int]:
        # Passes run once, before splitting, on the graph that serves every T.
        matches = {p.name: p(graph_module.graph) for p in self.passes}
        if self.passes:
            graph_module.graph.lint()
            graph_module.recompile()
        return matches
