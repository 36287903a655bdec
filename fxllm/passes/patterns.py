"""Matchers shared by the fusion passes, on the graph Dynamo captured (torch functions and
Tensor methods, before decomposition)."""

from __future__ import annotations

import operator

import torch
from torch import fx

from fxllm.passes.graph_pass import example_value


def is_call(node: object, target: object) -> bool:
    """Whether ``node`` calls ``target``: a function, or a Tensor method given by name."""
    if not isinstance(node, fx.Node):
        return False
    if isinstance(target, str):
        return node.op == "call_method" and node.target == target
    return node.op == "call_function" and node.target is target


def match_rms_norm(node: fx.Node) -> tuple[fx.Node, fx.Node, float, tuple[fx.Node, ...]] | None:
    """``weight * (x * rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)``, x = source.float()
    -> (source, weight, eps, nodes); the two casts may be absent."""
    if not is_call(node, operator.mul):
        return None
    weight, cast_back = node.args
    scaled = _skip_casts(cast_back)
    if not is_call(scaled, operator.mul):
        return None
    upcast, rstd = scaled.args
    if not is_call(rstd, torch.rsqrt):
        return None
    shifted = rstd.args[0]
    if not (is_call(shifted, operator.add) and isinstance(shifted.args[1], float)):
        return None
    mean = shifted.args[0]
    if not (is_call(mean, "mean") and mean.args[1:] == (-1,) and mean.kwargs == {"keepdim": True}):
        return None
    square = mean.args[0]
    if not (is_call(square, "pow") and square.args[1:] == (2,) and square.args[0] is upcast):
        return None
    source = _skip_casts(upcast)
    # The op computes in fp32 and rounds to the input dtype where the norm casts back.
    if dtype_of(square) != torch.float32 or dtype_of(cast_back) != dtype_of(source):
        return None
    casts = _casts_between(cast_back, scaled) + _casts_between(upcast, source)
    return source, weight, shifted.args[1], (node, scaled, rstd, shifted, mean, square) + casts


def dtype_of(node: fx.Node) -> torch.dtype | None:
    value = example_value(node)
    return value.dtype if isinstance(value, torch.Tensor) else None


def _is_cast(node: object) -> bool:
    return is_call(node, "float") or (
        is_call(node, "to") and len(node.args) == 2 and isinstance(node.args[1], torch.dtype) and not node.kwargs
    )


def _skip_casts(node: object) -> object:
    while _is_cast(node):
        node = node.args[0]
    return node


def _casts_between(top: object, bottom: object) -> tuple[fx.Node, ...]:
    casts = []
    while top is not bottom:
        casts.append(top)
        top = top.args[0]
    return tuple(casts)
