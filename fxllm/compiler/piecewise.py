"""Stage 3: compile each compute piece with Inductor, for the symbolic T and for fixed sizes.

Identical pieces (the same layer code with other weights) share one compiled
artifact: pieces are keyed by their structure and input metadata, not by node
names. Artifacts come from the on-disk cache when present.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch
from torch import fx, nn

from fxllm.compiler.cache import CompileCache
from fxllm.compiler.split import op_name


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"T{tuple(str(s) for s in value.shape)}{tuple(str(s) for s in value.stride())}{value.dtype}{value.device.type}"
    if isinstance(value, torch.SymInt):
        return "symint"
    return repr(value)


def piece_key(module: fx.GraphModule, example_inputs: list[Any], size: int | None) -> str:
    """A key equal for pieces that compute the same thing on inputs of the same metadata."""
    index: dict[fx.Node, int] = {}
    lines = [f"size={size}"] + [_describe(value) for value in example_inputs]
    for position, node in enumerate(module.graph.nodes):
        index[node] = position
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: f"%{index[n]}")
        target = op_name(node) if node.op in ("call_function", "call_method") else node.op
        lines.append(f"{node.op} {target} {args}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:32]


def size_of(value: Any) -> int:
    return value if isinstance(value, int) else value.shape[0]


def find_size_argument(example_inputs: list[Any]) -> int | None:
    """Index of an input that carries T: a SymInt, or a tensor whose dim 0 is symbolic."""
    for position, value in enumerate(example_inputs):
        if isinstance(value, torch.SymInt):
            return position
        if isinstance(value, torch.Tensor) and value.dim() > 0 and isinstance(value.shape[0], torch.SymInt):
            return position
    return None


class SizeDispatch(nn.Module):
    """Runs the artifact compiled for this step's T if there is one, else the dynamic one.

    A module, so it can replace its piece in the split graph."""

    def __init__(self, dynamic: Callable[..., Any], size_argument: int | None, single_output: bool):
        super().__init__()
        self.dynamic = dynamic
        self.size_argument = size_argument
        self.by_size: dict[int, Callable[..., Any]] = {}
        self.single_output = single_output

    def forward(self, *args: Any) -> Any:
        compiled = self.dynamic
        if self.by_size and self.size_argument is not None:
            compiled = self.by_size.get(size_of(args[self.size_argument]), self.dynamic)
        result = compiled(*args)
        # Artifacts loaded from disk return a list even for a piece with one output.
        if self.single_output and isinstance(result, (list, tuple)):
            return result[0]
        return result


def returns_single_value(module: fx.GraphModule) -> bool:
    return not isinstance(module.graph.output_node().args[0], (tuple, list))


class PieceCompiler:
    """Compiles pieces with Inductor's standalone compile, de-duplicated and cached on disk."""

    def __init__(self, cache: CompileCache | None):
        self.cache = cache
        self.artifacts: dict[str, Callable[..., Any]] = {}
        self.inductor_compiles = 0
        self.loaded = 0

    def compile(self, module: fx.GraphModule, example_inputs: list[Any], size: int | None) -> Callable[..., Any]:
        key = piece_key(module, example_inputs, size)
        if key in self.artifacts:
            return self.artifacts[key]
        artifact = self.cache.load(key) if self.cache is not None else None
        if artifact is not None:
            self.loaded += 1
        else:
            from torch._inductor import standalone_compile

            shapes = "from_graph" if size is None else "from_example_inputs"
            artifact = standalone_compile(module, example_inputs, dynamic_shapes=shapes)
            self.inductor_compiles += 1
            if self.cache is not None:
                self.cache.save(key, artifact)
        self.artifacts[key] = artifact
        return artifact
