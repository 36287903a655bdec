"""The on-disk compile cache: compiled pieces keyed by everything that changes their code.

A second process with the same key loads each piece instead of compiling it
(docs/ARCHITECTURE.md, contract 9). Entries are written atomically (a temporary file,
then a rename), so a killed process never leaves a half-written artifact; an entry
damaged anyway (a full disk, an edit) is discarded with a warning and compiled again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from pathlib import Path

import torch

from fxllm.config import EngineConfig

logger = logging.getLogger(__name__)

# Source files whose code ends up in the traced graph or decides how it is compiled.
_TRACED_PACKAGES = ("models", "attention", "compiler", "passes", "parallel")
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
ARTIFACT_FORMAT = "binary"


def device_kind(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm{major}{minor}-{torch.cuda.get_device_name(device)}"
    return f"cpu-{platform.machine()}-{torch.backends.cpu.get_cpu_capability()}"


def source_hash() -> str:
    digest = hashlib.sha256()
    for package in _TRACED_PACKAGES:
        for file in sorted((_PACKAGE_ROOT / package).rglob("*.py")):
            digest.update(str(file.relative_to(_PACKAGE_ROOT)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def engine_cache_key(config: EngineConfig, passes_uuid: str) -> str:
    model = config.model
    compilation = config.compilation
    fields = {
        "hf_config": model.hf_config.to_json_string(use_diff=False),
        "architecture": model.architecture,
        "dtype": str(model.dtype),
        "quantization": model.quantization,
        "max_model_len": model.max_model_len,  # sizes the RoPE table, a graph input
        "block_size": config.cache.block_size,
        "tensor_parallel_size": config.parallel.tensor_parallel_size,
        "level": int(compilation.level),
        "use_inductor": compilation.use_inductor,
        "splitting_ops": list(compilation.effective_splitting_ops),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "device": device_kind(config.device),
        "source": source_hash(),
        "passes": passes_uuid,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


class CompileCache:
    """Compiled Inductor artifacts under ``root/<engine key>/<piece key>.bin``."""

    def __init__(self, root: Path, engine_key: str):
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(
                f"the compile cache directory {root} is a file: pass compilation_config={{'cache_dir': ...}} (or "
                f"FXLLM_CACHE_DIR) naming a directory, or remove the file"
            )
        self.directory = root / engine_key

    def _path(self, piece_key: str) -> Path:
        return self.directory / f"{piece_key}.bin"

    def load(self, piece_key: str):
        path = self._path(piece_key)
        if not path.exists():
            return None
        from torch._inductor import CompiledArtifact

        try:
            return CompiledArtifact.load(path=str(path), format=ARTIFACT_FORMAT)
        except Exception as error:  # truncated, emptied or overwritten: compile it again
            logger.warning("discarding the damaged compile-cache entry %s (%s: %s)", path, type(error).__name__, error)
            path.unlink(missing_ok=True)
            return None

    def save(self, piece_key: str, artifact) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(piece_key)
        partial = path.with_suffix(f".partial-{os.getpid()}")
        artifact.save(path=str(partial), format=ARTIFACT_FORMAT)
        os.replace(partial, path)
