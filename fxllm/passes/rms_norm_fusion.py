"""RMSNorm fusion: each RMSNorm of [T, hidden] rows becomes one ``fxllm::rms_norm`` call,
and one ``fxllm::add_rms_norm`` call together with the residual add that feeds it.

What Inductor does without it on an H100 (BENCHMARKS.md): two kernels per norm, a
reduction and then a pointwise kernel. And once no-op elimination has dropped the Llama
family's ``* residual_multiplier`` (1.0), Inductor folds each residual add into the GEMM
before it as ``addmm``, which on CUDA first copies the residual into the output: a
device-to-device copy per add. The fused op holds the add, so no GEMM takes it, and
adds and normalizes in one launch.

CUDA only (``FUSED_DEVICE_TYPES``): on a CPU Inductor already compiles add + norm into
one C++ loop, and the op would run as separate eager torch ops there.
"""

from __future__ import annotations

import operator
import sys
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxllm.passes import rms_norm_op
from fxllm.passes.graph_pass import example_value, source_uuid
from fxllm.passes.patterns import is_call, match_rms_norm

FUSED_DEVICE_TYPES = ("cuda",)
_ROWS_RANK = 2  # [T, hidden]


@dataclass(frozen=True)
class Norm:
    """One match: ``RMSNorm(source, weight, eps)``, with ``source = x + residual`` where ``add`` is set."""

    source: fx.Node
    weight: fx.Node
    eps: float
    output: fx.Node
    nodes: tuple[fx.Node, ...]  # the norm's ops, to erase once unused
    add: fx.Node | None


class RMSNormFusion:
    name = "rms_norm_fusion"

    def __init__(self, device_types: tuple[str, ...] | None = None):
        self.device_types = FUSED_DEVICE_TYPES if device_types is None else device_types

    def uuid(self) -> str:
        return f"{source_uuid(sys.modules[__name__], rms_norm_op)}-{','.join(self.device_types)}"

    def __call__(self, graph: fx.Graph) -> int:
        fused = 0
        # A match erases only its norm's ops and add, all before its output: no node still
        # ahead in this list is ever erased. Nodes a match inserts are never looked up in order.
        nodes = list(graph.nodes)
        order = {node: index for index, node in enumerate(nodes)}
        for node in nodes:
            norm = self._match(node, order)
            if norm is not None:
                _fuse(graph, norm)
                fused += 1
        return fused

    def _match(self, node: fx.Node, order: dict[fx.Node, int]) -> Norm | None:
        found = match_rms_norm(node)
        if found is None:
            return None
        source, weight, eps, nodes = found
        if not isinstance(source, fx.Node) or not isinstance(weight, fx.Node) or not self._rows_fit(source, weight, node):
            return None
        add = source if _is_residual_add(source) else None
        if add is not None and order[weight] > order[add]:
            add = None  # the fused node goes right after the add: its weight must exist there
        return Norm(source, weight, eps, node, nodes, add)

    def _rows_fit(self, source: fx.Node, weight: fx.Node, output: fx.Node) -> bool:
        values = [example_value(n) for n in (source, weight, output)]
        if not all(isinstance(v, torch.Tensor) for v in values):
            return False
        rows, scale, normed = values
        return (
            rows.dim() == _ROWS_RANK
            and rows.device.type in self.device_types
            and tuple(scale.shape) == (rows.shape[-1],)
            and rows.dtype == scale.dtype == normed.dtype
        )


def _is_residual_add(node: fx.Node) -> bool:
    """``x + residual`` of two tensors of the sum's own shape and dtype (no broadcast)."""
    if not is_call(node, operator.add) or len(node.args) != 2 or node.kwargs:
        return False
    total = example_value(node)
    for operand in node.args:
        value = example_value(operand) if isinstance(operand, fx.Node) else None
        if not isinstance(value, torch.Tensor) or value.dtype != total.dtype or value.dim() != total.dim():
            return False
        if not all(statically_known_true(a == b) for a, b in zip(value.shape, total.shape)):
            return False
    return True


def _fuse(graph: fx.Graph, norm: Norm) -> None:
    if norm.add is None:
        args = (norm.source, norm.weight, norm.eps)
        with graph.inserting_before(norm.output):
            normed = graph.call_function(torch.ops.fxllm.rms_norm.default, args)
        normed.meta["example_value"] = torch.ops.fxllm.rms_norm.default(*fx.node.map_arg(args, example_value))
    else:
        args = (*norm.add.args, norm.weight, norm.eps)
        with graph.inserting_after(norm.add):
            fused = graph.call_function(torch.ops.fxllm.add_rms_norm.default, args)
        with graph.inserting_after(fused):
            normed = graph.call_function(operator.getitem, (fused, 0))
        with graph.inserting_after(normed):
            summed = graph.call_function(operator.getitem, (fused, 1))
        fused.meta["example_value"] = torch.ops.fxllm.add_rms_norm.default(*fx.node.map_arg(args, example_value))
        normed.meta["example_value"], summed.meta["example_value"] = fused.meta["example_value"]
        norm.add.replace_all_uses_with(summed)
    norm.output.replace_all_uses_with(normed)
    # Matched ops nothing else uses are dead now; erase users before their inputs.
    dead = set(norm.nodes) | ({norm.add} if norm.add is not None else set())
    for node in reversed(graph.nodes):
        if node in dead and not node.users:
            graph.erase_node(node)
