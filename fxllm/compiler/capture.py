"""Stage 1: capture the model ONCE with Dynamo into an FX graph, and call it without Dynamo.

Dynamo caches compiled frames on the code object, which every instance of a model
class shares. So each engine traces a function with a code object of its own, and
afterwards calls the graph it got directly: no guard evaluation per step and no
way to recompile (docs/ARCHITECTURE.md, contract 4).

A model takes two tensors (contract 1): ``input_ids[T]`` (or ``inputs_embeds[T, H]``
for a vision-language model, whose images are merged in before the graph) and
``positions[T]`` (``[3, T]`` for M-RoPE). T is dim 0 of the first and the last dim of
the second.
"""

from __future__ import annotations

import itertools
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx, nn

_engine_ids = itertools.count()


@dataclass
class CapturedGraph:
    graph_module: fx.GraphModule
    example_inputs: list[Any]  # real tensors (parameters, buffers, the dummy step) and SymInts
    inputs_slot: int  # input_ids or inputs_embeds
    positions_slot: int
    size_slots: list[int]  # SymInt inputs: each equals T at run time


def mark_num_tokens_dynamic(inputs: torch.Tensor, positions: torch.Tensor) -> None:
    """Mark T dynamic without Dynamo's 0/1 specialization, so T=1 needs no other graph."""
    torch._dynamo.decorators.mark_unbacked(inputs, 0)
    torch._dynamo.decorators.mark_unbacked(positions, positions.dim() - 1)


def engine_local_forward(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The model's forward behind a code object that belongs to one engine (for torch.compile)."""

    def forward(inputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return model(inputs, positions)

    name = f"fxllm_engine_{next(_engine_ids)}_forward"
    code = forward.__code__.replace(co_name=name)
    return types.FunctionType(code, forward.__globals__, name, None, forward.__closure__)


def capture(model: nn.Module, inputs: torch.Tensor, positions: torch.Tensor) -> CapturedGraph:
    """Trace ``model(inputs, positions)`` once, T dynamic; the caller sets the forward context."""
    captured: list[tuple[fx.GraphModule, list[Any]]] = []

    def record(graph_module: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        captured.append((graph_module, list(example_inputs)))
        return graph_module.forward

    compiled = torch.compile(engine_local_forward(model), backend=record, fullgraph=True, dynamic=False)
    mark_num_tokens_dynamic(inputs, positions)
    compiled(inputs, positions)
    if len(captured) != 1:
        raise RuntimeError(f"expected one Dynamo graph for the model, got {len(captured)}")
    graph_module, example_inputs = captured[0]
    if len(graph_module.graph.output_node().args[0]) != 1:
        raise RuntimeError("the captured model must return one tensor (the hidden states)")
    slots = {id(t): i for i, t in enumerate(example_inputs)}
    return CapturedGraph(
        graph_module=graph_module,
        example_inputs=example_inputs,
        inputs_slot=slots[id(inputs)],
        positions_slot=slots[id(positions)],
        size_slots=[i for i, value in enumerate(example_inputs) if isinstance(value, torch.SymInt)],
    )


class DirectCall:
    """Calls a compiled graph with the captured parameters and this step's inputs."""

    def __init__(self, captured: CapturedGraph, compiled: Callable[..., Any]):
        self.compiled = compiled
        self.template = list(captured.example_inputs)
        self.inputs_slot = captured.inputs_slot
        self.positions_slot = captured.positions_slot
        self.size_slots = captured.size_slots

    def __call__(self, inputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        args = list(self.template)
        args[self.inputs_slot] = inputs
        args[self.positions_slot] = positions
        num_tokens = inputs.shape[0]
        for slot in self.size_slots:
            args[slot] = num_tokens
        return self.compiled(*args)[0]
