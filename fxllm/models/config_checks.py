"""Sizes in a model's config.json (after ``hf_overrides``) that no model can be built from,
caught before anything is built, with the field named."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fxllm.validation import is_int

# Sizes that must be positive ints wherever a config has them.
POSITIVE_SIZES = (
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "intermediate_size",
    "vocab_size", "max_position_embeddings", "head_dim", "n_layer", "n_head", "n_embd", "n_positions",
)
POSITIVE_NUMBERS = ("rope_theta",)


def check_model_config(hf_config: Any, model_dir: Path) -> None:
    source = f"{model_dir / 'config.json'} (with hf_overrides)"
    configs = [hf_config]
    text_config = hf_config.get_text_config()
    if text_config is not hf_config:
        configs.append(text_config)
    for config in configs:
        for name in POSITIVE_SIZES:
            value = getattr(config, name, None)
            if value is None:
                continue
            if not is_int(value) or value < 1:
                raise ValueError(f"{source}: {name} must be a positive int, got {value!r}")
        for name in POSITIVE_NUMBERS:
            value = _rope_number(config, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{source}: {name} must be a positive number, got {value!r}")


def _rope_number(config: Any, name: str) -> Any:
    """``rope_theta`` sits on the config or (transformers 5) inside ``rope_parameters``."""
    value = getattr(config, name, None)
    if value is None and isinstance(getattr(config, "rope_parameters", None), dict):
        value = config.rope_parameters.get(name)
    return value
