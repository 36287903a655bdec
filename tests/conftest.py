from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Triton kernels run under the interpreter on CPU. Set before anything imports
    # triton: its knobs are read once, and a kernel module imported earlier by another
    # test would otherwise be compiled for a GPU that is not there.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.tiny_models import CONFIGS, save_tiny_model  # noqa: E402

ARCHITECTURES = sorted(CONFIGS)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: save_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def llama_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"]


def assert_all_blocks_free(llm) -> None:
    """Nothing left of an engine's requests: every KV block back in the pool, nothing queued."""
    cache = llm.llm_engine.kv_cache
    assert cache.num_free_blocks == cache.num_blocks
    assert all(count == 0 for count in cache.ref_counts)
    assert not llm.llm_engine.has_unfinished()
