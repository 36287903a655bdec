"""Imports flow one way, lowest layer first (docs/ARCHITECTURE.md): a module imports only from
its own layer and the layers below it. Lazy imports inside functions count; imports made only
for type checking (under ``if TYPE_CHECKING:``) do not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "fxllm"

# Lowest first. A module belongs to the layer of the longest prefix that names it; the
# package itself ("fxllm", its __init__) names only itself.
PACKAGE = "fxllm"
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("fxllm.config", "fxllm.sampling_params", "fxllm.outputs", "fxllm.utils", "fxllm.forward_context",
              "fxllm.inputs", "fxllm.hf_config", "fxllm.validation", "fxllm.metrics", "fxllm.lora", "fxllm.logger",
              "fxllm.multimodal", "fxllm.distributed", "fxllm.platforms", "fxllm.structured_outputs",
              "fxllm.v1.sample")),
    ("parallel layout", ("fxllm.parallel",)),
    ("models", ("fxllm.models", "fxllm.attention")),
    ("passes", ("fxllm.passes",)),
    ("compiler", ("fxllm.compiler",)),
    ("runtime", ("fxllm.runtime",)),
    ("API face", ("fxllm", "fxllm.llm", "fxllm.engine_args", "fxllm.engine_arg_support", "fxllm.vllm_engine_args",
                  "fxllm.beam_search", "fxllm.v1", "fxllm.engine", "fxllm.entrypoints")),
    ("CLI", ("fxllm.cli", "fxllm.inspection")),
]


def layer_of(module: str) -> int | None:
    best: tuple[int, int] | None = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            below = module.startswith(prefix + ".") and prefix != PACKAGE
            if (module == prefix or below) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    return None if best is None else best[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST) -> list[tuple[str, int]]:
    """(module, line) of every fxllm import outside ``if TYPE_CHECKING:`` blocks."""
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(inner) for inner in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
    return [(module, line) for module, line in found if module == "fxllm" or module.startswith("fxllm.")]


MODULES = sorted(PACKAGE_ROOT.rglob("*.py"))


def test_every_module_belongs_to_a_layer():
    assert [module_name(path) for path in MODULES if layer_of(module_name(path)) is None] == []


@pytest.mark.parametrize("path", MODULES, ids=lambda path: module_name(path))
def test_a_module_imports_only_its_own_layer_and_the_ones_below(path):
    module = module_name(path)
    own = layer_of(module)
    upward = [
        f"line {line}: {imported} ({LAYERS[layer_of(imported)][0]})"
        for imported, line in imported_modules(ast.parse(path.read_text()))
        if layer_of(imported) is not None and layer_of(imported) > own
    ]
    assert upward == [], f"{module} ({LAYERS[own][0]}) imports from layers above it"


def test_the_check_sees_lazy_imports_and_skips_type_only_ones():
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from fxllm.llm import LLM\n"
        "def f():\n    from fxllm.runtime.engine import LLMEngine\n"
    )
    assert imported_modules(ast.parse(source)) == [("fxllm.runtime.engine", 5)]
