"""JSON grammars whose whitespace follows a pattern (``whitespace_pattern``).

xgrammar writes a JSON schema's grammar with one whitespace class, ``[ \\n\\r\\t]*``,
wherever JSON allows whitespace. Here that class becomes a rule of its own, the
grammar xgrammar writes for the pattern (a regex) with its rules renamed apart.
Lookahead assertions keep the class: they only prune, and JSON whitespace is a
superset of any pattern's.
"""

from __future__ import annotations

import re

from fxllm.runtime.structured_outputs import import_xgrammar

# What xgrammar's JSON grammars allow between tokens (any_whitespace=True).
ANY_JSON_WHITESPACE = "[ \\n\\r\\t]*"
LOOKAHEAD_START = " (=("
RULE_PREFIX = "whitespace_"
_RULE_NAME = re.compile(r"\b(root\w*)")


def json_grammar_with_whitespace(schema: str, pattern: str) -> str:
    """EBNF of JSON under ``schema`` whose whitespace matches the regex ``pattern``."""
    xgr = import_xgrammar()
    json_grammar = str(xgr.Grammar.from_json_schema(schema, any_whitespace=True))
    whitespace_grammar = _renamed(str(xgr.Grammar.from_regex(pattern)))
    lines = []
    for line in json_grammar.splitlines():
        body, lookahead, rest = line.partition(LOOKAHEAD_START)
        lines.append(body.replace(ANY_JSON_WHITESPACE, f"{RULE_PREFIX}root") + lookahead + rest)
    return "\n".join(lines) + "\n" + whitespace_grammar


def _renamed(grammar: str) -> str:
    """``grammar`` with its rules (root, root_1, ...) renamed apart from the JSON grammar's:
    names outside string literals and character classes get the prefix."""
    out, chunk, index = [], [], 0
    while index < len(grammar):
        char = grammar[index]
        if char in "\"[":
            out.append(_RULE_NAME.sub(RULE_PREFIX + r"\1", "".join(chunk)))
            chunk = []
            end = _literal_end(grammar, index, '"' if char == '"' else "]")
            out.append(grammar[index:end])
            index = end
            continue
        chunk.append(char)
        index += 1
    out.append(_RULE_NAME.sub(RULE_PREFIX + r"\1", "".join(chunk)))
    return "".join(out)


def _literal_end(text: str, start: int, closing: str) -> int:
    """Just past the literal or class opened at ``start`` (backslash escapes skipped)."""
    index = start + 1
    while index < len(text) and text[index] != closing:
        index += 2 if text[index] == "\\" else 1
    return index + 1
