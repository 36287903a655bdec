"""Engine arguments, as ``LLM(...)`` takes them, resolved once into an ``EngineConfig``.

Every argument is checked here, before anything is loaded onto a device: a bad value is
an error that names the argument. ``EngineArgs`` keeps vLLM's names and defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fxllm.config import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_MAX_NUM_BATCHED_TOKENS_CPU,
    DEFAULT_MAX_NUM_BATCHED_TOKENS_GPU,
    DEFAULT_MAX_LOGPROBS,
    DEFAULT_MAX_NUM_SEQS,
    LOAD_FORMATS,
    CacheConfig,
    CompilationConfig,
    CUDAGraphMode,
    EngineConfig,
    ModelConfig,
    MultiModalConfig,
    ParallelConfig,
    PoolerConfig,
    SchedulerConfig,
    cpu_kvcache_space_bytes,
    derive_max_model_len,
    mm_input_cache_bytes,
    resolve_async_scheduling,
    resolve_device,
    resolve_dtype,
    resolve_runner_type,
    worker_multiproc_method,
)
from fxllm.models.loader import load_generation_config, load_hf_config, resolve_model_dir
from fxllm.models.pooling import is_pooling_checkpoint, resolve_pooler_config, sentence_max_seq_length
from fxllm.models.quantization import quantization_method as resolve_quantization_method
from fxllm.models.registry import MULTIMODAL_ARCHITECTURES, POOLING_ONLY_ARCHITECTURES, resolve_architecture
from fxllm.runtime.executor.multiproc import check_tensor_parallel_support


@dataclass
class EngineArgs:
    """The arguments of ``LLM(...)`` (vLLM's names and defaults)."""

    model: str | None = None
    tokenizer: str | None = None
    dtype: str | torch.dtype = "auto"
    seed: int = 0
    max_model_len: int | None = None
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    block_size: int = DEFAULT_BLOCK_SIZE
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    hf_overrides: Any = None
    generation_config: str = "auto"
    device: str | torch.device = "auto"
    tensor_parallel_size: int = 1
    disable_custom_all_reduce: bool = False
    load_format: str = "auto"
    quantization: str | None = None
    compilation_config: CompilationConfig | dict | int | None = None
    runner: str = "auto"
    task: str | None = None
    override_pooler_config: PoolerConfig | dict | None = None
    limit_mm_per_prompt: dict[str, int] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    async_scheduling: bool | None = None
    max_logprobs: int = DEFAULT_MAX_LOGPROBS

    def create_engine_config(self) -> EngineConfig:
        """Check every argument, read the checkpoint's configs and resolve the engine's settings."""
        self._check_scalars()
        compilation = CompilationConfig.from_user(self.compilation_config)
        model_dir = resolve_model_dir(self.model)
        hf_config = load_hf_config(model_dir, self.hf_overrides)
        quantization = resolve_quantization_method(self.quantization, hf_config)
        architecture, model_class = resolve_architecture(
            getattr(hf_config, "architectures", None), f"{model_dir}/config.json"
        )
        device = resolve_device(self.device)
        runner_type = resolve_runner_type(self.runner, self.task, is_pooling_checkpoint(model_dir, architecture))
        multimodal = _multimodal_config(architecture, runner_type, self.limit_mm_per_prompt, self.mm_processor_kwargs)
        takes_embeds = model_class.takes_inputs_embeds
        if takes_embeds:
            # Image embeddings are merged into a fresh tensor each step, not a persistent buffer.
            compilation = replace(compilation, cudagraph_mode=CUDAGraphMode.NONE)
        pooler_config, sentence_max_len = self._pooler_config(model_dir, architecture, runner_type)
        text_config = hf_config.get_text_config()  # a vision-language config's language-model part
        max_model_len = derive_max_model_len(text_config, self.max_model_len, sentence_max_len)
        model_config = ModelConfig(
            model=str(model_dir),
            tokenizer=str(self.tokenizer or model_dir),
            architecture=architecture,
            dtype=resolve_dtype(self.dtype, hf_config, device),
            max_model_len=max_model_len,
            hf_config=hf_config,
            generation_config=load_generation_config(self.generation_config, model_dir),
            runner_type=runner_type,
            pooler_config=pooler_config,
            multimodal=multimodal,
            quantization=quantization,
            load_format=self.load_format,
            max_logprobs=self.max_logprobs,
        )
        max_num_seqs, max_num_batched_tokens = self._batch_limits(runner_type == "pooling", max_model_len, device)
        config = EngineConfig(
            model=model_config,
            cache=CacheConfig(
                block_size=self.block_size,
                gpu_memory_utilization=self.gpu_memory_utilization,
                num_gpu_blocks_override=self.num_gpu_blocks_override,
                enable_prefix_caching=self.enable_prefix_caching,
                cpu_kvcache_space_bytes=cpu_kvcache_space_bytes(),
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                async_scheduling=resolve_async_scheduling(self.async_scheduling, device, takes_embeds),
            ),
            device=device,
            compilation=compilation.eager() if self.enforce_eager else compilation,
            seed=self.seed,
            parallel=ParallelConfig(
                self.tensor_parallel_size, worker_multiproc_method(),
                disable_custom_all_reduce=bool(self.disable_custom_all_reduce),
            ),
        )
        if self.tensor_parallel_size > 1:
            check_tensor_parallel_support(config)  # before any worker starts
        return config

    def _check_scalars(self) -> None:
        _check_int("tensor_parallel_size", self.tensor_parallel_size, minimum=1)
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")
        _check_int("max_num_seqs", self.max_num_seqs, minimum=1)
        _check_int("block_size", self.block_size, minimum=1)
        _check_int("seed", self.seed, minimum=None)
        if self.max_num_batched_tokens is not None:
            _check_int("max_num_batched_tokens", self.max_num_batched_tokens, minimum=1)
        if self.num_gpu_blocks_override is not None:
            _check_int("num_gpu_blocks_override", self.num_gpu_blocks_override, minimum=1)
        utilization = self.gpu_memory_utilization
        if not isinstance(utilization, (int, float)) or not 0 < utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization!r}")

    def _pooler_config(
        self, model_dir: Path, architecture: str, runner_type: str
    ) -> tuple[PoolerConfig | None, int | None]:
        """A pooling model's pooler and sentence-transformers length limit; (None, None) otherwise."""
        if runner_type == "pooling":
            override = PoolerConfig.from_user(self.override_pooler_config)
            return resolve_pooler_config(model_dir, architecture, override), sentence_max_seq_length(model_dir)
        if architecture in POOLING_ONLY_ARCHITECTURES:
            raise ValueError(
                f"{architecture} is an encoder without an LM head: it cannot generate. Drop runner/task to use it "
                f"as a pooling model (embed, encode, score)"
            )
        if self.override_pooler_config is not None:
            raise ValueError(
                f"override_pooler_config applies to pooling models, but {model_dir} runs as a generative model: "
                f"pass runner='pooling' to pool with it, or drop override_pooler_config"
            )
        return None, None

    def _batch_limits(self, pooling: bool, max_model_len: int, device: torch.device) -> tuple[int, int]:
        """(max_num_seqs, max_num_batched_tokens), defaults filled in per device."""
        max_num_seqs, max_num_batched_tokens = self.max_num_seqs, self.max_num_batched_tokens
        if pooling and max_num_batched_tokens is not None and max_num_batched_tokens < max_model_len:
            raise ValueError(
                f"max_num_batched_tokens={max_num_batched_tokens} is below max_model_len={max_model_len}, but a "
                f"pooling model runs each prompt whole in one forward: raise max_num_batched_tokens or lower max_model_len"
            )
        if max_num_batched_tokens is None:
            on_cpu = device.type == "cpu"
            max_num_batched_tokens = DEFAULT_MAX_NUM_BATCHED_TOKENS_CPU if on_cpu else DEFAULT_MAX_NUM_BATCHED_TOKENS_GPU
            if pooling:
                max_num_batched_tokens = max(max_num_batched_tokens, max_model_len)
        # Each running request needs a token of budget a step.
        return min(max_num_seqs, max_num_batched_tokens), max_num_batched_tokens


def _multimodal_config(
    architecture: str, runner_type: str, limit_mm_per_prompt: dict | None, mm_processor_kwargs: dict | None
) -> MultiModalConfig | None:
    """The multimodal settings of a vision-language checkpoint; None for a text-only one."""
    if architecture not in MULTIMODAL_ARCHITECTURES:
        given = {"limit_mm_per_prompt": limit_mm_per_prompt, "mm_processor_kwargs": mm_processor_kwargs}
        named = [name for name, value in given.items() if value is not None]
        if named:
            raise ValueError(
                f"{' and '.join(named)} apply to vision-language models, but {architecture} is text-only: drop them"
            )
        return None
    if runner_type == "pooling":
        raise ValueError(
            f"{architecture} is a vision-language model, which fxllm runs generatively only: drop runner/task"
        )
    return MultiModalConfig.from_user(
        limit_mm_per_prompt, mm_processor_kwargs, mm_input_cache_bytes(), MULTIMODAL_ARCHITECTURES[architecture]
    )


def _check_int(name: str, value: Any, minimum: int | None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be an int{bound}, got {value!r}")
