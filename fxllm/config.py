"""Engine configuration: typed, frozen dataclasses built and validated once.

This is the only module that reads environment variables; the documented
``FXLLM_*`` names live in ``ENVIRONMENT_VARIABLES`` below and in the README.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ENVIRONMENT_VARIABLES: dict[str, str] = {
    "FXLLM_CACHE_DIR": "where fxllm keeps the converted default model and other caches "
    "(default: $XDG_CACHE_HOME/fxllm or ~/.cache/fxllm)",
    "FXLLM_CPU_KVCACHE_SPACE": "GiB of memory for the KV cache on CPU (default 4; fractions allowed)",
}

DEFAULT_CPU_KVCACHE_SPACE_GIB = 4.0


def fxllm_cache_dir() -> Path:
    """The root of fxllm's on-disk caches (``FXLLM_CACHE_DIR``)."""
    explicit = os.environ.get("FXLLM_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fxllm"


def cpu_kvcache_space_bytes() -> int:
    """Bytes of KV cache on CPU, from ``FXLLM_CPU_KVCACHE_SPACE`` (GiB)."""
    raw = os.environ.get("FXLLM_CPU_KVCACHE_SPACE")
    if raw is None or raw.strip() == "":
        gib = DEFAULT_CPU_KVCACHE_SPACE_GIB
    else:
        try:
            gib = float(raw)
        except ValueError:
            raise ValueError(
                f"FXLLM_CPU_KVCACHE_SPACE must be a number of GiB (e.g. 4 or 0.5), got {raw!r}"
            ) from None
        if gib <= 0:
            raise ValueError(f"FXLLM_CPU_KVCACHE_SPACE must be > 0 GiB, got {raw!r}")
    return int(gib * (1 << 30))


# Defaults (vLLM's where it has one).
DEFAULT_BLOCK_SIZE = 16
DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_MAX_NUM_BATCHED_TOKENS_GPU = 8192
# Smaller steps on CPU keep prefill chunks' attention temporaries small.
DEFAULT_MAX_NUM_BATCHED_TOKENS_CPU = 2048
# config.json keys that may hold a model's maximum context, in priority order.
_MAX_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class ModelConfig:
    model: str  # local HF-style directory
    tokenizer: str
    architecture: str
    dtype: torch.dtype
    max_model_len: int
    hf_config: Any = field(compare=False, hash=False, repr=False)  # transformers PretrainedConfig
    generation_config: dict = field(compare=False, hash=False, repr=False)  # raw generation_config.json
    eos_token_ids: tuple[int, ...] = ()

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = DEFAULT_BLOCK_SIZE
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    cpu_kvcache_space_bytes: int = int(DEFAULT_CPU_KVCACHE_SPACE_GIB * (1 << 30))


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS_GPU
    max_model_len: int = 0


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    device: torch.device
    seed: int = 0
    enforce_eager: bool = False


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available; use device='cpu' or 'auto'")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, hf_config: Any, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU (half precision is slow there and changes numerics);
    on GPU the checkpoint's dtype, or bfloat16 for a float32 checkpoint (as vLLM)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
        return dtype
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    config_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(config_dtype, str):
        config_dtype = _DTYPES.get(config_dtype)
    if config_dtype in (torch.float16, torch.bfloat16):
        return config_dtype
    return torch.bfloat16


def derive_max_model_len(hf_config: Any, requested: int | None) -> int:
    limit = next((getattr(hf_config, k) for k in _MAX_LENGTH_KEYS if getattr(hf_config, k, None)), None)
    if requested is None:
        if limit is None:
            raise ValueError("the model config names no maximum length; pass max_model_len=...")
        return int(limit)
    if not isinstance(requested, int) or isinstance(requested, bool) or requested < 2:
        raise ValueError(f"max_model_len must be an int >= 2, got {requested!r}")
    if limit is not None and requested > limit:
        raise ValueError(
            f"max_model_len={requested} is larger than the model's maximum length {limit} "
            f"(config.json); pass max_model_len <= {limit}"
        )
    return requested
