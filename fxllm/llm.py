"""``LLM``: vLLM's offline API. Validates a whole call before queueing anything."""

from __future__ import annotations

import itertools
import logging
import time
import warnings
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fxllm.config import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_MAX_NUM_BATCHED_TOKENS_CPU,
    DEFAULT_MAX_NUM_BATCHED_TOKENS_GPU,
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
from fxllm.compiler import CompileReport
from fxllm.models.loader import load_generation_config, load_hf_config, resolve_model_dir
from fxllm.models.pooling import is_pooling_checkpoint, resolve_pooler_config, sentence_max_seq_length
from fxllm.models.quantization import quantization_method as resolve_quantization_method
from fxllm.models.registry import MULTIMODAL_ARCHITECTURES, POOLING_ONLY_ARCHITECTURES, resolve_architecture
from fxllm.outputs import (
    BeamSearchOutput,
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    PoolingOutput,
    PoolingRequestOutput,
    RequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from fxllm.runtime.detokenizer import IncrementalDetokenizer
from fxllm.parallel.tp_worker import check_tensor_parallel_support, run_tensor_parallel_worker, stop_tensor_parallel
from fxllm.parallel.workers import WorkerGroup
from fxllm.runtime.engine import LLMEngine
from fxllm.runtime.multimodal.inputs import MultiModalPrompt
from fxllm.runtime.multimodal.processor import MultiModalProcessor, check_mm_data
from fxllm.runtime.pooling_runner import PoolingRunner
from fxllm.prompts import (
    PromptType,
    as_conversations,
    as_prompt_list,
    collect_eos_token_ids,
    load_tokenizer,
    tokenize_bad_words,
)
from fxllm.runtime.request import Request
from fxllm.beam_search import run_beam_search
from fxllm.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger(__name__)

# vLLM arguments that change nothing in fxllm: accepted with one warning.
IGNORED_VLLM_ARGUMENTS = frozenset(
    {
        "trust_remote_code",
        "swap_space",
        "disable_log_stats",
        "tokenizer_mode",
        "revision",
        "tokenizer_revision",
        "code_revision",
        "download_dir",
        "cpu_offload_gb",
        "enable_chunked_prefill",
        "max_seq_len_to_capture",
        "disable_async_output_proc",
        "worker_use_ray",
        "distributed_executor_backend",
        "max_logprobs",
        "served_model_name",
    }
)

# What each kind of model serves.
_RUNNER_METHODS = {"generate": "generate(), chat() and beam_search()", "pooling": "embed(), encode() and score()"}
_RUNNER_NOUNS = {"generate": "generative", "pooling": "pooling"}
POOLING_TASKS = ("embed",)


class LLM:
    """An offline engine over one model: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""

    def __init__(
        self,
        model: str | None = None,
        tokenizer: str | None = None,
        dtype: str | torch.dtype = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
        max_num_batched_tokens: int | None = None,
        gpu_memory_utilization: float = 0.9,
        block_size: int = DEFAULT_BLOCK_SIZE,
        num_gpu_blocks_override: int | None = None,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = False,
        hf_overrides: Any = None,
        generation_config: str = "auto",
        device: str = "auto",
        tensor_parallel_size: int = 1,
        disable_custom_all_reduce: bool = False,
        load_format: str = "auto",
        quantization: str | None = None,
        compilation_config: CompilationConfig | dict | int | None = None,
        runner: str = "auto",
        task: str | None = None,
        override_pooler_config: PoolerConfig | dict | None = None,
        limit_mm_per_prompt: dict[str, int] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        async_scheduling: bool | None = None,
        **kwargs: Any,
    ):
        self._reject_unknown_arguments(kwargs)
        _check_int("tensor_parallel_size", tensor_parallel_size, minimum=1)
        if load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
        _check_int("max_num_seqs", max_num_seqs, minimum=1)
        _check_int("block_size", block_size, minimum=1)
        _check_int("seed", seed, minimum=None)
        if max_num_batched_tokens is not None:
            _check_int("max_num_batched_tokens", max_num_batched_tokens, minimum=1)
        if num_gpu_blocks_override is not None:
            _check_int("num_gpu_blocks_override", num_gpu_blocks_override, minimum=1)
        if not isinstance(gpu_memory_utilization, (int, float)) or not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")

        compilation = CompilationConfig.from_user(compilation_config)
        model_dir = resolve_model_dir(model)
        hf_config = load_hf_config(model_dir, hf_overrides)
        quantization_method = resolve_quantization_method(quantization, hf_config)
        architecture, model_class = resolve_architecture(getattr(hf_config, "architectures", None), f"{model_dir}/config.json")
        resolved_device = resolve_device(device)
        runner_type = resolve_runner_type(runner, task, is_pooling_checkpoint(model_dir, architecture))
        multimodal = _multimodal_config(architecture, runner_type, limit_mm_per_prompt, mm_processor_kwargs)
        if getattr(model_class, "takes_inputs_embeds", False):
            # Image embeddings are merged into a fresh tensor each step, not a persistent buffer.
            compilation = replace(compilation, cudagraph_mode=CUDAGraphMode.NONE)
        pooler_config, sentence_max_len = None, None
        if runner_type == "pooling":
            override = PoolerConfig.from_user(override_pooler_config)
            pooler_config = resolve_pooler_config(model_dir, architecture, override)
            sentence_max_len = sentence_max_seq_length(model_dir)
        elif architecture in POOLING_ONLY_ARCHITECTURES:
            raise ValueError(
                f"{architecture} is an encoder without an LM head: it cannot generate. Drop runner/task to use it "
                f"as a pooling model (embed, encode, score)"
            )
        elif override_pooler_config is not None:
            raise ValueError(
                f"override_pooler_config applies to pooling models, but {model_dir} runs as a generative model: "
                f"pass runner='pooling' to pool with it, or drop override_pooler_config"
            )
        text_config = hf_config.get_text_config()  # a vision-language config's language-model part
        model_max_len = derive_max_model_len(text_config, max_model_len, sentence_max_len)
        self.tokenizer = load_tokenizer(tokenizer, model_dir)
        gen_config = load_generation_config(generation_config, model_dir)
        model_config = ModelConfig(
            model=str(model_dir),
            tokenizer=str(tokenizer or model_dir),
            architecture=architecture,
            dtype=resolve_dtype(dtype, hf_config, resolved_device),
            max_model_len=model_max_len,
            hf_config=hf_config,
            generation_config=gen_config,
            eos_token_ids=collect_eos_token_ids(self.tokenizer, text_config, gen_config),
            runner_type=runner_type,
            pooler_config=pooler_config,
            multimodal=multimodal,
            quantization=quantization_method,
            load_format=load_format,
        )
        pooling = runner_type == "pooling"
        if pooling and max_num_batched_tokens is not None and max_num_batched_tokens < model_max_len:
            raise ValueError(
                f"max_num_batched_tokens={max_num_batched_tokens} is below max_model_len={model_max_len}, but a "
                f"pooling model runs each prompt whole in one forward: raise max_num_batched_tokens or lower max_model_len"
            )
        if max_num_batched_tokens is None:
            on_cpu = resolved_device.type == "cpu"
            max_num_batched_tokens = DEFAULT_MAX_NUM_BATCHED_TOKENS_CPU if on_cpu else DEFAULT_MAX_NUM_BATCHED_TOKENS_GPU
            if pooling:
                max_num_batched_tokens = max(max_num_batched_tokens, model_max_len)
        if max_num_batched_tokens < max_num_seqs:
            max_num_seqs = max_num_batched_tokens  # each running request needs a token of budget a step
        self.llm_engine_config = EngineConfig(
            model=model_config,
            cache=CacheConfig(
                block_size=block_size,
                gpu_memory_utilization=gpu_memory_utilization,
                num_gpu_blocks_override=num_gpu_blocks_override,
                enable_prefix_caching=enable_prefix_caching,
                cpu_kvcache_space_bytes=cpu_kvcache_space_bytes(),
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                async_scheduling=resolve_async_scheduling(
                    async_scheduling, resolved_device, getattr(model_class, "takes_inputs_embeds", False)
                ),
            ),
            device=resolved_device,
            compilation=compilation.eager() if enforce_eager else compilation,
            seed=seed,
            parallel=ParallelConfig(
                tensor_parallel_size, worker_multiproc_method(), disable_custom_all_reduce=bool(disable_custom_all_reduce)
            ),
        )
        # Images and videos are processed on the host before requests are queued; none when every limit is 0.
        self.mm_processor: MultiModalProcessor | None = None
        if multimodal is not None and multimodal.takes_any():
            self.mm_processor = MultiModalProcessor(model_dir, hf_config, multimodal)
        # A pooling model runs whole prompts without KV cache or scheduler: its own runner.
        self.llm_engine: LLMEngine | None = None
        self.pooling_runner: PoolingRunner | None = None
        self._workers: WorkerGroup | None = None
        if tensor_parallel_size > 1:
            check_tensor_parallel_support(self.llm_engine_config, pooling or multimodal is not None)
            # Workers start first and build their shards while rank 0 (this process) builds its own.
            self._workers = WorkerGroup(
                tensor_parallel_size, resolved_device.type, run_tensor_parallel_worker, self.llm_engine_config,
                self.llm_engine_config.parallel.worker_multiproc_method,
            )
        if pooling:
            self.pooling_runner = PoolingRunner(self.llm_engine_config)
        else:
            self.llm_engine = self._start_engine(self._workers.links if self._workers is not None else None)
        if self._workers is not None:
            weakref.finalize(self, stop_tensor_parallel, self.llm_engine.runner, self._workers)
        self._request_counter = itertools.count()

    def _with_worker_errors(self, function: Callable[..., Any], *args: Any) -> Any:
        """Call ``function``; where a tensor-parallel worker failed, raise its error (with its rank)."""
        try:
            return function(*args)
        except Exception as error:
            if self._workers is not None:
                self._workers.raise_worker_error(error)
            raise

    def _start_engine(self, links: Any) -> LLMEngine:
        """The engine; if it cannot start, the workers are shut down before the error propagates."""
        try:
            return self._with_worker_errors(LLMEngine, self.llm_engine_config, self.tokenizer, links)
        except BaseException:
            if self._workers is not None:
                self._workers.shutdown()
            raise

    @staticmethod
    def _reject_unknown_arguments(kwargs: dict[str, Any]) -> None:
        unknown = sorted(set(kwargs) - IGNORED_VLLM_ARGUMENTS)
        if unknown:
            raise TypeError(
                f"LLM() got unknown argument(s): {', '.join(unknown)}. Arguments vLLM accepts that fxllm "
                f"ignores: {', '.join(sorted(IGNORED_VLLM_ARGUMENTS))}"
            )
        if kwargs:
            warnings.warn(
                f"fxllm ignores these vLLM arguments: {', '.join(sorted(kwargs))}", UserWarning, stacklevel=3
            )

    # ---- public API -----------------------------------------------------------------

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def compile_report(self) -> CompileReport:
        """What the compiler did at start-up: pieces, ops per piece, compile time, cache use."""
        runner = self.pooling_runner if self.pooling_runner is not None else self.llm_engine.runner
        return runner.compile_report

    def save_sharded_state(self, path: str | Path) -> None:
        """Write each tensor-parallel rank's weights to ``path`` as model-rank-R-part-0.safetensors, so
        that ``LLM(model=path, load_format="sharded_state", tensor_parallel_size=N)`` reads one file a
        rank (tools/save_sharded_state.py also copies the config and tokenizer)."""
        if self.llm_engine is None:
            raise ValueError("save_sharded_state() needs a generative model")
        runner = self.llm_engine.runner
        if runner.step_sync is not None:
            self._with_worker_errors(runner.step_sync.send_save, str(path))
        runner.save_sharded_state(Path(path))
        if runner.step_sync is not None:
            runner.step_sync.barrier()

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams from the model's generation_config.json (vLLM's generation_config="auto")."""
        return SamplingParams.from_generation_config(self.llm_engine_config.model.generation_config)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete each prompt; outputs come back in input order."""
        self._require_runner("generate", "generate")
        prompt_list = as_prompt_list(prompts)
        params_list = self._sampling_params_list(sampling_params, len(prompt_list))
        processed = [self._process_prompt(prompt, index) for index, prompt in enumerate(prompt_list)]
        tokenized = [(text, token_ids) for text, token_ids, _ in processed]
        return self._generate_tokenized(tokenized, params_list, use_tqdm, [mm for _, _, mm in processed])

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, rendered with the chat template."""
        self._require_runner("generate", "chat")
        conversations = as_conversations(messages)
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be True")
        tokenized = []
        for index, conversation in enumerate(conversations):
            try:
                text = self.tokenizer.apply_chat_template(
                    conversation,
                    chat_template=chat_template,
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message,
                    tokenize=False,
                )
            except ValueError as error:
                raise ValueError(f"conversation {index}: cannot apply the chat template: {error}") from error
            # The template already holds the special tokens (BOS): do not add them twice.
            token_ids = self.tokenizer.encode(text, add_special_tokens=False)
            tokenized.append(self._check_prompt_ids(text, token_ids, index))
        params_list = self._sampling_params_list(sampling_params, len(tokenized))
        return self._generate_tokenized(tokenized, params_list, use_tqdm)

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams) -> list[BeamSearchOutput]:
        """vLLM's beam search: every step expands each beam by its 2 x beam_width most likely
        tokens and keeps the beam_width best by cumulative logprob (prefix caching shares the
        beams' common prefixes); finished beams are ranked with the length penalty."""
        self._require_runner("generate", "beam_search")
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        tokenized = [self._tokenize(prompt, index) for index, prompt in enumerate(as_prompt_list(prompts))]
        return run_beam_search(self, tokenized, params)

    def embed(self, prompts: PromptType | Sequence[PromptType], use_tqdm: bool = True) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt, pooled (and normalized) as the model's sentence-transformers
        config or ``override_pooler_config`` says; outputs in input order."""
        self._require_runner("pooling", "embed")
        return [
            EmbeddingRequestOutput(request_id, EmbeddingOutput(vector.tolist()), token_ids)
            for request_id, token_ids, vector in self._pool(as_prompt_list(prompts), use_tqdm)
        ]

    def encode(
        self, prompts: PromptType | Sequence[PromptType], pooling_task: str | None = None, use_tqdm: bool = True
    ) -> list[PoolingRequestOutput]:
        """The pooled vector of each prompt as a tensor (``outputs.data``); the task defaults to
        "embed" with a warning, as in vLLM."""
        self._require_runner("pooling", "encode")
        if pooling_task is None:
            warnings.warn(
                "LLM.encode() got no pooling_task and uses 'embed'; pass pooling_task='embed' or call LLM.embed()",
                UserWarning,
                stacklevel=2,
            )
            pooling_task = "embed"
        if pooling_task not in POOLING_TASKS:
            raise ValueError(f"pooling_task={pooling_task!r} is not supported; supported: {', '.join(POOLING_TASKS)}")
        return [
            PoolingRequestOutput(request_id, PoolingOutput(vector), token_ids)
            for request_id, token_ids, vector in self._pool(as_prompt_list(prompts), use_tqdm)
        ]

    def score(
        self,
        text_1: PromptType | Sequence[PromptType],
        text_2: PromptType | Sequence[PromptType],
        use_tqdm: bool = True,
    ) -> list[ScoringRequestOutput]:
        """Cosine similarity of the embeddings of each pair. As in vLLM, one text_1 is scored
        against every text_2 (1:N), and two lists of equal length pair up element-wise (N:N)."""
        self._require_runner("pooling", "score")
        first, second = as_prompt_list(text_1), as_prompt_list(text_2)
        if len(first) != 1 and len(first) != len(second):
            raise ValueError(
                f"score() pairs text_1 with text_2 1:1, 1:N or N:N, got {len(first)} and {len(second)} inputs: pass "
                f"one text_1 to score against every text_2, or two lists of the same length"
            )
        pooled = self._pool(first + second, use_tqdm)
        left, right = pooled[: len(first)], pooled[len(first) :]
        if len(left) == 1:
            left = left * len(right)
        return [
            ScoringRequestOutput(
                f"{left_id}_{right_id}",
                ScoringOutput(F.cosine_similarity(left_vector, right_vector, dim=0).item()),
                left_ids + right_ids,
            )
            for (left_id, left_ids, left_vector), (right_id, right_ids, right_vector) in zip(left, right)
        ]

    def _generate_tokenized(
        self,
        tokenized: list[tuple[str | None, list[int]]],
        params_list: list[SamplingParams],
        use_tqdm: bool,
        multimodal: list[MultiModalPrompt | None] | None = None,
    ) -> list[RequestOutput]:
        requests = []
        multimodal = multimodal or [None] * len(tokenized)
        for index, ((text, token_ids), params, mm) in enumerate(zip(tokenized, params_list, multimodal)):
            requests.extend(self._make_requests(text, token_ids, params, index, mm))
        return self._run(requests, len(tokenized), use_tqdm)

    # ---- internals ------------------------------------------------------------------

    def _require_runner(self, runner_type: str, method: str) -> None:
        model_config = self.llm_engine_config.model
        if model_config.runner_type == runner_type:
            return
        how_to_fix = (
            "load an embedding model, or pass runner='pooling' to pool a decoder's last token"
            if runner_type == "pooling"
            else "load a generative model (without runner='pooling')"
        )
        raise ValueError(
            f"LLM.{method}() needs a {_RUNNER_NOUNS[runner_type]} model, but {model_config.architecture} from "
            f"{model_config.model} runs as a {_RUNNER_NOUNS[model_config.runner_type]} model here, which supports "
            f"{_RUNNER_METHODS[model_config.runner_type]}: {how_to_fix}"
        )

    def _pool(self, prompts: list[PromptType], use_tqdm: bool) -> list[tuple[str, list[int], torch.Tensor]]:
        """(request id, prompt token ids, pooled vector) of each prompt, in input order. The whole
        call is validated before anything runs."""
        max_model_len = self.llm_engine_config.model.max_model_len
        token_lists = []
        for index, prompt in enumerate(prompts):
            _, token_ids = self._tokenize(prompt, index)
            if len(token_ids) > max_model_len:
                raise ValueError(
                    f"prompt {index} has {len(token_ids)} tokens but max_model_len is {max_model_len}: shorten it "
                    f"(or raise max_model_len, up to the model's limit)"
                )
            token_lists.append(token_ids)
        runner = self.pooling_runner
        assert runner is not None, "_require_runner('pooling', ...) comes first"
        vectors: list[torch.Tensor] = []
        with tqdm(total=len(token_lists), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True) as progress:
            for batch in runner.plan_batches([len(token_ids) for token_ids in token_lists]):
                vectors.extend(runner.execute([token_lists[i] for i in batch]).unbind(0))
                progress.update(len(batch))
        return [(str(next(self._request_counter)), ids, vector) for ids, vector in zip(token_lists, vectors)]

    def _sampling_params_list(
        self, sampling_params: SamplingParams | Sequence[SamplingParams] | None, num_prompts: int
    ) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.get_default_sampling_params()] * num_prompts
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num_prompts
        if not isinstance(sampling_params, (list, tuple)):
            raise TypeError(
                f"sampling_params must be a SamplingParams, a list of them or None, got {type(sampling_params).__name__}"
            )
        if len(sampling_params) != num_prompts:
            raise ValueError(
                f"got {len(sampling_params)} sampling_params for {num_prompts} prompts: pass one "
                f"SamplingParams, or a list with one per prompt"
            )
        for index, params in enumerate(sampling_params):
            if not isinstance(params, SamplingParams):
                raise TypeError(f"sampling_params[{index}] must be a SamplingParams, got {type(params).__name__}")
        return list(sampling_params)

    def _make_requests(
        self,
        text: str | None,
        token_ids: list[int],
        params: SamplingParams,
        index: int,
        multimodal: MultiModalPrompt | None = None,
    ) -> list[Request]:
        """The ``n`` requests of one prompt, validated against this model."""
        model_config = self.llm_engine_config.model
        max_model_len = model_config.max_model_len
        if len(token_ids) >= max_model_len:
            raise ValueError(
                f"prompt {index} has {len(token_ids)} tokens but max_model_len is {max_model_len}; a prompt must "
                f"leave room for at least one generated token: shorten it or raise max_model_len"
            )
        bad_ids = [t for t in params.token_ids_to_check() if not 0 <= t < model_config.vocab_size]
        if bad_ids:
            raise ValueError(
                f"sampling params of prompt {index} name token ids {bad_ids[:5]} outside the vocabulary "
                f"[0, {model_config.vocab_size})"
            )
        room = max_model_len - len(token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(model_config.eos_token_ids)
        bad_word_ids = tokenize_bad_words(self.tokenizer, params.bad_words or [])
        requests = []
        for completion in range(params.n):
            generator = None
            if params.seed is not None:
                # Each of the n completions gets its own stream, derived from the seed.
                generator = torch.Generator(device=self.llm_engine_config.device)
                generator.manual_seed(params.seed + completion)
            detokenizer = (
                IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens) if params.detokenize else None
            )
            requests.append(
                Request(
                    request_id=str(next(self._request_counter)),
                    prompt=text,
                    prompt_token_ids=token_ids,
                    sampling_params=params,
                    max_tokens=max_tokens,
                    stop_token_ids=frozenset(stop_ids),
                    detokenizer=detokenizer,
                    generator=generator,
                    prompt_index=index,
                    completion_index=completion,
                    bad_word_ids=bad_word_ids,
                    multimodal=multimodal,
                )
            )
        return requests

    def _process_prompt(self, prompt: PromptType, index: int) -> tuple[str | None, list[int], MultiModalPrompt | None]:
        """Tokens of a prompt; with ``multi_modal_data``, its images processed and their placeholders expanded."""
        if not (isinstance(prompt, dict) and "multi_modal_data" in prompt):
            return (*self._tokenize(prompt, index), None)
        text, token_ids = self._tokenize({k: v for k, v in prompt.items() if k != "multi_modal_data"}, index)
        data = prompt["multi_modal_data"]
        multimodal = self.llm_engine_config.model.multimodal
        if multimodal is None:
            raise ValueError(
                f"prompt {index} has multi_modal_data but {self.llm_engine_config.model.architecture} is a text-only "
                f"model: load a vision-language model (e.g. Qwen2VLForConditionalGeneration) to pass images"
            )
        if self.mm_processor is None:
            check_mm_data(data, multimodal, index)  # raises unless it holds no items
            return text, token_ids, None
        processed = self.mm_processor.process(token_ids, data, index)
        return text, processed.token_ids, processed

    def _tokenize(self, prompt: PromptType, index: int) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict) and "multi_modal_data" in prompt:
            raise ValueError(f"prompt {index}: multi_modal_data is supported by generate() only")
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, token_ids = prompt.get("prompt"), prompt["prompt_token_ids"]
            if not isinstance(token_ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in token_ids
            ):
                raise TypeError(f"prompt {index}: prompt_token_ids must be a list of ints")
            token_ids = list(token_ids)
        elif isinstance(prompt, dict) and "prompt" in prompt:
            if not isinstance(prompt["prompt"], str):
                raise TypeError(f"prompt {index}: 'prompt' must be a string, got {type(prompt['prompt']).__name__}")
            text, token_ids = prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        else:
            raise TypeError(
                f"prompt {index} must be a string, {{'prompt': str}} or {{'prompt_token_ids': [int, ...]}}, "
                f"got {type(prompt).__name__}"
            )
        return self._check_prompt_ids(text, token_ids, index)

    def _check_prompt_ids(self, text: str | None, token_ids: list[int], index: int) -> tuple[str | None, list[int]]:
        if not token_ids:
            raise ValueError(f"prompt {index} is empty; give at least one token")
        vocab_size = self.llm_engine_config.model.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {index}: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
        return text, token_ids

    def _run(self, requests: list[Request], num_prompts: int, use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        for request in requests:
            engine.add_request(request)
        progress = tqdm(total=len(requests), desc="Processed requests", disable=not use_tqdm, dynamic_ncols=True)
        start = time.perf_counter()
        try:
            num_output_tokens = 0
            while engine.has_unfinished():
                for request in self._with_worker_errors(engine.step):
                    num_output_tokens += len(request.output_token_ids)
                    progress.update(1)
                    elapsed = time.perf_counter() - start
                    progress.set_postfix_str(f"output {num_output_tokens / max(elapsed, 1e-9):.1f} tok/s", refresh=False)
        except BaseException:
            engine.abort(requests)  # never leave a half-run call's requests holding blocks
            raise
        finally:
            progress.close()
        by_prompt: list[list[Request]] = [[] for _ in range(num_prompts)]
        for request in requests:
            by_prompt[request.prompt_index].append(request)
        return [_request_output(group) for group in by_prompt]


def _request_output(requests: list[Request]) -> RequestOutput:
    """One prompt's output: its n completions in index order."""
    completions = [
        CompletionOutput(
            index=request.completion_index,
            text=request.text,
            token_ids=list(request.output_token_ids),
            cumulative_logprob=request.cumulative_logprob,
            logprobs=request.logprobs,
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
        )
        for request in requests
    ]
    first = requests[0]
    return RequestOutput(
        request_id=first.request_id,
        prompt=first.prompt,
        prompt_token_ids=first.prompt_token_ids,
        outputs=completions,
        finished=True,
        prompt_logprobs=first.prompt_logprobs,
    )


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
