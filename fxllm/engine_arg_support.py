"""What fxllm does with each of vLLM's engine arguments.

Every argument vLLM's ``LLM(...)`` / ``EngineArgs`` takes (``vllm_engine_args.py``) is a known
name here. One fxllm honours is honoured; one that changes nothing here is accepted with a
warning when it is given a non-default value; any other argument is accepted at its
default value and refused otherwise, with a message that names it and says why, so that a
script never silently runs something other than what it asked for.
"""

from __future__ import annotations

import enum
from typing import Any

from fxllm.vllm_engine_args import VLLM_ENGINE_ARGS


class Support(enum.Enum):
    HONOURED = "honoured"
    NO_EFFECT = "accepted; changes nothing here"
    REFUSED = "accepted at its default only"


# fxllm's own arguments that vLLM does not have (or no longer has).
FXLLM_ONLY_ARGS = frozenset({"device", "chat_template"})

# Arguments fxllm implements (README: "vLLM's arguments").
HONOURED = frozenset({
    "model", "tokenizer", "runner", "task", "skip_tokenizer_init", "load_format", "dtype", "seed", "max_model_len",
    "cudagraph_capture_sizes", "max_cudagraph_capture_size", "cuda_graph_sizes", "tensor_parallel_size",
    "block_size", "enable_prefix_caching", "gpu_memory_utilization", "kv_cache_memory_bytes",
    "max_num_batched_tokens", "max_num_seqs", "max_logprobs", "hf_overrides", "quantization", "enforce_eager",
    "disable_custom_all_reduce", "limit_mm_per_prompt", "mm_processor_kwargs", "mm_processor_cache_gb",
    "disable_mm_preprocessor_cache", "num_gpu_blocks_override", "compilation_config", "generation_config",
    "override_generation_config", "async_scheduling", "pooler_config", "override_pooler_config",
    "scheduling_policy", "logits_processors", "rope_scaling", "rope_theta", "language_model_only",
    "distributed_executor_backend", "profiler_config", "structured_outputs_config", "guided_decoding_backend",
    "guided_decoding_disable_any_whitespace", "guided_decoding_disable_additional_properties",
})

# Arguments that change nothing fxllm computes or holds: logging, hub downloads, transports
# of a server, tuning of machinery fxllm does not have. A non-default value warns once.
NO_EFFECT: dict[str, str] = {
    name: note
    for names, note in [
        (("trust_remote_code",), "fxllm runs its own implementation of each supported architecture, never remote code"),
        (("served_model_name", "disable_log_stats", "aggregate_engine_logging", "show_hidden_metrics_for_version",
          "otlp_traces_endpoint", "collect_detailed_traces", "kv_cache_metrics", "kv_cache_metrics_sample",
          "cudagraph_metrics", "enable_layerwise_nvtx_tracing", "enable_mfu_metrics",
          "enable_logging_iteration_details", "enable_mm_processor_stats", "use_tqdm_on_load"),
         "logging and metrics of vLLM's server"),
        (("revision", "code_revision", "tokenizer_revision", "hf_token", "download_dir", "ignore_patterns",
          "safetensors_load_strategy", "pt_load_map_location", "max_parallel_loading_workers"),
         "fxllm reads local checkpoints only and loads them its own way"),
        (("allowed_local_media_path", "allowed_media_domains", "mm_processor_cache_type", "mm_shm_cache_max_object_size_mb",
          "mm_tensor_ipc", "renderer_num_workers", "skip_mm_profiling", "enable_multimodal_encoder_data_parallel",
          "disable_chunked_mm_input"),
         "fxllm processes images in this process, from local files or data: URLs"),
        (("attention_backend", "mm_encoder_attn_backend", "enable_flashinfer_autotune", "disable_cascade_attn",
          "optimization_level", "performance_mode"),
         "fxllm picks its own kernels (Triton attention on GPUs)"),
        (("swap_space", "enable_chunked_prefill", "max_num_partial_prefills", "max_long_partial_prefills",
          "long_prefill_token_threshold", "disable_hybrid_kv_cache_manager", "num_lookahead_slots",
          "scheduler_reserve_full_isl", "stream_interval", "prefix_caching_hash_algo",
          "max_seq_len_to_capture", "disable_async_output_proc"),
         "fxllm's scheduler always chunks long prompts and preempts by recompute (it never swaps)"),
        (("numa_bind", "numa_bind_cpus", "numa_bind_nodes", "distributed_timeout_seconds", "ray_workers_use_nsight",
          "master_addr", "master_port", "shutdown_timeout", "fail_on_environ_validation", "worker_use_ray",
          "logits_processor_pattern", "guided_decoding_disable_fallback"),
         "process and server settings fxllm has no counterpart for"),
    ]
    for name in names
}

# Arguments refused with a specific reason when given a non-default value; any other
# vLLM argument gets the generic reason.
REFUSED_BECAUSE: dict[str, str] = {
    name: reason
    for names, reason in [
        (("enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras", "lora_dtype", "fully_sharded_loras",
          "lora_target_modules", "default_mm_loras", "enable_lora_bias", "lora_extra_vocab_size",
          "enable_tower_connector_lora", "specialize_active_lora"),
         "LoRA adapters are not supported yet"),
        (("speculative_config",), "speculative decoding is not supported yet"),
        (("reasoning_parser", "reasoning_parser_plugin", "reasoning_config"), "reasoning parsers are not supported yet"),
        (("kv_cache_dtype", "calculate_kv_scales", "kv_cache_dtype_skip_layers"),
         "the KV cache is stored in the model's dtype only"),
        (("data_parallel_size", "data_parallel_rank", "data_parallel_start_rank", "data_parallel_size_local",
          "data_parallel_address", "data_parallel_rpc_port", "data_parallel_hybrid_lb", "data_parallel_external_lb",
          "data_parallel_backend", "pipeline_parallel_size", "nnodes", "node_rank", "enable_expert_parallel",
          "prefill_context_parallel_size", "decode_context_parallel_size"),
         "fxllm runs on one host with tensor parallelism only (tensor_parallel_size)"),
        (("enable_sleep_mode", "weight_transfer_config", "worker_extension_cls", "worker_cls", "scheduler_cls"),
         "engine extensions and sleep mode are not supported yet"),
        (("cpu_offload_gb", "cpu_offload_params", "offload_backend", "offload_group_size", "offload_num_in_group",
          "offload_prefetch_step", "offload_params", "kv_offloading_size", "kv_offloading_backend"),
         "fxllm keeps every weight and the KV cache on the device"),
        (("model_impl",), "fxllm runs its own implementation of each supported architecture ('auto' or 'vllm')"),
        (("tokenizer_mode",), "fxllm loads the Hugging Face tokenizer ('auto' or 'hf')"),
        (("logprobs_mode",), "logprobs are those of the raw distribution ('raw_logprobs')"),
        (("enable_prompt_embeds",), "prompt embeddings are not supported yet"),
        (("kv_transfer_config", "kv_events_config", "ec_transfer_config"),
         "fxllm keeps the KV cache inside its engine (no transfer between engines)"),
    ]
    for name in names
}

# Values other than the default that mean the same here.
EQUIVALENT_VALUES: dict[str, tuple[Any, ...]] = {
    "model_impl": ("auto", "vllm"),
    "tokenizer_mode": ("auto", "hf"),
    "config_format": ("auto", "hf"),
    "distributed_executor_backend": (None, "mp"),
    "enable_chunked_prefill": (None, True),
}


def support_of(name: str) -> Support:
    if name in HONOURED or name in FXLLM_ONLY_ARGS:
        return Support.HONOURED
    if name in NO_EFFECT:
        return Support.NO_EFFECT
    return Support.REFUSED


def is_default(name: str, value: Any) -> bool:
    """Whether ``value`` is one of the defaults ``name`` has had in vLLM (or means the same here)."""
    defaults = VLLM_ENGINE_ARGS.get(name, (None,)) + EQUIVALENT_VALUES.get(name, ())
    return any(_same(value, default) for default in defaults)


def _same(value: Any, default: Any) -> bool:
    if value is default:
        return True
    if isinstance(value, bool) or isinstance(default, bool):
        return False  # True is not 1 here
    if isinstance(value, (int, float)) and isinstance(default, (int, float)):
        return value == default
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
        return list(value) == list(default)
    return type(value) is type(default) and value == default


def known_argument(name: str) -> bool:
    return name in VLLM_ENGINE_ARGS or name in FXLLM_ONLY_ARGS or name in NO_EFFECT


def refusal(name: str, value: Any) -> str:
    reason = REFUSED_BECAUSE.get(name, "fxllm does not implement it")
    defaults = " or ".join(repr(d) for d in VLLM_ENGINE_ARGS.get(name, (None,)) + EQUIVALENT_VALUES.get(name, ()))
    return f"{name}={value!r}: {reason}; leave it at its default ({defaults})"
