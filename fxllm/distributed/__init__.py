"""vLLM's ``cleanup_dist_env_and_memory``: free what an engine left behind before the next."""

from __future__ import annotations

import gc

import torch


def cleanup_dist_env_and_memory(shutdown_ray: bool = False) -> None:
    """Destroy a leftover default process group, collect garbage and empty the CUDA cache.
    (fxllm engines release their own process groups; a script may still have one.)"""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    gc.collect()
    if torch.cuda.device_count() > 0 and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
