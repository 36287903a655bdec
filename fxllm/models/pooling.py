"""What a checkpoint says about pooling: its sentence-transformers files, else vLLM's defaults.

A sentence-transformers directory lists its modules in ``modules.json`` (Transformer,
Pooling, optionally Normalize); the Pooling module's ``config.json`` names the mode, and
``sentence_bert_config.json`` the maximum sequence length.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fxllm.config import PoolerConfig
from fxllm.models.registry import POOLING_ONLY_ARCHITECTURES

MODULES_FILE = "modules.json"
DEFAULT_POOLING_DIR = "1_Pooling"
SENTENCE_BERT_CONFIG = "sentence_bert_config.json"
_POOLING_MODULE = "sentence_transformers.models.Pooling"
_NORMALIZE_MODULE = "sentence_transformers.models.Normalize"
# The Pooling module's flags fxllm implements, and the pooling type each means.
_POOLING_MODES = {"pooling_mode_mean_tokens": "MEAN", "pooling_mode_cls_token": "CLS", "pooling_mode_lasttoken": "LAST"}
# Without sentence-transformers files (vLLM's defaults): encoders pool [CLS], decoders
# their last token; embeddings are normalized.
_ENCODER_POOLING_TYPE = "CLS"
_DECODER_POOLING_TYPE = "LAST"


def is_sentence_transformers_dir(model_dir: Path) -> bool:
    return (model_dir / MODULES_FILE).is_file() or (model_dir / DEFAULT_POOLING_DIR).is_dir()


def is_pooling_checkpoint(model_dir: Path, architecture: str) -> bool:
    return architecture in POOLING_ONLY_ARCHITECTURES or is_sentence_transformers_dir(model_dir)


def sentence_max_seq_length(model_dir: Path) -> int | None:
    """``max_seq_length`` of sentence_bert_config.json, where the directory has one."""
    value = _read_json(model_dir / SENTENCE_BERT_CONFIG, default={}).get("max_seq_length")
    return value if isinstance(value, int) and value > 0 else None


def resolve_pooler_config(model_dir: Path, architecture: str, override: PoolerConfig) -> PoolerConfig:
    """``override``'s settings where set, else the model's own, else vLLM's defaults."""
    modules = _read_json(model_dir / MODULES_FILE, default=[])
    pooling_type = override.pooling_type or _pooling_type_from_files(model_dir, modules)
    if pooling_type is None:
        pooling_type = _ENCODER_POOLING_TYPE if architecture in POOLING_ONLY_ARCHITECTURES else _DECODER_POOLING_TYPE
    normalize = override.normalize
    if normalize is None:
        # A sentence-transformers model normalizes only if it lists a Normalize module.
        normalize = any(m.get("type") == _NORMALIZE_MODULE for m in modules) if modules else True
    return PoolerConfig(pooling_type, normalize)


def _pooling_type_from_files(model_dir: Path, modules: list[dict[str, Any]]) -> str | None:
    folder = next((m.get("path") for m in modules if m.get("type") == _POOLING_MODULE), DEFAULT_POOLING_DIR)
    file = model_dir / folder / "config.json"
    settings = _read_json(file, default={})
    if not settings:
        return None
    enabled = sorted(key for key, value in settings.items() if key.startswith("pooling_mode_") and value is True)
    if len(enabled) != 1 or enabled[0] not in _POOLING_MODES:
        raise ValueError(
            f"{file} asks for pooling mode(s) {', '.join(enabled) or 'none'}; fxllm pools with exactly one of "
            f"{', '.join(sorted(_POOLING_MODES))}. Pass override_pooler_config={{'pooling_type': 'MEAN'}} "
            f"(or 'CLS', 'LAST') to choose one"
        )
    return _POOLING_MODES[enabled[0]]


def _read_json(file: Path, default: Any) -> Any:
    if not file.is_file():
        return default
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON ({error}); fix or remove it") from None
