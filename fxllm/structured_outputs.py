"""What a request's output must look like: vLLM's ``StructuredOutputsParams``.

One constraint per request (a JSON schema, a regex, a list of choices, an EBNF grammar,
any JSON object, or a structural tag) plus vLLM's formatting options. The constraint is
compiled against the tokenizer's vocabulary when the request is submitted
(runtime/structured_outputs/); a compiled constraint masks each sampling step's logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fxllm.validation import check_bool

# The constraint fields: a request sets exactly one.
CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
# Per-request backends of vLLM's older GuidedDecodingParams that mean xgrammar here.
XGRAMMAR_BACKENDS = (None, "auto", "xgrammar")


@dataclass
class StructuredOutputsParams:
    """Constrains a request's output (``SamplingParams(structured_outputs=...)``).

    ``json`` is a JSON schema (a dict, or its text: a pydantic model's
    ``model_json_schema()`` works); ``regex`` a regular expression the whole output
    matches; ``choice`` strings the output equals one of; ``grammar`` an EBNF (GBNF)
    grammar as xgrammar reads it; ``json_object=True`` any JSON object;
    ``structural_tag`` xgrammar's structural tag, as JSON text."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # JSON without whitespace between its tokens (xgrammar's any_whitespace=False).
    disable_any_whitespace: bool = False
    # Properties a schema does not name are never generated: xgrammar's strict mode always
    # holds, so True changes nothing and False keeps it (as vLLM's xgrammar backend does).
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None  # a regex for the whitespace JSON may hold between its tokens
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def kind(self) -> str:
        """The constraint's field name: "json", "regex", ..."""
        return next(name for name in CONSTRAINTS if getattr(self, name) is not None)

    @property
    def spec(self) -> Any:
        return getattr(self, self.kind)

    def validate(self) -> None:
        """Exactly one constraint, each field of its type (checked again at submission)."""
        given = [name for name in CONSTRAINTS if getattr(self, name) is not None]
        if len(given) != 1:
            found = f"got {', '.join(given)}" if given else "got none"
            raise ValueError(f"structured outputs take exactly one of {', '.join(CONSTRAINTS)}: {found}")
        for name in ("regex", "grammar", "structural_tag", "whitespace_pattern"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"structured outputs: {name} must be a string, got {type(value).__name__}")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise TypeError(
                f"structured outputs: json must be a JSON schema as a dict or a string (a pydantic model's "
                f"model_json_schema()), got {type(self.json).__name__}"
            )
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not all(isinstance(c, str) for c in self.choice):
                raise TypeError(f"structured outputs: choice must be a list of strings, got {self.choice!r}")
            if not self.choice:
                raise ValueError("structured outputs: choice must hold at least one string")
        if self.json_object is not None and self.json_object is not True:
            raise ValueError(f"structured outputs: json_object must be True (any JSON object) or None, got {self.json_object!r}")
        for name in ("disable_any_whitespace", "disable_additional_properties"):
            check_bool(f"structured outputs: {name}", getattr(self, name))
        if self.whitespace_pattern is not None and self.json is None and self.json_object is None:
            raise ValueError("structured outputs: whitespace_pattern applies to JSON (json or json_object) only")
        if self.whitespace_pattern is not None and self.disable_any_whitespace:
            raise ValueError("structured outputs: whitespace_pattern and disable_any_whitespace contradict each other: pass one")


@dataclass
class GuidedDecodingParams(StructuredOutputsParams):
    """vLLM's older name (``SamplingParams(guided_decoding=...)``), with its per-request backend."""

    backend: str | None = None
    disable_fallback: bool = False  # no fallback to another backend: fxllm has none

    def validate(self) -> None:
        super().validate()
        if self.backend not in XGRAMMAR_BACKENDS:
            raise ValueError(
                f"guided decoding backend {self.backend!r} is not supported: fxllm runs structured outputs on "
                f"xgrammar ('auto' or 'xgrammar')"
            )
        check_bool("structured outputs: disable_fallback", self.disable_fallback)
