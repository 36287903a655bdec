"""The tensor-parallel pass: collectives inserted into the captured graph of a TP-local model.

The model traced local shapes (``parallel.tp_config``) and holds only its weight
slices (``parallel.sharding``); what makes the ranks compute the single-device
result is here, in the graph (docs/ARCHITECTURE.md, contract 8):
- after each linear the architecture's plan (``parallel.plans``) makes row-parallel
  (Llama's o_proj and down_proj, GPT-2's c_proj, OPT's out_proj and fc2), and after each
  MoE layer (``fxllm::fused_moe``) whose stacked experts it splits: an all-reduce of the
  partial sums;
- the vocab-parallel embedding: ids outside this rank's shard are looked up as row 0
  and their rows zeroed, then an all-reduce assembles every token's embedding.
The logits shards are gathered where the logits are computed (``collectives.gather_logits``).
"""

from __future__ import annotations

import inspect
import operator

import torch
from torch import fx

from fxllm.models.moe import fused_moe  # noqa: F401  (registers fxllm::fused_moe)
from fxllm.models.quantization import fp8_gemm, int_gemm  # noqa: F401  (register the quantized linear ops)
from fxllm.parallel import collectives, plans, sharding
from fxllm.parallel.plans import Split
from fxllm.parallel.tp_config import TPLayout
from fxllm.passes.graph_pass import source_uuid

ALL_REDUCE = torch.ops.fxllm.all_reduce.default
# Linear layers whose weight is args[1]: plain, FP8 and integer (quantization="fp8" quantizes
# each rank's shard at load, pre-quantized ranks read theirs, so a row-parallel quantized
# output is a partial sum like any other).
_LINEARS = (
    torch._C._nn.linear,
    torch.ops.fxllm.fp8_linear.default,
    torch.ops.fxllm.int_weight_linear.default,
    torch.ops.fxllm.int8_linear.default,
)
FUSED_MOE = torch.ops.fxllm.fused_moe.default
_FUSED_MOE_W2_ARG = 3  # fused_moe(hidden, router_logits, w13, w2, top_k, renormalize)


def _is_call(node: fx.Node, *targets) -> bool:
    return node.op == "call_function" and node.target in targets


class TensorParallelPass:
    name = "tensor_parallel"

    def __init__(self, layout: TPLayout, parameter_names: dict[str, str]):
        """``parameter_names``: placeholder node name -> the model parameter it carries."""
        self.layout = layout
        self.parameter_names = parameter_names

    def uuid(self) -> str:
        # The graph differs per rank (the vocab shard's start is a constant in it).
        modules = source_uuid(inspect.getmodule(TensorParallelPass), sharding, plans, collectives)
        return f"{modules}-tp{self.layout.world_size}-rank{self.layout.rank}"

    def _split_of(self, weight: fx.Node) -> Split:
        return self.layout.plan.split_of(self.parameter_names.get(weight.name, ""))

    def __call__(self, graph: fx.Graph) -> int:
        matches = self._insert_collectives(graph)
        _fill_example_values(graph)
        return matches

    def _insert_collectives(self, graph: fx.Graph) -> int:
        matches = 0
        for node in list(graph.nodes):
            if _is_call(node, *_LINEARS) and self._split_of(node.args[1]) is Split.ROW:
                self._reduce_after(graph, node)
                matches += 1
            elif _is_call(node, FUSED_MOE) and self._split_of(node.args[_FUSED_MOE_W2_ARG]) is Split.ROW:
                self._reduce_after(graph, node)
                matches += 1
            elif _is_call(node, torch.nn.functional.embedding) and self._split_of(node.args[1]) is Split.VOCAB:
                self._vocab_parallel(graph, node)
                matches += 1
        return matches

    @staticmethod
    def _reduce_after(graph: fx.Graph, node: fx.Node) -> fx.Node:
        with graph.inserting_after(node):
            reduced = graph.call_function(ALL_REDUCE, (node,))
        node.replace_all_uses_with(reduced, delete_user_cb=lambda user: user is not reduced)
        return reduced

    def _vocab_parallel(self, graph: fx.Graph, embedding: fx.Node) -> None:
        ids = embedding.args[0]
        start, size = self.layout.vocab_start, self.layout.local_vocab
        with graph.inserting_before(embedding):
            local = graph.call_function(operator.sub, (ids, start))
            below = graph.call_function(torch.lt, (local, 0))
            above = graph.call_function(torch.ge, (local, size))
            outside = graph.call_function(torch.logical_or, (below, above))
            local_ids = graph.call_function(torch.masked_fill, (local, outside, 0))
            mask = graph.call_function(torch.unsqueeze, (outside, -1))
        embedding.replace_input_with(ids, local_ids)
        with graph.inserting_after(embedding):
            zeroed = graph.call_function(torch.masked_fill, (embedding, mask, 0.0))
        embedding.replace_all_uses_with(zeroed, delete_user_cb=lambda user: user is not zeroed)
        self._reduce_after(graph, zeroed)


def _fill_example_values(graph: fx.Graph) -> None:
    """Give the inserted nodes the fake values Dynamo's nodes carry (Inductor's cache needs
    them to see a node's output is a tensor), by running them on their inputs' fake values."""
    values = [node.meta.get("example_value") for node in graph.nodes]
    fake_mode = torch._guards.detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])
    with fake_mode:
        for node in graph.nodes:
            if node.op == "call_function" and "example_value" not in node.meta:
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["example_value"])
                node.meta["example_value"] = node.target(*args, **kwargs)


def placeholder_parameter_names(graph: fx.Graph, example_inputs: list, model: torch.nn.Module) -> dict[str, str]:
    """Map each placeholder that carries a parameter (by identity) to the parameter's name."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    return {
        node.name: names[id(value)] for node, value in zip(placeholders, example_inputs) if id(value) in names
    }
