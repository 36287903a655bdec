"""vLLM's ``FlexibleArgumentParser``: flags may be spelled with dashes or underscores."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence


class FlexibleArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that reads ``--max_model_len 8`` as ``--max-model-len 8`` and
    ``--flag=value`` either way, as scripts written for vLLM pass them."""

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        return super().parse_args(_dashed(sys.argv[1:] if args is None else args), namespace)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        return super().parse_known_args(_dashed(sys.argv[1:] if args is None else args), namespace)


def _dashed(args: Sequence[str]) -> list[str]:
    dashed = []
    for arg in args:
        if arg.startswith("--"):
            name, equals, value = arg.partition("=")
            arg = name.replace("_", "-") + equals + value
        dashed.append(arg)
    return dashed
