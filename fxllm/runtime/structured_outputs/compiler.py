"""Structured-output constraints compiled against the tokenizer's vocabulary, with xgrammar.

A constraint compiles once per engine (a cache keyed by the constraint and its
options); every request under it gets its own matcher (matcher.py). The vocabulary is
the model's: ids past the tokenizer's (padding of the embedding) are never allowed.
xgrammar is imported on the first constrained request.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

from fxllm.config import StructuredOutputsConfig
from fxllm.structured_outputs import StructuredOutputsParams
from fxllm.runtime.structured_outputs import import_xgrammar
from fxllm.runtime.structured_outputs.whitespace import json_grammar_with_whitespace

# Distinct constraints kept compiled; the least recently used is dropped past it.
MAX_CACHED_GRAMMARS = 256
# What json_object asks for (as vLLM): any JSON object.
ANY_JSON_OBJECT_SCHEMA = '{"type": "object"}'


class GrammarCompiler:
    """Compiles each request's constraint (``compile``), every distinct one once."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...], config: StructuredOutputsConfig):
        xgr = import_xgrammar()
        self.config = config
        # The EOS ids end a grammar (with each request's own stop tokens: matcher.py).
        tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(eos_token_ids) or None
        )
        # Our cache below keys on the constraint itself; xgrammar's would hold a second copy.
        self._compiler = xgr.GrammarCompiler(tokenizer_info, cache_enabled=False)
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self.num_compiled = 0  # constraints compiled (not served from the cache)

    def compile(self, params: StructuredOutputsParams, index: int) -> Any:
        """The compiled grammar of a request's constraint; a ValueError naming prompt ``index``
        when it does not compile."""
        params.validate()
        key = self._key(params, index)
        compiled = self._cache.get(key)
        if compiled is not None:
            self._cache.move_to_end(key)
            return compiled
        try:
            compiled = self._compile(key)
        except Exception as error:  # xgrammar raises RuntimeError, ValueError and its own types
            raise ValueError(
                f"prompt {index}: the structured outputs {params.kind} does not compile: {_first_line(error)}"
            ) from error
        self.num_compiled += 1
        self._cache[key] = compiled
        if len(self._cache) > MAX_CACHED_GRAMMARS:
            self._cache.popitem(last=False)
        return compiled

    def _key(self, params: StructuredOutputsParams, index: int) -> tuple:
        """The constraint in a hashable, canonical form, with the options that change its grammar."""
        spec = params.spec
        if params.kind == "json":
            spec = _schema_text(spec, index)
        elif params.kind == "choice":
            spec = tuple(spec)
        json_options = (self._any_whitespace(params), params.whitespace_pattern)
        return (params.kind, spec, json_options if params.kind in ("json", "json_object") else None)

    def _any_whitespace(self, params: StructuredOutputsParams) -> bool:
        return not (params.disable_any_whitespace or self.config.disable_any_whitespace)

    def _compile(self, key: tuple) -> Any:
        kind, spec, json_options = key
        compiler = self._compiler
        if kind in ("json", "json_object"):
            schema = spec if kind == "json" else ANY_JSON_OBJECT_SCHEMA
            any_whitespace, whitespace_pattern = json_options
            if whitespace_pattern is not None:
                return compiler.compile_grammar(json_grammar_with_whitespace(schema, whitespace_pattern))
            return compiler.compile_json_schema(schema, any_whitespace=any_whitespace)
        if kind == "regex":
            return compiler.compile_regex(spec)
        if kind == "choice":
            return compiler.compile_grammar(choice_grammar(spec))
        if kind == "grammar":
            return compiler.compile_grammar(spec)
        return self._compile_structural_tag(spec)

    def _compile_structural_tag(self, spec: str) -> Any:
        tag = json.loads(spec)
        if isinstance(tag, dict) and "structures" in tag:
            # The older form (vLLM's too): begin/schema/end items and the triggers that start them.
            xgr = import_xgrammar()
            items = [
                xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"])
                for s in tag["structures"]
            ]
            return self._compiler.compile_structural_tag(items, tag["triggers"])
        return self._compiler.compile_structural_tag(spec)


def choice_grammar(choices: tuple[str, ...]) -> str:
    """An EBNF grammar whose sentences are exactly ``choices``. A JSON string literal is an
    EBNF one with the same escapes."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


def _schema_text(schema: str | dict, index: int) -> str:
    """The schema as JSON text, its keys in their order (xgrammar generates properties in it)."""
    try:
        value = json.loads(schema) if isinstance(schema, str) else schema
        return json.dumps(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"prompt {index}: the structured outputs json is not a JSON schema: {error}") from error


def _first_line(error: Exception) -> str:
    """xgrammar's messages can carry a C++ trace after their first line."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
