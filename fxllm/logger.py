"""vLLM's ``init_logger``: a module's logger under the package's."""

from __future__ import annotations

import logging


def init_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
