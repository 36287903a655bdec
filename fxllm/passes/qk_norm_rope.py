"""Q/K-norm + RoPE fusion (Qwen3): the per-head RMSNorm and rotary embedding of a query
and a key become one ``fxllm::qk_norm_rope`` call (one kernel launch on CUDA).

What Inductor cannot do here: the norm is a reduction per head, and the rotation reads
the other half of each normalized row; it compiles the query chain and the key chain
as kernels of their own. Whether the single launch pays is for the GPU measurement.

The matcher walks back from each ``x * cos + rotate_half(x) * sin`` (models/layers.py
``apply_rotary``) to an ``RMSNorm`` of a [T, heads, head_dim] tensor, stepping over the
norm's dtype casts (absent in fp32 once no-op elimination has run). Two consecutive
matches sharing the RoPE tables and eps become one call: in our graphs the query and
the key of one layer. Any two would do, since the op treats its rows independently;
the graph order only has to allow one node for both.
"""

from __future__ import annotations

import operator
import sys
from dataclasses import dataclass

import torch
from torch import fx

from fxllm.passes import qk_norm_rope_op
from fxllm.passes.graph_pass import example_value, source_uuid
from fxllm.passes.patterns import dtype_of, is_call, match_rms_norm

# Dims of the tensors the op takes: [T, heads, head_dim] and tables [T, 1, head_dim].
_HEADS_RANK = 3


@dataclass(frozen=True)
class NormRope:
    """One match: ``apply_rotary(RMSNorm(input, weight, eps), cos, sin)``."""

    input: fx.Node  # [T, heads, head_dim]
    weight: fx.Node  # [head_dim]
    eps: float
    cos: fx.Node  # [T, 1, head_dim]
    sin: fx.Node  # [T, 1, head_dim]
    output: fx.Node
    nodes: tuple[fx.Node, ...]  # the matched ops, to erase once unused


class QKNormRopeFusion:
    name = "qk_norm_rope_fusion"

    def uuid(self) -> str:
        return source_uuid(sys.modules[__name__], qk_norm_rope_op)

    def __call__(self, graph: fx.Graph) -> int:
        matches = [match for node in graph.nodes if (match := match_norm_rope(node)) is not None]
        order = {node: index for index, node in enumerate(graph.nodes)}
        fused = 0
        index = 0
        while index + 1 < len(matches):
            query, key = matches[index], matches[index + 1]
            if _can_fuse(query, key, order):
                _fuse(graph, query, key)
                fused += 1
                index += 2
            else:
                index += 1
        return fused


def match_norm_rope(node: fx.Node) -> NormRope | None:
    rope = _match_rope(node)
    if rope is None:
        return None
    normed, cos, sin, rope_nodes = rope
    norm = match_rms_norm(normed)
    if norm is None:
        return None
    source, weight, eps, norm_nodes = norm
    if not all(isinstance(n, fx.Node) for n in (source, weight, cos, sin)):
        return None
    match = NormRope(source, weight, eps, cos, sin, node, norm_nodes + rope_nodes)
    return match if _shapes_and_dtypes_fit(match) else None


def _match_rope(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, tuple[fx.Node, ...]] | None:
    """``x * cos + cat((-x[..., half:], x[..., :half]), dim=-1) * sin`` -> (x, cos, sin, nodes)."""
    if not is_call(node, operator.add):
        return None
    direct, rotated_term = node.args
    if not (is_call(direct, operator.mul) and is_call(rotated_term, operator.mul)):
        return None
    (x, cos), (rotated, sin) = direct.args, rotated_term.args
    if not is_call(rotated, torch.cat) or _cat_dim(rotated) != -1:
        return None
    halves = rotated.args[0]
    if not isinstance(halves, (list, tuple)) or len(halves) != 2 or not is_call(halves[0], operator.neg):
        return None
    second, first = halves[0].args[0], halves[1]
    if not (is_call(second, operator.getitem) and is_call(first, operator.getitem)):
        return None
    if second.args[0] is not x or first.args[0] is not x:
        return None
    value = example_value(x)
    if not isinstance(value, torch.Tensor):
        return None
    half = value.shape[-1] // 2
    if second.args[1] != (Ellipsis, slice(half, None, None)) or first.args[1] != (Ellipsis, slice(None, half, None)):
        return None
    return x, cos, sin, (node, direct, rotated_term, rotated, halves[0], second, first)


def _cat_dim(node: fx.Node) -> object:
    if "dim" in node.kwargs:
        return node.kwargs["dim"]
    return node.args[1] if len(node.args) > 1 else 0


def _shapes_and_dtypes_fit(match: NormRope) -> bool:
    """Heads as [T, heads, head_dim], one weight per dim, tables broadcast over heads, one dtype."""
    values = [example_value(n) for n in (match.input, match.weight, match.cos, match.sin, match.output)]
    if not all(isinstance(v, torch.Tensor) for v in values):
        return False
    source, weight, cos, sin, output = values
    head_dim = source.shape[-1]
    tables_fit = all(t.dim() == _HEADS_RANK and t.shape[1] == 1 and t.shape[2] == head_dim for t in (cos, sin))
    return (
        source.dim() == _HEADS_RANK
        and tuple(weight.shape) == (head_dim,)
        and tables_fit
        and all(v.dtype == source.dtype for v in values)
    )


def _can_fuse(query: NormRope, key: NormRope, order: dict[fx.Node, int]) -> bool:
    """Same tables and eps, and every input ready before the first of the two outputs,
    where the fused node goes."""
    if (query.cos, query.sin, query.eps) != (key.cos, key.sin, key.eps):
        return False
    if dtype_of(query.input) != dtype_of(key.input):
        return False
    first_output = min(order[query.output], order[key.output])
    inputs = (query.input, key.input, query.weight, key.weight, query.cos, query.sin)
    return all(order[node] < first_output for node in inputs)


def _fuse(graph: fx.Graph, query: NormRope, key: NormRope) -> None:
    first_output = next(node for node in graph.nodes if node in (query.output, key.output))
    args = (query.input, key.input, query.weight, key.weight, query.cos, query.sin, query.eps)
    with graph.inserting_before(first_output):
        fused = graph.call_function(torch.ops.fxllm.qk_norm_rope.default, args)
        outputs = [graph.call_function(operator.getitem, (fused, index)) for index in (0, 1)]
    fake_args = fx.node.map_arg(args, example_value)
    fused.meta["example_value"] = torch.ops.fxllm.qk_norm_rope.default(*fake_args)
    for index, (node, match) in enumerate(zip(outputs, (query, key))):
        node.meta["example_value"] = fused.meta["example_value"][index]
        match.output.replace_all_uses_with(node)
    # Matched ops nothing else uses are dead now; erase users before their inputs.
    dead = set(query.nodes + key.nodes)
    for node in reversed(graph.nodes):
        if node in dead and not node.users:
            graph.erase_node(node)
