"""Stage 2: split the captured graph at every splitting op (the attention op by default).

Each splitting op gets a piece of its own; the nodes between two of them form a
compute piece. ``split_module`` keeps the original order, so side effects (the
attention op's KV-cache write) stay where they were.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.passes.split_module import split_module


@dataclass
class Piece:
    name: str  # submodule name in the split graph, e.g. "submod_0"
    module: fx.GraphModule
    is_splitting_op: bool
    op_histogram: dict[str, int]


@dataclass
class SplitGraph:
    graph_module: fx.GraphModule  # calls the pieces in order
    pieces: list[Piece]


def op_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.replace("::", ".")
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.replace("::", ".")
    if node.op == "call_method":
        return f"Tensor.{target}"
    return getattr(target, "__name__", str(target))


def _is_splitting(node: fx.Node, splitting_ops: tuple[str, ...]) -> bool:
    return node.op == "call_function" and op_name(node) in splitting_ops


def split_graph(graph_module: fx.GraphModule, splitting_ops: tuple[str, ...]) -> SplitGraph:
    piece_of: dict[fx.Node, int] = {}
    piece_index = 0
    for node in graph_module.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if _is_splitting(node, splitting_ops):
            piece_index += 1
            piece_of[node] = piece_index
            piece_index += 1
        else:
            piece_of[node] = piece_index
    split = split_module(graph_module, None, lambda node: piece_of[node], keep_original_order=True)
    pieces = []
    for name, module in split.named_children():
        ops = [n for n in module.graph.nodes if n.op in ("call_function", "call_method")]
        pieces.append(
            Piece(
                name=name,
                module=module,
                is_splitting_op=any(_is_splitting(n, splitting_ops) for n in ops),
                op_histogram=dict(Counter(op_name(n) for n in ops)),
            )
        )
    return SplitGraph(split, pieces)
