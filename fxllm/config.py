"""Engine configuration: typed, frozen dataclasses built and validated once.

This is the only module that reads environment variables; the documented
``FXLLM_*`` names live in ``ENVIRONMENT_VARIABLES`` below and in the README.
"""

from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

ENVIRONMENT_VARIABLES: dict[str, str] = {
    "FXLLM_CACHE_DIR": "where fxllm keeps the converted default model and other caches "
    "(default: $XDG_CACHE_HOME/fxllm or ~/.cache/fxllm)",
    "FXLLM_CPU_KVCACHE_SPACE": "GiB of memory for the KV cache on CPU (default 4; fractions allowed)",
    "FXLLM_DISABLE_COMPILE_CACHE": "1 turns off the on-disk compile cache (every start compiles)",
    "FXLLM_MM_INPUT_CACHE_GIB": "GiB of processed images and videos (pixel values) kept for reuse by vision-language models "
    "(default 4; 0 turns the cache off)",
    "FXLLM_WORKER_MULTIPROC_METHOD": "how tensor-parallel workers start: fork or spawn (default: fork unless CUDA "
    "is already initialized)",
    "FXLLM_TORCH_PROFILER_DIR": "where LLM.start_profile() writes torch profiler traces when profiler_config names none",
}

DEFAULT_CPU_KVCACHE_SPACE_GIB = 4.0
DEFAULT_MM_INPUT_CACHE_GIB = 4.0


def fxllm_cache_dir() -> Path:
    """The root of fxllm's on-disk caches (``FXLLM_CACHE_DIR``)."""
    explicit = os.environ.get("FXLLM_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fxllm"


def compile_cache_disabled() -> bool:
    return os.environ.get("FXLLM_DISABLE_COMPILE_CACHE", "0").strip().lower() in ("1", "true", "yes")


def cpu_kvcache_space_bytes() -> int:
    """Bytes of KV cache on CPU, from ``FXLLM_CPU_KVCACHE_SPACE`` (GiB)."""
    return _gib_from_env("FXLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_SPACE_GIB, zero_allowed=False)


def mm_input_cache_bytes() -> int:
    """Bytes of processed multimodal inputs cached, from ``FXLLM_MM_INPUT_CACHE_GIB`` (0: no cache)."""
    return _gib_from_env("FXLLM_MM_INPUT_CACHE_GIB", DEFAULT_MM_INPUT_CACHE_GIB, zero_allowed=True)


def _gib_from_env(name: str, default_gib: float, zero_allowed: bool) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return int(default_gib * (1 << 30))
    try:
        gib = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of GiB (e.g. 4 or 0.5), got {raw!r}") from None
    if not math.isfinite(gib) or gib < 0 or (gib == 0 and not zero_allowed):
        bound = ">= 0 GiB (0 turns it off)" if zero_allowed else "> 0 GiB"
        raise ValueError(f"{name} must be {bound}, got {raw!r}")
    return int(gib * (1 << 30))


def _fields_from_dict(cls: type, value: dict, argument: str) -> Any:
    """``cls(**value)``, naming the unknown keys of a user's dict for ``argument``."""
    known = sorted(cls.__dataclass_fields__)
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ValueError(f"unknown {argument} field(s) {unknown}; known: {known}")
    return cls(**value)


# Defaults (vLLM's where it has one).
DEFAULT_BLOCK_SIZE = 16
DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_MAX_LOGPROBS = 20
SCHEDULING_POLICIES = ("fcfs", "priority")
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


POOLING_TYPES = ("MEAN", "CLS", "LAST")


@dataclass(frozen=True)
class PoolerConfig:
    """How a pooling model turns a prompt's hidden states into one vector (vLLM's PoolerConfig).

    ``pooling_type``: "MEAN" (average of all tokens), "CLS" (first token) or "LAST" (last
    token); ``normalize``: L2-normalize the vector. ``None`` keeps the model's own choice
    (its sentence-transformers files, else the architecture's default).
    ``LLM(override_pooler_config=...)`` takes this object or a dict of its fields.
    """

    pooling_type: str | None = None
    normalize: bool | None = None

    def __post_init__(self) -> None:
        if self.pooling_type is not None:
            if not isinstance(self.pooling_type, str) or self.pooling_type.upper() not in POOLING_TYPES:
                raise ValueError(f"pooling_type must be one of {', '.join(POOLING_TYPES)} or None, got {self.pooling_type!r}")
            object.__setattr__(self, "pooling_type", self.pooling_type.upper())
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be True, False or None, got {self.normalize!r}")

    @classmethod
    def from_user(cls, value: "PoolerConfig | dict | None") -> "PoolerConfig":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return _fields_from_dict(cls, value, "override_pooler_config")
        raise TypeError(f"override_pooler_config must be a PoolerConfig, a dict or None, got {type(value).__name__}")


MODALITIES = ("image", "video")
# vLLM's default limit for every modality.
DEFAULT_MM_LIMIT_PER_PROMPT = 999


@dataclass(frozen=True)
class MultiModalConfig:
    """Inputs of a vision-language model: vLLM's ``limit_mm_per_prompt`` (items of each modality a
    prompt may hold; 0 builds nothing for that modality) and ``mm_processor_kwargs`` (passed to the
    Hugging Face processor, checked against it when it loads)."""

    image_limit: int = DEFAULT_MM_LIMIT_PER_PROMPT
    video_limit: int = DEFAULT_MM_LIMIT_PER_PROMPT
    processor_kwargs: tuple[tuple[str, Any], ...] = field(default=(), hash=False)
    input_cache_bytes: int = int(DEFAULT_MM_INPUT_CACHE_GIB * (1 << 30))
    modalities: frozenset[str] = frozenset(MODALITIES)  # what the architecture takes

    @classmethod
    def from_user(
        cls, limit_mm_per_prompt: dict | None, mm_processor_kwargs: dict | None, input_cache_bytes: int,
        modalities: frozenset[str] = frozenset(MODALITIES),
    ) -> "MultiModalConfig":
        limits = {} if limit_mm_per_prompt is None else limit_mm_per_prompt
        if not isinstance(limits, dict):
            raise TypeError(f"limit_mm_per_prompt must be a dict like {{'image': 2}}, got {type(limits).__name__}")
        unknown = sorted(set(limits) - set(MODALITIES))
        if unknown:
            raise ValueError(f"limit_mm_per_prompt has unknown modalities {unknown}; known: {', '.join(MODALITIES)}")
        for modality, limit in limits.items():
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
                raise ValueError(f"limit_mm_per_prompt[{modality!r}] must be an int >= 0, got {limit!r}")
        kwargs = {} if mm_processor_kwargs is None else mm_processor_kwargs
        if not isinstance(kwargs, dict) or not all(isinstance(key, str) for key in kwargs):
            raise TypeError(f"mm_processor_kwargs must be a dict of processor arguments, got {kwargs!r}")
        return cls(
            image_limit=limits.get("image", DEFAULT_MM_LIMIT_PER_PROMPT),
            video_limit=limits.get("video", DEFAULT_MM_LIMIT_PER_PROMPT),
            processor_kwargs=tuple(sorted(kwargs.items())),
            input_cache_bytes=input_cache_bytes,
            modalities=modalities,
        )

    def limit(self, modality: str) -> int:
        """Items of ``modality`` one prompt may hold: 0 for a modality the architecture does not take."""
        if modality not in self.modalities:
            return 0
        return self.image_limit if modality == "image" else self.video_limit

    def takes_any(self) -> bool:
        """Whether a prompt may hold any image or video, so the vision tower is needed."""
        return any(self.limit(modality) > 0 for modality in MODALITIES)


RUNNER_TYPES = ("auto", "generate", "pooling")
# vLLM's older ``task=`` argument -> the runner it selects.
_TASK_RUNNERS = {"auto": "auto", "generate": "generate", "embed": "pooling", "embedding": "pooling", "score": "pooling"}


def resolve_runner_type(runner: str, task: str | None, is_pooling_model: bool) -> str:
    """The runner, "generate" or "pooling": what ``runner`` (or vLLM's older ``task``) asks
    for, else what the checkpoint is (``is_pooling_model``)."""
    if runner not in RUNNER_TYPES:
        raise ValueError(f"runner must be one of {', '.join(RUNNER_TYPES)}, got {runner!r}")
    if task is not None:
        if task not in _TASK_RUNNERS:
            raise ValueError(f"task must be one of {', '.join(_TASK_RUNNERS)}, got {task!r}; or pass runner=... instead")
        from_task = _TASK_RUNNERS[task]
        if runner != "auto" and from_task not in ("auto", runner):
            raise ValueError(f"runner={runner!r} and task={task!r} disagree; pass only one of them")
        runner = from_task if runner == "auto" else runner
    if runner == "auto":
        return "pooling" if is_pooling_model else "generate"
    return runner


LOAD_FORMATS = ("auto", "safetensors", "sharded_state", "dummy")


@dataclass(frozen=True)
class ModelConfig:
    model: str  # local HF-style directory
    tokenizer: str
    architecture: str
    dtype: torch.dtype
    max_model_len: int
    hf_config: Any = field(compare=False, hash=False, repr=False)  # transformers PretrainedConfig
    generation_config: dict = field(compare=False, hash=False, repr=False)  # raw generation_config.json
    runner_type: str = "generate"  # "generate" or "pooling" (see resolve_runner_type)
    pooler_config: PoolerConfig | None = None  # pooling models: both fields resolved
    multimodal: MultiModalConfig | None = None  # vision-language checkpoints only
    quantization: str | None = None  # "fp8", "compressed-tensors", "gptq" or "awq" (vLLM's names); None: full precision
    # "auto"/"safetensors": the checkpoint; "sharded_state": one file per TP rank; "dummy": random weights
    load_format: str = "auto"
    max_logprobs: int = DEFAULT_MAX_LOGPROBS  # the most logprobs a request may ask for (-1: the vocabulary)
    chat_template: str | None = field(default=None, compare=False, hash=False, repr=False)  # chat()'s default
    # Sampling defaults over generation_config.json's (vLLM's override_generation_config).
    override_generation_config: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    skip_tokenizer_init: bool = False  # no tokenizer: prompts are token ids, outputs have no text

    @property
    def vocab_size(self) -> int:
        return self.hf_config.get_text_config().vocab_size


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = DEFAULT_BLOCK_SIZE
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    cpu_kvcache_space_bytes: int = int(DEFAULT_CPU_KVCACHE_SPACE_GIB * (1 << 30))
    kv_cache_memory_bytes: int | None = None  # the cache's exact size (vLLM's), instead of a share of memory


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS_GPU
    # Launch each step before the previous step's tokens reach the host (engine.py).
    async_scheduling: bool = False
    policy: str = "fcfs"  # "fcfs", or "priority": generate(priority=[...]), lower values first


def resolve_async_scheduling(asked: bool | None, device: torch.device, takes_embeds: bool) -> bool:
    """``None``: on where the host has device time to hide behind (CUDA). Vision-language
    models merge image embeddings into each step's inputs on the host, so they schedule
    synchronously."""
    if asked is None:
        return device.type == "cuda" and not takes_embeds
    if not isinstance(asked, bool):
        raise ValueError(f"async_scheduling must be True, False or None, got {asked!r}")
    if asked and takes_embeds:
        raise ValueError("async_scheduling=True is not supported for vision-language models: drop it or pass False")
    return asked


class CompilationLevel(enum.IntEnum):
    """vLLM's compilation levels."""

    NO_COMPILATION = 0  # eager
    DYNAMO_AS_IS = 1  # plain torch.compile of the model
    DYNAMO_ONCE = 2  # capture once, whole graph to the backend
    PIECEWISE = 3  # capture once, split at attention, compile each piece (default)


class CompilationMode(enum.IntEnum):
    """vLLM's current names for the levels (``compilation_config={"mode": ...}``)."""

    NONE = 0
    STOCK_TORCH_COMPILE = 1
    DYNAMO_TRACE_ONCE = 2
    VLLM_COMPILE = 3


class CUDAGraphMode(enum.Enum):
    """Which steps replay CUDA graphs. FULL: the whole forward, attention included, for
    decode-only steps (fxllm's attention kernels take mixed steps only outside a graph, so
    FULL and FULL_DECODE_ONLY are the same here: other steps run without graphs);
    PIECEWISE: the compiled pieces between attention ops, for any step; FULL_AND_PIECEWISE:
    FULL for decode-only steps, PIECEWISE for the rest."""

    NONE = "NONE"
    PIECEWISE = "PIECEWISE"
    FULL = "FULL"
    FULL_DECODE_ONLY = "FULL_DECODE_ONLY"
    FULL_AND_PIECEWISE = "FULL_AND_PIECEWISE"


ATTENTION_OP = "fxllm.attention"


# vLLM's passes fxllm does not have: accepted off (False or None), refused on.
VLLM_ONLY_PASSES = frozenset({
    "fuse_norm_quant", "fuse_act_quant", "fuse_attn_quant", "enable_sp", "fuse_gemm_comms", "fuse_allreduce_rms",
    "fuse_minimax_qk_norm", "fuse_act_padding", "fuse_mla_dual_rms_norm", "fuse_rope_kvcache",
    "enable_sequence_parallelism", "enable_async_tp", "enable_fi_allreduce_fusion", "enable_attn_fusion",
})


@dataclass(frozen=True)
class PassConfig:
    """Switches for the FX passes run on the captured graph (levels 2 and 3).

    ``enable_noop`` and ``enable_fusion`` are vLLM's; ``enable_fusion`` turns every
    fusion off, and each fusion has a switch of its own under it. A fusion is on by
    default only where it measured faster (BENCHMARKS.md).
    ``compilation_config={"pass_config": ...}`` takes this object or a dict of its fields.
    """

    enable_noop: bool = True  # drop casts, views and multiplications that change nothing
    enable_fusion: bool = True
    # Qwen3's per-head q/k RMSNorm + RoPE as one op: on an H100, 11.7 instead of 16.7 kernels
    # per layer and 15% faster batch-1 decode of the Qwen3-0.6B shape (BENCHMARKS.md).
    enable_qk_norm_rope_fusion: bool = True
    # Each RMSNorm, with the residual add before it, as one kernel (CUDA; see passes/rms_norm_fusion.py).
    enable_rms_norm_fusion: bool = True

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"pass_config.{name} must be True or False, got {getattr(self, name)!r}")

    @classmethod
    def from_user(cls, value: "PassConfig | dict") -> "PassConfig":
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            value = dict(value)
            if "eliminate_noops" in value:  # vLLM's current name
                value["enable_noop"] = value.pop("eliminate_noops")
            for name in sorted(set(value) & VLLM_ONLY_PASSES):
                if value.pop(name) not in (None, False):
                    raise ValueError(f"pass_config.{name}: fxllm has no such pass; its passes: {sorted(cls.__dataclass_fields__)}")
            return _fields_from_dict(cls, value, "pass_config")
        raise TypeError(f"pass_config must be a PassConfig or a dict, got {type(value).__name__}")


@dataclass(frozen=True)
class CompilationConfig:
    """How the model is compiled; vLLM's ``CompilationConfig``.

    ``LLM(compilation_config=...)`` takes this object, a dict of its fields, or an
    int (the level). ``enforce_eager=True`` means level 0 and no CUDA graphs.
    """

    level: CompilationLevel = CompilationLevel.PIECEWISE
    use_inductor: bool = True  # False: pieces run eagerly (the debugging kill switch)
    splitting_ops: tuple[str, ...] | None = None  # None: the attention op; () = no split
    compile_sizes: tuple[int, ...] = ()  # T values also compiled with static shapes
    cudagraph_capture_sizes: tuple[int, ...] | None = None
    max_cudagraph_capture_size: int | None = None  # caps the default capture sizes (vLLM's)
    cudagraph_mode: CUDAGraphMode | None = None
    cache_dir: str | None = None  # on-disk compile cache (default: FXLLM_CACHE_DIR/compile)
    debug_dump_path: str | None = None  # depyf dump of the captured and split graphs
    pass_config: PassConfig = field(default_factory=PassConfig)
    # Compile a vision-language model's vision tower too (vLLM's switch), region by region
    # around its per-image attention, once for every block; off by default, as measured
    # (BENCHMARKS.md). Needs a level above 0 and Inductor.
    compile_mm_encoder: bool = False

    def __post_init__(self) -> None:
        try:
            level = CompilationLevel(self.level)
        except ValueError:
            raise ValueError(f"compilation level must be 0, 1, 2 or 3, got {self.level!r}") from None
        object.__setattr__(self, "level", level)
        if self.splitting_ops is not None:
            if isinstance(self.splitting_ops, str) or not all(isinstance(op, str) for op in self.splitting_ops):
                raise ValueError(f"splitting_ops must be a list of op names like {ATTENTION_OP!r}, got {self.splitting_ops!r}")
            object.__setattr__(self, "splitting_ops", tuple(self.splitting_ops))
        object.__setattr__(self, "compile_sizes", _positive_ints("compile_sizes", self.compile_sizes))
        if self.max_cudagraph_capture_size is not None:
            _positive_ints("max_cudagraph_capture_size", [self.max_cudagraph_capture_size])
        if self.cudagraph_capture_sizes is not None:
            sizes = _positive_ints("cudagraph_capture_sizes", self.cudagraph_capture_sizes)
            object.__setattr__(self, "cudagraph_capture_sizes", tuple(sorted(set(sizes))))
        if self.cudagraph_mode is not None and not isinstance(self.cudagraph_mode, CUDAGraphMode):
            try:
                object.__setattr__(self, "cudagraph_mode", CUDAGraphMode(str(self.cudagraph_mode).upper()))
            except ValueError:
                modes = ", ".join(m.value for m in CUDAGraphMode)
                raise ValueError(f"cudagraph_mode must be one of {modes}, got {self.cudagraph_mode!r}") from None
        object.__setattr__(self, "pass_config", PassConfig.from_user(self.pass_config))
        for name in ("debug_dump_path", "cache_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, Path)):
                raise TypeError(f"compilation_config {name} must be a path (str), got {value!r}")
        for name in ("use_inductor", "compile_mm_encoder"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"compilation_config {name} must be True or False, got {getattr(self, name)!r}")

    def eager(self) -> "CompilationConfig":
        """This config at level 0 without CUDA graphs (``enforce_eager=True``)."""
        return replace(self, level=CompilationLevel.NO_COMPILATION, cudagraph_mode=CUDAGraphMode.NONE)

    @property
    def effective_splitting_ops(self) -> tuple[str, ...]:
        return (ATTENTION_OP,) if self.splitting_ops is None else self.splitting_ops

    @classmethod
    def from_user(cls, value: "CompilationConfig | dict | int | None") -> "CompilationConfig":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, bool):
            raise TypeError("compilation_config must be a CompilationConfig, a dict or an int level, got a bool")
        if isinstance(value, int):
            return cls(level=value)
        if isinstance(value, dict):
            return _fields_from_dict(cls, _vllm_compilation_names(value), "compilation_config")
        raise TypeError(
            f"compilation_config must be a CompilationConfig, a dict or an int level, got {type(value).__name__}"
        )


# compilation_config["backend"] (vLLM's) -> use_inductor.
_BACKENDS = {"inductor": True, "eager": False, "": True}


def _vllm_compilation_names(value: dict) -> dict:
    """vLLM's newer spellings: ``mode`` for ``level``, ``backend`` for ``use_inductor``."""
    value = dict(value)
    if "mode" in value:
        if "level" in value:
            raise ValueError("compilation_config has both 'mode' and 'level' (one setting, two names): keep one")
        value["level"] = value.pop("mode")
    if "backend" in value:
        backend = value.pop("backend")
        if backend not in _BACKENDS:
            raise ValueError(f"compilation_config backend must be 'inductor' or 'eager', got {backend!r}")
        value.setdefault("use_inductor", _BACKENDS[backend])
    return value


def _positive_ints(name: str, values: Any) -> tuple[int, ...]:
    if not isinstance(values, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values
    ):
        raise ValueError(f"{name} must be a list of ints >= 1, got {values!r}")
    return tuple(values)


def worker_multiproc_method() -> str | None:
    """``FXLLM_WORKER_MULTIPROC_METHOD``, unset: None (the engine chooses)."""
    return os.environ.get("FXLLM_WORKER_MULTIPROC_METHOD") or None


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    worker_multiproc_method: str | None = None  # fork / spawn; None: fork unless CUDA is initialized
    # Small all-reduces on GPUs go through peer memory (parallel/one_shot_all_reduce.py);
    # True: NCCL for every size (vLLM's option of the same name).
    disable_custom_all_reduce: bool = False


# Structured-output backends: "auto" chooses xgrammar, the only one fxllm has.
STRUCTURED_OUTPUT_BACKENDS = ("auto", "xgrammar")


@dataclass(frozen=True)
class StructuredOutputsConfig:
    """vLLM's ``structured_outputs_config``: the backend, and JSON options for every request."""

    backend: str = "auto"
    disable_any_whitespace: bool = False  # compact JSON for every request
    disable_additional_properties: bool = False  # always in effect with xgrammar (its strict mode)

    def __post_init__(self) -> None:
        if self.backend not in STRUCTURED_OUTPUT_BACKENDS:
            raise ValueError(
                f"structured outputs backend {self.backend!r} is not supported: fxllm runs structured outputs on "
                f"xgrammar; use backend 'auto' or 'xgrammar'"
            )
        for name in ("disable_any_whitespace", "disable_additional_properties"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"structured_outputs_config.{name} must be True or False, got {getattr(self, name)!r}")

    @classmethod
    def from_user(cls, value: "StructuredOutputsConfig | dict | None") -> "StructuredOutputsConfig":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return _fields_from_dict(cls, value, "structured_outputs_config")
        raise TypeError(f"structured_outputs_config must be a dict or a StructuredOutputsConfig, got {type(value).__name__}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    device: torch.device
    compilation: CompilationConfig = field(default_factory=CompilationConfig)
    seed: int = 0
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # vLLM's batch-level logits processors: their classes (engine_args loads qualified names), built per engine.
    logits_processors: tuple = field(default=(), compare=False, hash=False)
    structured_outputs: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    profiler: ProfilerConfig = field(default_factory=lambda: ProfilerConfig.from_user(None))  # start_profile()


# vLLM's name of the engine's configuration: what its logits processors are built with.
VllmConfig = EngineConfig

SUPPORTED_DEVICE_TYPES = ("cpu", "cuda")


def resolve_device(device: str | torch.device) -> torch.device:
    # device_count() counts GPUs through NVML where it can; torch.cuda.is_available() would
    # initialize the CUDA driver, after which tensor-parallel workers can no longer be forked.
    if device == "auto":
        return torch.device("cuda" if torch.cuda.device_count() > 0 else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if resolved.type not in SUPPORTED_DEVICE_TYPES:
        raise ValueError(f"device={device!r} is not supported: fxllm runs on 'cpu' and 'cuda' devices")
    if resolved.type == "cuda" and torch.cuda.device_count() == 0:
        raise ValueError(f"device={device!r} but CUDA is not available; use device='cpu' or 'auto'")
    return resolved


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


# RoPE scalings that stretch the trained context by their factor (as vLLM derives the limit).
_LENGTH_SCALING_ROPE = ("yarn", "linear", "dynamic")


def derive_max_model_len(hf_config: Any, requested: int | None, sentence_max_seq_length: int | None = None) -> int:
    """The requested length, checked against the model's limit: a sentence-transformers model's
    ``max_seq_length`` (sentence_bert_config.json) where given, else config.json's (times the
    factor of a YaRN / linear / dynamic RoPE scaling). None or -1 asks for the limit itself."""
    limit = sentence_max_seq_length or next(
        (getattr(hf_config, k) for k in _MAX_LENGTH_KEYS if getattr(hf_config, k, None)), None
    )
    source = "sentence_bert_config.json" if sentence_max_seq_length else "config.json"
    if limit is not None and not sentence_max_seq_length:
        limit = _rope_scaled_limit(hf_config, int(limit))
    if requested == -1:
        requested = None
    if requested is None:
        if limit is None:
            raise ValueError("the model config names no maximum length; pass max_model_len=...")
        return int(limit)
    if not isinstance(requested, int) or isinstance(requested, bool) or requested < 2:
        raise ValueError(f"max_model_len must be an int >= 2, got {requested!r}")
    if limit is not None and requested > limit:
        raise ValueError(
            f"max_model_len={requested} is larger than the model's maximum length {limit} "
            f"({source}); pass max_model_len <= {limit}"
        )
    return requested


def _rope_scaled_limit(hf_config: Any, limit: int) -> int:
    scaling = getattr(hf_config, "rope_scaling", None) or getattr(hf_config, "rope_parameters", None)
    if not isinstance(scaling, dict):
        return limit
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = scaling.get("factor")
    if kind not in _LENGTH_SCALING_ROPE or not isinstance(factor, (int, float)) or factor <= 1:
        return limit
    # YaRN's factor stretches the original context; the others stretch max_position_embeddings.
    base = scaling.get("original_max_position_embeddings", limit) if kind == "yarn" else limit
    return max(limit, int(base * factor))


@dataclass(frozen=True)
class ProfilerConfig:
    """vLLM's ``ProfilerConfig`` for ``LLM.start_profile()``: the torch profiler's options, and
    which engine steps it records (after ``delay_iterations``, at most ``max_iterations``;
    0 = until ``stop_profile()``). ``LLM(profiler_config=...)`` takes it or a dict of its fields."""

    profiler: str | None = "torch"
    torch_profiler_dir: str | None = None  # None: FXLLM_TORCH_PROFILER_DIR
    torch_profiler_with_stack: bool = True
    torch_profiler_record_shapes: bool = False
    torch_profiler_with_memory: bool = False
    torch_profiler_with_flops: bool = False
    delay_iterations: int = 0
    max_iterations: int = 0

    def __post_init__(self) -> None:
        if self.profiler not in (None, "torch"):
            raise ValueError(f"profiler_config: fxllm profiles with the torch profiler only, got profiler={self.profiler!r}")
        for name in ("delay_iterations", "max_iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"profiler_config {name} must be an int >= 0, got {value!r}")

    @classmethod
    def from_user(cls, value: "ProfilerConfig | dict | None") -> "ProfilerConfig":
        if value is None:
            config = cls()
        elif isinstance(value, cls):
            config = value
        elif isinstance(value, dict):
            config = _fields_from_dict(cls, value, "profiler_config")
        else:
            raise TypeError(f"profiler_config must be a ProfilerConfig or a dict, got {type(value).__name__}")
        if not config.torch_profiler_dir:
            config = replace(config, torch_profiler_dir=os.environ.get("FXLLM_TORCH_PROFILER_DIR") or None)
        return config


@dataclass(frozen=True)
class KVTransferConfig:
    """vLLM's KV transfer (disaggregated prefill) settings. fxllm keeps the KV cache in its own
    engine: an engine given one is refused with a message naming it."""

    kv_connector: str | None = None
    kv_role: str | None = None
    kv_rank: int | None = None
    kv_parallel_size: int = 1
    kv_buffer_size: float = 1e9
    kv_buffer_device: str = "cuda"
    kv_ip: str = "127.0.0.1"
    kv_port: int = 14579
    kv_connector_extra_config: dict = field(default_factory=dict, hash=False)
    kv_connector_module_path: str | None = None


@dataclass(frozen=True)
class WeightTransferConfig:
    """vLLM's weight transfer settings (trainer-to-engine weight sync). Not supported yet: an
    engine given one is refused with a message naming it."""

    backend: str = "nccl"

