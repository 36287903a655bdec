"""The compiler: capture -> passes -> split -> compile pieces (see pipeline.py)."""

from fxllm.compiler.pipeline import CompiledModel, compile_model
from fxllm.compiler.report import CompileReport

__all__ = ["compile_model", "CompiledModel", "CompileReport"]
