"""GGUF checkpoint -> Hugging Face-style model directory, cached on disk.

fxllm's model loader reads HF directories (config.json + safetensors + tokenizer
files). A GGUF file holds all of that in one quantized blob, so we convert it once:
transformers dequantizes the tensors, undoes llama.cpp's Q/K row permutation and
rebuilds the tokenizer (with the chat template) from the GGUF metadata; we then
write the pieces out as plain files. Weights are stored dequantized in float32.

The result lives under ``fxllm_cache_dir()/gguf/<key>``, where the key changes when
the source file (path, size, mtime) or this converter's output format changes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

from fxllm.config import fxllm_cache_dir

logger = logging.getLogger(__name__)

# Bump when the layout or content of the converted directory changes, so that
# directories written by an older fxllm are not reused.
CONVERTER_VERSION = 1

GGUF_MAGIC = b"GGUF"
# Header = magic (4 bytes) + little-endian uint32 format version. transformers' reader
# (the `gguf` package) handles versions 2 and 3; version 1 files predate the format's
# stabilisation and nothing current writes them.
GGUF_HEADER = struct.Struct("<4sI")
SUPPORTED_GGUF_VERSIONS = (2, 3)

CACHE_SUBDIR = "gguf"
KEY_HASH_CHARS = 16  # of the sha256 hex digest: plenty to avoid collisions in one cache
WEIGHTS_FILE = "model.safetensors"
CONVERTED_DIR_MODE = 0o755  # like any other cache directory; mkdtemp's 0o700 would hide it from others
CONVERTED_FILE_MODE = 0o644
TEMP_PREFIX = ".partial-"  # hidden, so a crashed conversion's leftovers are never mistaken for a model
STALE_PARTIAL_AGE_S = 24 * 3600  # far longer than any conversion takes

# Keys that AutoTokenizer.from_pretrained records in init_kwargs (and save_pretrained
# would persist) although they describe how we read the GGUF, not the tokenizer.
_LOAD_FLAGS = ("gguf_file", "local_files_only", "is_local")

# Files that every completed conversion contains (checked before the directory is published).
CONVERTED_FILES = ("config.json", WEIGHTS_FILE, "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def gguf_to_hf_dir(gguf_path: str | Path) -> Path:
    """The HF-style directory converted from ``gguf_path``, converting on first use.

    Raises ``FileNotFoundError`` when the file does not exist and ``ValueError`` when
    it is not a readable GGUF checkpoint (or one transformers cannot convert).
    """
    source = Path(gguf_path).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"GGUF file {str(gguf_path)!r} does not exist")
    if not source.is_file():
        raise ValueError(f"{str(gguf_path)!r} is not a GGUF file (it is a directory or a special file)")
    source = source.resolve()
    _check_header(source)

    target = fxllm_cache_dir() / CACHE_SUBDIR / _cache_key(source)
    if target.is_dir():
        return target  # only ever created by an atomic rename, so it is complete
    target.parent.mkdir(parents=True, exist_ok=True)

    _remove_stale_partials(target.parent)
    logger.info("converting %s to a Hugging Face directory at %s (one-time)", source, target)
    # A temp dir in the same parent makes the final rename atomic (same filesystem);
    # a killed conversion leaves only a hidden .partial-* directory behind.
    scratch = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=target.parent))
    try:
        scratch.chmod(CONVERTED_DIR_MODE)  # mkdtemp makes it owner-only
        _convert_into(source, scratch)
        missing = [name for name in CONVERTED_FILES if not (scratch / name).is_file()]
        if missing:
            raise RuntimeError(f"converting {source} wrote no {', '.join(missing)}; this is a bug in fxllm")
        try:
            os.rename(scratch, target)
        except OSError:
            # Another process finished the same conversion first: use theirs.
            if not target.is_dir():
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def _remove_stale_partials(cache: Path) -> None:
    """Delete scratch directories of conversions that were killed (each holds a full model).

    Only old ones: a recent one may belong to a conversion running in another process.
    """
    now = time.time()
    for partial in cache.glob(f"{TEMP_PREFIX}*"):
        try:
            if now - partial.stat().st_mtime > STALE_PARTIAL_AGE_S:
                shutil.rmtree(partial, ignore_errors=True)
        except OSError:
            pass  # removed concurrently


def _check_header(source: Path) -> None:
    """Reject non-GGUF files cheaply, before transformers spends seconds parsing them."""
    with open(source, "rb") as file:
        header = file.read(GGUF_HEADER.size)
    if len(header) < GGUF_HEADER.size or not header.startswith(GGUF_MAGIC):
        raise ValueError(f"{str(source)!r} is not a GGUF file (it does not start with the GGUF magic bytes)")
    _, version = GGUF_HEADER.unpack(header)
    if version not in SUPPORTED_GGUF_VERSIONS:
        raise ValueError(
            f"{str(source)!r} is GGUF format version {version}; fxllm reads versions "
            f"{', '.join(map(str, SUPPORTED_GGUF_VERSIONS))}"
        )


def _cache_key(source: Path) -> str:
    """Directory name for ``source``: changes whenever the file is replaced or edited."""
    stat = source.stat()
    identity = f"{CONVERTER_VERSION}\0{source}\0{stat.st_size}\0{stat.st_mtime_ns}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:KEY_HASH_CHARS]
    return f"{source.stem}-{digest}"


def _require(module: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"converting a GGUF checkpoint needs the {module!r} package ({why}): pip install {module}")


def _convert_into(source: Path, out_dir: Path) -> None:
    """Write config, weights, tokenizer and generation config for ``source`` into ``out_dir``."""
    # transformers imports these lazily and fails late with less helpful messages.
    _require("gguf", "it reads the file")
    _require("accelerate", "transformers refuses to load GGUF weights without it")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(source.parent), source.name
    # local_files_only: a local path must never turn into a Hugging Face Hub lookup.
    common: dict[str, Any] = {"gguf_file": name, "local_files_only": True}
    try:
        # The model load parses the metadata (config) and dequantizes every tensor;
        # it is the first full read of the file, so its failures mean "unreadable".
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **common)
        tokenizer = AutoTokenizer.from_pretrained(folder, **common)
    except (ImportError, MemoryError):
        raise  # a missing package or RAM is not the file's fault
    except Exception as error:  # the gguf reader and transformers raise many types here
        raise ValueError(
            f"{str(source)!r} is not a readable GGUF checkpoint that transformers can convert "
            f"({type(error).__name__}: {error})"
        ) from error

    config = model.config
    # transformers only fills `architectures` in model.save_pretrained, which it refuses
    # for GGUF-loaded models; fxllm's loader picks its model class from this field.
    config.architectures = [type(model).__name__]
    config.dtype = torch.float32
    # The weights we write are plain float32; a leftover GGUF quantization_config would
    # make transformers look for the .gguf file again when loading the directory.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out_dir)

    _save_weights(model, out_dir / WEIGHTS_FILE, tied=bool(getattr(config, "tie_word_embeddings", False)))

    # The GGUF tokenizer has no length limit (transformers puts a huge sentinel);
    # the model's context length is the honest one.
    context_length = getattr(config, "max_position_embeddings", None)
    if context_length:
        tokenizer.model_max_length = context_length
    for flag in _LOAD_FLAGS:
        tokenizer.init_kwargs.pop(flag, None)
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json,
    # which both old and new readers understand.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)

    # bos/eos/pad come from the GGUF's tokenizer.ggml.*_token_id fields via the config.
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=getattr(config, "pad_token_id", None),
    ).save_pretrained(out_dir)


def _save_weights(model: Any, path: Path, *, tied: bool) -> None:
    """Save the state dict as safetensors (transformers 5 refuses save_pretrained here)."""
    from safetensors.torch import save_file

    state = model.state_dict()
    if tied:
        # lm_head.weight is the embedding matrix itself; HF checkpoints omit it and
        # safetensors refuses tensors that share memory.
        for name in getattr(model, "_tied_weights_keys", None) or ["lm_head.weight"]:
            state.pop(name, None)
    tensors = {name: tensor.detach().contiguous() for name, tensor in state.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    path.chmod(CONVERTED_FILE_MODE)  # safetensors writes owner-only files
