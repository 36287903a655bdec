"""Structured outputs: constraints compiled with xgrammar (compiler.py), a grammar matcher per
request (matcher.py), and each step's token bitmask of the constrained rows (bitmask.py)."""

from __future__ import annotations

from typing import Any


def import_xgrammar() -> Any:
    """xgrammar, imported on first use: an engine without constrained requests never needs it."""
    try:
        import xgrammar
    except ImportError as error:
        raise ImportError(
            "structured outputs need the xgrammar package: pip install xgrammar (or pip install 'fxllm[structured]')"
        ) from error
    return xgrammar
