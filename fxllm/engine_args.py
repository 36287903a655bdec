"""Engine arguments, as ``LLM(...)`` takes them, resolved once into an ``EngineConfig``.

``EngineArgs`` has every field of vLLM's ``EngineArgs`` with vLLM's defaults (the ones
fxllm does not act on are generated from ``vllm_engine_args.py``), so that
``LLM(**dataclasses.asdict(args))`` and example-style argument parsing work. Every argument
is checked here, before anything is loaded onto a device: a bad value is an error that
names the argument; a vLLM argument fxllm does not act on is accepted at its default,
warned about where it changes nothing here, and refused otherwise (engine_arg_support.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from fxllm.config import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_MAX_LOGPROBS,
    DEFAULT_MAX_NUM_BATCHED_TOKENS_CPU,
    DEFAULT_MAX_NUM_BATCHED_TOKENS_GPU,
    DEFAULT_MAX_NUM_SEQS,
    LOAD_FORMATS,
    SCHEDULING_POLICIES,
    CacheConfig,
    CompilationConfig,
    CUDAGraphMode,
    EngineConfig,
    ModelConfig,
    MultiModalConfig,
    ParallelConfig,
    PoolerConfig,
    ProfilerConfig,
    SchedulerConfig,
    StructuredOutputsConfig,
    cpu_kvcache_space_bytes,
    derive_max_model_len,
    mm_input_cache_bytes,
    resolve_async_scheduling,
    resolve_device,
    resolve_dtype,
    resolve_runner_type,
    worker_multiproc_method,
)
from fxllm.engine_arg_support import HONOURED, NO_EFFECT, Support, is_default, refusal, support_of
from fxllm.models.config_checks import check_model_config
from fxllm.models.loader import load_generation_config, load_hf_config, resolve_model_dir
from fxllm.models.pooling import is_pooling_checkpoint, resolve_pooler_config, sentence_max_seq_length
from fxllm.models.quantization import quantization_method as resolve_quantization_method
from fxllm.models.registry import MULTIMODAL_ARCHITECTURES, POOLING_ONLY_ARCHITECTURES, resolve_architecture
from fxllm.runtime.executor.multiproc import check_tensor_parallel_support
from fxllm.runtime.logits_processors import load_logits_processor_classes
from fxllm.validation import INT64_MAX, INT64_MIN, check_bool, check_int, check_number, check_optional
from fxllm.vllm_engine_args import VLLM_ENGINE_ARGS

GIB = 1 << 30


def _vllm_only_fields() -> list[tuple[str, Any, Any]]:
    """vLLM's arguments fxllm does not act on, at their defaults (the newest release's)."""
    fields = []
    for name, defaults in sorted(VLLM_ENGINE_ARGS.items()):
        if name in HONOURED:
            continue
        default = defaults[-1]
        spec = field(default_factory=lambda d=default: type(d)(d)) if isinstance(default, (list, dict)) else field(default=default)
        fields.append((name, Any, spec))
    return fields


_VllmOnlyArgs = dataclasses.make_dataclass("_VllmOnlyArgs", _vllm_only_fields(), kw_only=True)


@dataclass(kw_only=True)
class EngineArgs(_VllmOnlyArgs):
    """The arguments of ``LLM(...)``: every vLLM engine argument, with vLLM's defaults. The ones
    declared here are the ones fxllm acts on (None means fxllm's default for the device)."""

    model: str | None = None
    tokenizer: str | None = None
    dtype: str | torch.dtype = "auto"
    seed: int | None = 0
    max_model_len: int | None = None  # None or -1: the model's own limit
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None  # the KV cache's size, instead of a share of the GPU
    block_size: int | None = None
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool | None = None
    enforce_eager: bool = False
    hf_overrides: Any = None
    rope_scaling: dict | None = None  # vLLM 0.11's: applied to config.json as hf_overrides are
    rope_theta: float | None = None
    generation_config: str = "auto"
    override_generation_config: dict | None = None
    chat_template: str | None = None  # chat()'s template: a Jinja string or a file holding one
    device: str | torch.device = "auto"
    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # None or "mp": fxllm's own worker processes
    disable_custom_all_reduce: bool = False
    load_format: str = "auto"
    quantization: str | None = None
    compilation_config: CompilationConfig | dict | int | None = None
    cudagraph_capture_sizes: list[int] | None = None  # vLLM's top-level spelling of compilation_config's
    max_cudagraph_capture_size: int | None = None
    cuda_graph_sizes: list[int] | None = None  # vLLM 0.11's name
    runner: str = "auto"
    task: str | None = None
    pooler_config: PoolerConfig | dict | None = None
    override_pooler_config: PoolerConfig | dict | None = None
    limit_mm_per_prompt: dict[str, int] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    mm_processor_cache_gb: float | None = None  # None: FXLLM_MM_INPUT_CACHE_GIB (default 4)
    disable_mm_preprocessor_cache: bool = False  # vLLM 0.11's: no processed-image cache
    language_model_only: bool = False  # a vision-language checkpoint without its vision tower
    async_scheduling: bool | None = None
    max_logprobs: int = DEFAULT_MAX_LOGPROBS
    skip_tokenizer_init: bool = False
    scheduling_policy: str = "fcfs"
    logits_processors: list | None = None
    structured_outputs_config: StructuredOutputsConfig | dict | None = None  # {"backend": "xgrammar", ...}
    guided_decoding_backend: str | None = None  # vLLM 0.11's names of structured_outputs_config's fields
    guided_decoding_disable_any_whitespace: bool | None = None
    guided_decoding_disable_additional_properties: bool | None = None
    profiler_config: ProfilerConfig | dict | None = None  # start_profile()'s settings

    def create_engine_config(self) -> EngineConfig:
        """Check every argument, read the checkpoint's configs and resolve the engine's settings."""
        self._check_arguments()
        device = resolve_device(self.device)
        compilation = self._compilation_config()
        model_dir = resolve_model_dir(self.model)
        hf_config = load_hf_config(model_dir, self._config_overrides())
        check_model_config(hf_config, model_dir)
        quantization = resolve_quantization_method(self.quantization, hf_config)
        architecture, model_class = resolve_architecture(getattr(hf_config, "architectures", None), f"{model_dir}/config.json")
        runner_type = resolve_runner_type(self.runner, self.task, is_pooling_checkpoint(model_dir, architecture))
        multimodal = self._multimodal_config(architecture, runner_type)
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
            chat_template=_chat_template(self.chat_template),
            override_generation_config=dict(self.override_generation_config or {}),
            skip_tokenizer_init=self.skip_tokenizer_init,
        )
        max_num_seqs, max_num_batched_tokens = self._batch_limits(runner_type == "pooling", max_model_len, device)
        config = EngineConfig(
            model=model_config,
            cache=CacheConfig(
                block_size=DEFAULT_BLOCK_SIZE if self.block_size is None else self.block_size,
                gpu_memory_utilization=self.gpu_memory_utilization,
                num_gpu_blocks_override=self.num_gpu_blocks_override,
                enable_prefix_caching=True if self.enable_prefix_caching is None else self.enable_prefix_caching,
                cpu_kvcache_space_bytes=cpu_kvcache_space_bytes(),
                kv_cache_memory_bytes=self.kv_cache_memory_bytes,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                async_scheduling=resolve_async_scheduling(self.async_scheduling, device, takes_embeds),
                policy=self.scheduling_policy,
            ),
            device=device,
            compilation=compilation.eager() if self.enforce_eager else compilation,
            seed=0 if self.seed is None else self.seed,
            parallel=ParallelConfig(
                self.tensor_parallel_size, worker_multiproc_method(),
                disable_custom_all_reduce=self.disable_custom_all_reduce,
            ),
            logits_processors=self._logits_processor_classes(runner_type),
            structured_outputs=self._structured_outputs_config(),
            profiler=ProfilerConfig.from_user(self.profiler_config),
        )
        if self.tensor_parallel_size > 1:
            check_tensor_parallel_support(config)  # before any worker starts
        return config


    def _check_arguments(self) -> None:
        """Types and ranges of the scalars, then vLLM's arguments fxllm does not act on."""
        check_int("tensor_parallel_size", self.tensor_parallel_size, minimum=1)
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")
        for name in ("max_num_seqs", "block_size", "max_num_batched_tokens", "num_gpu_blocks_override",
                     "kv_cache_memory_bytes", "max_cudagraph_capture_size"):
            check_optional(check_int, name, getattr(self, name), minimum=1)
        check_optional(check_int, "seed", self.seed, minimum=INT64_MIN, maximum=INT64_MAX)
        check_int("max_logprobs", self.max_logprobs, minimum=-1)
        check_number("gpu_memory_utilization", self.gpu_memory_utilization, minimum=0.0, maximum=1.0, exclusive_minimum=True)
        check_optional(check_number, "mm_processor_cache_gb", self.mm_processor_cache_gb, minimum=0.0)
        for name in ("enforce_eager", "disable_custom_all_reduce", "disable_mm_preprocessor_cache", "language_model_only",
                     "skip_tokenizer_init"):
            check_bool(name, getattr(self, name))
        for name in ("enable_prefix_caching", "async_scheduling"):
            check_optional(check_bool, name, getattr(self, name))
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, got {self.scheduling_policy!r}")
        if self.distributed_executor_backend not in (None, "mp"):
            raise ValueError(
                f"distributed_executor_backend={self.distributed_executor_backend!r}: fxllm starts its own worker "
                f"processes on one host ('mp'); Ray and external launchers are not supported yet"
            )
        if self.override_generation_config is not None and not isinstance(self.override_generation_config, dict):
            raise TypeError(f"override_generation_config must be a dict, got {type(self.override_generation_config).__name__}")
        if self.logits_processors is not None and not isinstance(self.logits_processors, (list, tuple)):
            raise TypeError("logits_processors must be a list of logits processor classes (or their qualified names)")
        self._check_vllm_only_arguments()


    def _check_vllm_only_arguments(self) -> None:
        no_effect = []
        for field_ in dataclasses.fields(self):
            value = getattr(self, field_.name)
            support = support_of(field_.name)
            if support is Support.HONOURED or is_default(field_.name, value):
                continue
            if support is Support.NO_EFFECT:
                no_effect.append(f"{field_.name} ({NO_EFFECT[field_.name]})")
            else:
                raise ValueError(refusal(field_.name, value))
        if no_effect:
            warnings.warn(f"these vLLM arguments change nothing in fxllm: {'; '.join(no_effect)}", UserWarning, stacklevel=4)


    def _logits_processor_classes(self, runner_type: str) -> tuple:
        """The classes of ``logits_processors``, loaded (a name that does not load is an error here)."""
        if self.logits_processors and runner_type == "pooling":
            raise ValueError("logits_processors apply to generative models, but this one pools: drop them")
        return load_logits_processor_classes(tuple(self.logits_processors or ()))


    def _structured_outputs_config(self) -> StructuredOutputsConfig:
        """``structured_outputs_config``, or the same settings under vLLM 0.11's guided_decoding_* names."""
        older = {
            name: getattr(self, f"guided_decoding_{name}")
            for name in ("backend", "disable_any_whitespace", "disable_additional_properties")
            if getattr(self, f"guided_decoding_{name}") is not None
        }
        if older and self.structured_outputs_config is not None:
            raise ValueError(
                "structured_outputs_config and guided_decoding_* set the same things: pass structured_outputs_config only"
            )
        return StructuredOutputsConfig.from_user(older or self.structured_outputs_config)


    def _config_overrides(self) -> Any:
        """``hf_overrides``, with vLLM 0.11's ``rope_scaling`` / ``rope_theta`` folded in."""
        extra = {name: getattr(self, name) for name in ("rope_scaling", "rope_theta") if getattr(self, name) not in (None, {})}
        if not extra:
            return self.hf_overrides or None
        if callable(self.hf_overrides):
            raise ValueError("rope_scaling/rope_theta cannot be combined with a callable hf_overrides: put them in it")
        return {**(self.hf_overrides or {}), **extra}


    def _compilation_config(self) -> CompilationConfig:
        compilation = CompilationConfig.from_user(self.compilation_config)
        sizes = self.cudagraph_capture_sizes if self.cudagraph_capture_sizes is not None else (self.cuda_graph_sizes or None)
        if sizes is not None:
            if compilation.cudagraph_capture_sizes is not None:
                raise ValueError("cudagraph_capture_sizes is given twice (at the top level and in compilation_config): keep one")
            compilation = replace(compilation, cudagraph_capture_sizes=sizes)
        if self.max_cudagraph_capture_size is not None:
            compilation = replace(compilation, max_cudagraph_capture_size=self.max_cudagraph_capture_size)
        return compilation


    def _multimodal_config(self, architecture: str, runner_type: str) -> MultiModalConfig | None:
        """The multimodal settings of a vision-language checkpoint; None for a text-only one."""
        limits, kwargs = self.limit_mm_per_prompt, self.mm_processor_kwargs
        if architecture not in MULTIMODAL_ARCHITECTURES:
            named = [name for name, value in (("limit_mm_per_prompt", limits), ("mm_processor_kwargs", kwargs)) if value]
            if named:
                raise ValueError(
                    f"{' and '.join(named)} apply to vision-language models, but {architecture} is text-only: drop them"
                )
            return None
        if runner_type == "pooling":
            raise ValueError(f"{architecture} is a vision-language model, which fxllm runs generatively only: drop runner/task")
        if self.language_model_only:
            limits = {modality: 0 for modality in MULTIMODAL_ARCHITECTURES[architecture]}
        cache_bytes = mm_input_cache_bytes()
        if self.mm_processor_cache_gb is not None:
            cache_bytes = int(self.mm_processor_cache_gb * GIB)
        if self.disable_mm_preprocessor_cache:
            cache_bytes = 0
        return MultiModalConfig.from_user(limits, kwargs, cache_bytes, MULTIMODAL_ARCHITECTURES[architecture])


    def _pooler_config(self, model_dir: Path, architecture: str, runner_type: str) -> tuple[PoolerConfig | None, int | None]:
        """A pooling model's pooler and sentence-transformers length limit; (None, None) otherwise."""
        given = self.pooler_config if self.pooler_config is not None else self.override_pooler_config
        if self.pooler_config is not None and self.override_pooler_config is not None:
            raise ValueError("pooler_config and override_pooler_config are one argument under two names: pass one")
        if runner_type == "pooling":
            override = PoolerConfig.from_user(given)
            return resolve_pooler_config(model_dir, architecture, override), sentence_max_seq_length(model_dir)
        if architecture in POOLING_ONLY_ARCHITECTURES:
            raise ValueError(
                f"{architecture} is an encoder without an LM head: it cannot generate. Drop runner/task to use it "
                f"as a pooling model (embed, encode, score)"
            )
        if given is not None:
            raise ValueError(
                f"pooler_config applies to pooling models, but {model_dir} runs as a generative model: "
                f"pass runner='pooling' to pool with it, or drop pooler_config"
            )
        return None, None


    def _batch_limits(self, pooling: bool, max_model_len: int, device: torch.device) -> tuple[int, int]:
        """(max_num_seqs, max_num_batched_tokens), defaults filled in per device."""
        max_num_seqs = DEFAULT_MAX_NUM_SEQS if self.max_num_seqs is None else self.max_num_seqs
        max_num_batched_tokens = self.max_num_batched_tokens
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


    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """vLLM's command-line flags (``--max-model-len 512``, ``--enforce-eager``), one per field."""
        for field_ in dataclasses.fields(cls):
            default = field_.default if field_.default is not dataclasses.MISSING else field_.default_factory()
            flag = "--" + field_.name.replace("_", "-")
            if isinstance(default, bool):
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
            elif isinstance(default, (int, float)) and default is not None:
                parser.add_argument(flag, type=type(default), default=default)
            else:
                parser.add_argument(flag, type=_cli_value, default=default)
        return parser


    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in vars(args).items() if name in names})


def _cli_value(text: str) -> Any:
    """A flag's value: JSON where it parses (numbers, lists, dicts, null), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _chat_template(value: str | None) -> str | None:
    """A Jinja template given inline, or the contents of the file it names."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"chat_template must be a string (a Jinja template or a file path), got {type(value).__name__}")
    path = Path(value).expanduser()
    if "{" not in value and path.is_file():
        return path.read_text()
    if "{" not in value:
        raise FileNotFoundError(f"chat_template={value!r} is neither a Jinja template nor an existing file")
    return value


ENGINE_ARGUMENTS = frozenset(f.name for f in dataclasses.fields(EngineArgs))
