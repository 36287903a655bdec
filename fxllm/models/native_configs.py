"""config.json of checkpoints whose config class is remote code (``auto_map``), read by fxllm.

InternLM2 and the original InternVL checkpoints ship their configuration classes as Python
files for transformers to import with ``trust_remote_code``. fxllm implements these
architectures itself, so it reads their config.json as plain data instead: no remote code runs,
nothing asks for permission, and ``trust_remote_code`` changes nothing. Nested configs of a type
transformers knows (an InternVL checkpoint's Qwen2, Phi-3 or Llama language model) become that
type's config class; the others stay plain ``PretrainedConfig`` objects with the file's fields.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# transformers' default base where a config names none.
DEFAULT_ROPE_THETA = 10000.0


def _sub_config(fields: dict[str, Any]) -> PretrainedConfig:
    model_type = fields.get("model_type")
    if model_type in CONFIG_MAPPING:
        return AutoConfig.for_model(**fields)
    return _plain(fields)


def _plain(fields: dict[str, Any]) -> PretrainedConfig:
    """The fields as they are, the older ``rope_scaling`` + ``rope_theta`` pair turned into the
    ``rope_parameters`` that transformers 5 configs (and fxllm's RoPE) read."""
    fields = dict(fields)
    scaling = fields.pop("rope_scaling", None) or {}
    if "rope_parameters" not in fields:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        fields["rope_parameters"] = {
            **{key: value for key, value in scaling.items() if key != "type"},
            "rope_type": rope_type,
            "rope_theta": fields.pop("rope_theta", DEFAULT_ROPE_THETA),
        }
    return PretrainedConfig(**fields)


def _internvl_chat(fields: dict[str, Any]) -> PretrainedConfig:
    """InternVLChatModel: ``llm_config`` and ``vision_config`` inside; the language model's config
    is also ``text_config``, where ``get_text_config()`` finds it."""
    fields = dict(fields)
    for name in ("llm_config", "vision_config"):
        if not isinstance(fields.get(name), dict):
            raise ValueError(f"an InternVLChatModel config.json needs a {name!r} object; this one has {fields.get(name)!r}")
    language = _sub_config(fields.pop("llm_config"))
    vision = PretrainedConfig(**fields.pop("vision_config"))
    return PretrainedConfig(**fields, llm_config=language, text_config=language, vision_config=vision)


# Architectures whose config.json fxllm reads itself -> how.
NATIVE_CONFIG_READERS: dict[str, Callable[[dict[str, Any]], PretrainedConfig]] = {
    "InternLM2ForCausalLM": _plain,
    "InternVLChatModel": _internvl_chat,
}


def read_native_config(model_dir: Path) -> PretrainedConfig | None:
    """The config of a checkpoint whose architecture is in ``NATIVE_CONFIG_READERS``; None for
    any other (transformers' AutoConfig reads those)."""
    path = model_dir / "config.json"
    try:
        fields = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"could not read {path}: {error}") from error
    architectures = fields.get("architectures") or []
    reader = next((NATIVE_CONFIG_READERS[name] for name in architectures if name in NATIVE_CONFIG_READERS), None)
    return None if reader is None else reader(fields)
