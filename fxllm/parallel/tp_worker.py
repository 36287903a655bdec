"""What a tensor-parallel worker process runs, and what the engine checks before starting any.

Rank 0 (the LLM's process) schedules and samples; every other rank builds the same
runner on its shard, agrees on the KV-cache size, captures the same CUDA graphs,
then runs each step rank 0 sends until told to stop.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fxllm.config import CompilationLevel, EngineConfig
from fxllm.parallel.plans import plan_for
from fxllm.parallel.step_sync import SaveRequest
from fxllm.parallel.workers import WorkerGroup, WorkerLinks

if TYPE_CHECKING:
    from fxllm.runtime.runner import ModelRunner


def check_tensor_parallel_support(config: EngineConfig, pooling_or_multimodal: bool) -> None:
    size = config.parallel.tensor_parallel_size
    plan_for(config.model.architecture)  # a clear error for an architecture without a plan
    if pooling_or_multimodal:
        raise ValueError(
            f"tensor_parallel_size={size} is not supported yet for pooling or vision-language models; "
            f"use tensor_parallel_size=1"
        )
    if config.compilation.level == CompilationLevel.DYNAMO_AS_IS:
        raise ValueError(
            "tensor parallelism inserts its collectives into the captured graph, which compilation level 1 "
            "does not have: use level 0, 2 or 3"
        )
    if config.device.type == "cuda" and torch.cuda.device_count() < size:
        raise ValueError(
            f"tensor_parallel_size={size} needs {size} GPUs but {torch.cuda.device_count()} are visible; "
            f"set CUDA_VISIBLE_DEVICES or lower tensor_parallel_size"
        )


def run_tensor_parallel_worker(rank: int, world_size: int, links: WorkerLinks, config: EngineConfig) -> None:
    from fxllm.runtime.runner import ModelRunner

    if config.device.type == "cuda":
        torch.cuda.set_device(rank)
        config = replace(config, device=torch.device("cuda", rank))
    runner = ModelRunner(config, rank=rank, links=links)
    runner.allocate_kv_cache(runner.agree_num_blocks(runner.determine_num_blocks()))
    runner.capture_cudagraphs()
    runner.warm_up()
    with torch.inference_mode():  # the step buffers are inference tensors
        while (message := runner.step_sync.receive()) is not None:
            if isinstance(message, SaveRequest):
                runner.save_sharded_state(Path(message.path))
                runner.step_sync.barrier()
            else:
                runner.execute_received(message)
    runner.release_parallel_state()  # before the process group is destroyed


def stop_tensor_parallel(runner: "ModelRunner", workers: WorkerGroup) -> None:
    """Tell the workers to leave their loop, release rank 0's CUDA graphs (which hold its
    collectives) and one-shot all-reduce buffers, then destroy the process group and join
    the workers (``del llm`` and interpreter exit)."""
    try:
        runner.step_sync.send_stop()
    except Exception:  # a worker already gone: shut down what is left
        pass
    runner.release_parallel_state()
    workers.shutdown()
