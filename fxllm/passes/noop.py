"""No-op elimination: drop nodes that give back their input unchanged.

In the captured graphs of our models these are dtype casts to the dtype a tensor
already has (RMSNorm's ``.float()`` and ``.to(input_dtype)`` and the RoPE tables'
``.to(dtype)`` in fp32), ``contiguous()`` of a contiguous tensor, views and reshapes
to the shape a tensor already has, and multiplications by 1 (the Llama family's
embedding and residual multipliers, 1.0 outside Granite). A method call counts as a
no-op when its output has its input's dtype, shape, strides and device, which the
fake tensors Dynamo recorded on each node tell, for the symbolic T as well.
"""

from __future__ import annotations

import operator
import sys

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxllm.passes.graph_pass import example_value, source_uuid

# Methods that return their input itself (or an identical view of it) when nothing changes.
_SAME_OR_ALIAS_METHODS = {"float", "to", "contiguous", "view", "reshape"}
_MULTIPLY = (operator.mul, torch.mul)
_IN_PLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv)


class NoOpElimination:
    name = "noop_elimination"

    def uuid(self) -> str:
        return source_uuid(sys.modules[__name__])

    def __call__(self, graph: fx.Graph) -> int:
        removed = 0
        for node in list(graph.nodes):
            source = _noop_source(node)
            if source is not None:
                node.replace_all_uses_with(source)
                graph.erase_node(node)
                removed += 1
        return removed


def _noop_source(node: fx.Node) -> fx.Node | None:
    """The node whose value ``node`` equals, if ``node`` is a no-op."""
    if node.op == "call_method" and node.target in _SAME_OR_ALIAS_METHODS:
        source = node.args[0]
        if node.kwargs.get("copy") or not _same_tensor_layout(source, node):
            return None
        return source
    if node.op == "call_function" and node.target in _MULTIPLY and len(node.args) == 2:
        # x * 1 is a new tensor equal to x: the same unless something writes into one of them.
        left, right = node.args
        for source, factor in ((left, right), (right, left)):
            if _is_one(factor) and _same_tensor_layout(source, node) and not _mutated(source) and not _mutated(node):
                return source
    return None


def _is_one(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 1


def _same_tensor_layout(source: object, node: fx.Node) -> bool:
    if not isinstance(source, fx.Node):
        return False
    before, after = example_value(source), example_value(node)
    if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)):
        return False
    return (
        before.dtype == after.dtype
        and before.device == after.device
        and _statically_equal(before.shape, after.shape)
        and _statically_equal(before.stride(), after.stride())
    )


def _statically_equal(left: tuple, right: tuple) -> bool:
    return len(left) == len(right) and all(statically_known_true(a == b) for a, b in zip(left, right))


def _mutated(node: fx.Node) -> bool:
    """Whether some user may write into ``node``'s tensor (an in-place method or a mutating op)."""
    for user in node.users:
        if user.op == "call_method" and str(user.target).endswith("_"):
            return True
        if user.op == "call_function":
            target = user.target
            if target in _IN_PLACE_OPERATORS:
                return True
            overloads = (
                [getattr(target, name) for name in target.overloads()]
                if isinstance(target, torch._ops.OpOverloadPacket)
                else [target]
            )
            if any(isinstance(op, torch._ops.OpOverload) and op._schema.is_mutable for op in overloads):
                return True
    return False
