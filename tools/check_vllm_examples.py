"""How many of vLLM's offline example scripts resolve in fxllm, checked statically.

A script counts when every name it imports from vllm exists under fxllm (helper modules
such as ``vllm.assets`` aside), every keyword it passes to ``LLM(...)`` is an engine
argument, every method it calls on an LLM exists and takes the keywords given, and the
keywords of the vLLM classes it builds (SamplingParams, EngineArgs, ...) are fields of
fxllm's. Nothing is run: it says whether a script would get past its imports and calls,
not whether its model is supported. Offline scripts are those under the examples tree
(online_serving/ aside) that use ``LLM``, ``LLMEngine`` or ``EngineArgs``.

    python tools/check_vllm_examples.py vllm-0.20.2/examples --top 20
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
from collections import Counter
from pathlib import Path
from typing import Any

# vllm modules that are helpers for the examples (downloading assets, ...), not the API.
HELPER_MODULES = ("vllm.assets", "vllm.utils.print_utils")
ENGINE_NAMES = {"LLM", "LLMEngine", "EngineArgs"}
SKIPPED_DIRECTORIES = {"online_serving"}


def fxllm_module(vllm_module: str) -> Any:
    try:
        return importlib.import_module("fxllm" + vllm_module[len("vllm"):])
    except ImportError:
        return None


def resolve(vllm_module: str, name: str | None) -> Any:
    """The fxllm object a ``from vllm.x import name`` refers to, or None."""
    module = fxllm_module(vllm_module)
    if module is None or name is None:
        return module
    if hasattr(module, name):
        return getattr(module, name)
    return fxllm_module(f"{vllm_module}.{name}")


def accepted_keywords(target: Any) -> set[str] | None:
    """The keywords a callable takes; None where it takes any (**kwargs)."""
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}


class ScriptCheck(ast.NodeVisitor):
    def __init__(self) -> None:
        self.missing: list[str] = []
        self.names: dict[str, Any] = {}  # local name -> fxllm object (or None when unresolved)
        self.llm_variables: set[str] = {"llm"}
        self.uses_engine = False

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == "vllm" or alias.name.startswith("vllm."):
                if not alias.name.startswith(HELPER_MODULES) and resolve(alias.name, None) is None:
                    self.missing.append(f"import {alias.name}")
                self.names[alias.asname or alias.name.split(".")[0]] = resolve(alias.name.split(".")[0], None)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level or not (module == "vllm" or module.startswith("vllm.")):
            return
        for alias in node.names:
            target = resolve(module, alias.name)
            if alias.name in ENGINE_NAMES:
                self.uses_engine = True
            if target is None and not module.startswith(HELPER_MODULES):
                self.missing.append(f"from {module} import {alias.name}")
            self.names[alias.asname or alias.name] = target

    def visit_Assign(self, node: ast.Assign) -> None:
        if isinstance(node.value, ast.Call) and _callee_name(node.value) in ("LLM", "from_engine_args"):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    self.llm_variables.add(target.id)
                elif isinstance(target, ast.Attribute):
                    self.llm_variables.add(target.attr)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        callee = node.func
        keywords = [k.arg for k in node.keywords if k.arg is not None]
        if isinstance(callee, ast.Name) and callee.id in self.names and self.names[callee.id] is not None:
            target = self.names[callee.id]
            if callee.id == "LLM":
                self._check_keywords("LLM", target, keywords, engine=True)
            elif inspect.isclass(target):
                self._check_keywords(callee.id, target, keywords)
        elif isinstance(callee, ast.Attribute) and _object_name(callee.value) in self.llm_variables:
            from fxllm import LLM

            method = getattr(LLM, callee.attr, None)
            if method is None:
                self.missing.append(f"LLM.{callee.attr}()")
            else:
                self._check_keywords(f"LLM.{callee.attr}", method, keywords)
        self.generic_visit(node)

    def _check_keywords(self, owner: str, target: Any, keywords: list[str], engine: bool = False) -> None:
        if engine:
            from fxllm.engine_arg_support import known_argument

            self.missing += [f"LLM({k}=...)" for k in keywords if not known_argument(k)]
            return
        accepted = accepted_keywords(target)
        if accepted is not None:
            self.missing += [f"{owner}({k}=...)" for k in keywords if k not in accepted]


def _callee_name(call: ast.Call) -> str:
    return call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", "")


def _object_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def check(script: Path) -> ScriptCheck | None:
    """The script's missing names, or None when it is not an offline script."""
    tree = ast.parse(script.read_text())
    checker = ScriptCheck()
    checker.visit(tree)
    return checker if checker.uses_engine else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("examples", type=Path, help="vLLM's examples/ directory (from its source distribution)")
    parser.add_argument("--top", type=int, default=20, help="missing items to list, most frequent first")
    parser.add_argument("--json", default="check_vllm_examples.json")
    args = parser.parse_args()
    results: dict[str, list[str]] = {}
    for script in sorted(args.examples.rglob("*.py")):
        if SKIPPED_DIRECTORIES & set(script.relative_to(args.examples).parts):
            continue
        checked = check(script)
        if checked is not None:
            results[str(script.relative_to(args.examples))] = sorted(set(checked.missing))
    resolving = [name for name, missing in results.items() if not missing]
    blockers = Counter(item for missing in results.values() for item in missing)
    print(f"{len(resolving)} of {len(results)} offline example scripts resolve in fxllm")
    print(f"\n{'scripts':>7}  missing")
    for item, count in blockers.most_common(args.top):
        print(f"{count:>7}  {item}")
    Path(args.json).write_text(json.dumps({"resolving": len(resolving), "scripts": len(results), "missing": results}, indent=2))


if __name__ == "__main__":
    main()
