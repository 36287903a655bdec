"""``LLM``: vLLM's offline API, a thin face over the engine.

Arguments become an ``EngineConfig`` (engine_args.py), prompts become requests
(runtime/input_processor.py), the engine runs them (runtime/engine.py) and finished
requests become outputs (runtime/output_processor.py). Every call is validated whole
before anything is queued. One ``LLM`` serves one call at a time: calls from several
threads take turns (a lock), each getting its own complete outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch.nn.functional as F

from fxllm.beam_search import run_beam_search
from fxllm.compiler import CompileReport
from fxllm.config import EngineConfig
from fxllm.engine_arg_support import NO_EFFECT, known_argument
from fxllm.engine_args import ENGINE_ARGUMENTS, EngineArgs
from fxllm.inputs import PromptType, as_conversations, as_prompt_list
from fxllm.metrics import Metric
from fxllm.outputs import (
    BeamSearchOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    PoolingOutput,
    PoolingRequestOutput,
    RequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from fxllm.runtime.engine import LLMEngine, UseTqdm
from fxllm.runtime.input_processor import InputProcessor, ProcessedPrompt, load_tokenizer
from fxllm.runtime.output_processor import request_outputs
from fxllm.runtime.pooling_engine import PoolingEngine
from fxllm.runtime.request import Request
from fxllm.sampling_params import BeamSearchParams, SamplingParams

# What each kind of model serves.
_RUNNER_METHODS = {"generate": "generate(), chat() and beam_search()", "pooling": "embed(), encode() and score()"}
_RUNNER_NOUNS = {"generate": "generative", "pooling": "pooling"}
POOLING_TASKS = ("embed",)


def _one_call_at_a_time(method: Callable) -> Callable:
    @functools.wraps(method)
    def serialized(self: "LLM", *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return serialized


class LLM:
    """An offline engine over one model: ``LLM(model=...).generate(prompts, SamplingParams(...))``.

    Takes every argument of ``EngineArgs`` (vLLM's names and defaults)."""

    def __init__(self, model: str | None = None, **kwargs: Any):
        self._lock = threading.RLock()
        self._enqueued: list[tuple[list[Request], int]] = []
        self.llm_engine_config: EngineConfig = _engine_args(model, kwargs).create_engine_config()
        model_config = self.llm_engine_config.model
        self.tokenizer = None if model_config.skip_tokenizer_init else load_tokenizer(model_config.tokenizer)
        self.input_processor = InputProcessor(self.llm_engine_config, self.tokenizer)
        # A pooling model runs whole prompts without KV cache or scheduler: an engine of its own.
        engine_class = PoolingEngine if model_config.runner_type == "pooling" else LLMEngine
        self.llm_engine: LLMEngine | PoolingEngine = engine_class(self.llm_engine_config, self.tokenizer)

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> "LLM":
        return cls(**dataclasses.asdict(engine_args))

    # ---- engine ----------------------------------------------------------------------

    @property
    def model_config(self):
        return self.llm_engine_config.model

    @property
    def mm_processor(self):
        return self.input_processor.mm_processor

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def get_world_size(self, include_dp: bool = True) -> int:
        return self.llm_engine_config.parallel.tensor_parallel_size

    def compile_report(self) -> CompileReport:
        """What the compiler did at start-up: pieces, ops per piece, compile time, cache use."""
        return self.llm_engine.compile_report

    @_one_call_at_a_time
    def collective_rpc(
        self, method: str | Callable[..., Any], timeout: float | None = None, args: tuple = (),
        kwargs: dict[str, Any] | None = None,
    ) -> list[Any]:
        """Run a ``ModelRunner`` method (by name), or ``method(runner, *args, **kwargs)``, on every
        rank of the engine; the results in rank order (vLLM's ``collective_rpc``)."""
        self._require_runner("generate", "collective_rpc")
        return self.llm_engine.collective_rpc(method, args, kwargs)

    def apply_model(self, func: Callable[[Any], Any]) -> list[Any]:
        """``func(model)`` on every rank's model; the results in rank order."""
        return self.collective_rpc(_apply_to_model, args=(func,))

    @_one_call_at_a_time
    def save_sharded_state(self, path: str | Path) -> None:
        """Write each tensor-parallel rank's weights to ``path`` as model-rank-R-part-0.safetensors, so
        that ``LLM(model=path, load_format="sharded_state", tensor_parallel_size=N)`` reads one file a
        rank (tools/save_sharded_state.py also copies the config and tokenizer)."""
        self._require_runner("generate", "save_sharded_state")
        self.llm_engine.collective_rpc("save_sharded_state", (Path(path),))

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams from the model's generation_config.json (vLLM's generation_config="auto")."""
        return self.input_processor.default_sampling_params()

    @_one_call_at_a_time
    def get_metrics(self) -> list[Metric]:
        """vLLM's counters, gauges and histograms (``fxllm.v1.metrics.reader`` types)."""
        self._require_runner("generate", "get_metrics")
        return self.llm_engine.get_metrics()

    @_one_call_at_a_time
    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        """Forget every cached prefix block (requests keep their own); False when some are in use."""
        self._require_runner("generate", "reset_prefix_cache")
        return self.llm_engine.reset_prefix_cache()

    @_one_call_at_a_time
    def reset_mm_cache(self) -> None:
        """Drop the processed images and videos kept for reuse."""
        if self.input_processor.mm_processor is not None:
            self.input_processor.mm_processor.clear_cache()

    @_one_call_at_a_time
    def start_profile(self, profile_prefix: str | None = None) -> None:
        """Profile the engine's steps with the torch profiler until ``stop_profile()``, into
        ``profiler_config``'s ``torch_profiler_dir`` (or ``FXLLM_TORCH_PROFILER_DIR``)."""
        self._require_runner("generate", "start_profile")
        self.llm_engine.start_profile(profile_prefix)

    @_one_call_at_a_time
    def stop_profile(self) -> None:
        self._require_runner("generate", "stop_profile")
        self.llm_engine.stop_profile()

    # ---- generation ------------------------------------------------------------------

    @_one_call_at_a_time
    def generate(
        self,
        prompts: PromptType | Sequence[PromptType] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: UseTqdm = True,
        lora_request: Any = None,
        priority: list[int] | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        prompt_token_ids: list[int] | list[list[int]] | None = None,
    ) -> list[RequestOutput]:
        """Complete each prompt; outputs come back in input order. ``prompt_token_ids`` is vLLM's
        older spelling of token-id prompts."""
        self._require_runner("generate", "generate")
        requests, num_prompts = self._completion_requests(
            prompts, sampling_params, lora_request, priority, tokenization_kwargs, mm_processor_kwargs, prompt_token_ids
        )
        return self._run(requests, num_prompts, use_tqdm)

    @_one_call_at_a_time
    def enqueue(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: Any = None,
        priority: list[int] | None = None,
        use_tqdm: UseTqdm = True,
        tokenization_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[str]:
        """Queue prompts without running them; ``wait_for_completion()`` runs every queued one."""
        self._require_runner("generate", "enqueue")
        requests, num_prompts = self._completion_requests(
            prompts, sampling_params, lora_request, priority, tokenization_kwargs, mm_processor_kwargs, None
        )
        self._enqueued.append((requests, num_prompts))
        return [request.request_id for request in requests if request.completion_index == 0]

    @_one_call_at_a_time
    def wait_for_completion(self, output_type: Any = None, *, use_tqdm: UseTqdm = True) -> list[RequestOutput]:
        """Run everything ``enqueue()`` queued; the outputs of every enqueued prompt, in order."""
        self._require_runner("generate", "wait_for_completion")
        batches, self._enqueued = self._enqueued, []
        requests = [request for batch, _ in batches for request in batch]
        self.llm_engine.run(requests, use_tqdm)
        return [output for batch, count in batches for output in request_outputs(batch, count, self.tokenizer)]

    @_one_call_at_a_time
    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: UseTqdm = True,
        lora_request: Any = None,
        chat_template: str | None = None,
        chat_template_content_format: str = "auto",
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, rendered with the chat template."""
        self._require_runner("generate", "chat")
        processor = self.input_processor
        options = processor.call_options(lora_request, None, tokenization_kwargs, mm_processor_kwargs)
        processed = processor.render_chat(
            as_conversations(messages), chat_template, add_generation_prompt, continue_final_message,
            chat_template_content_format, chat_template_kwargs, tools,
        )
        params_list = processor.sampling_params_list(sampling_params, len(processed))
        requests = processor.make_requests(processed, params_list, options)
        return self._run(requests, len(processed), use_tqdm)

    @_one_call_at_a_time
    def beam_search(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: BeamSearchParams,
        lora_request: Any = None,
        use_tqdm: bool = False,
        concurrency_limit: int | None = None,
    ) -> list[BeamSearchOutput]:
        """vLLM's beam search: every step expands each beam by its 2 x beam_width most likely
        tokens and keeps the beam_width best by cumulative logprob (prefix caching shares the
        beams' common prefixes); finished beams are ranked with the length penalty."""
        self._require_runner("generate", "beam_search")
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        self.input_processor.call_options(lora_request, None, None, None)
        processed = [self.input_processor.tokenize(prompt, index) for index, prompt in enumerate(as_prompt_list(prompts))]
        return run_beam_search(self.llm_engine, self.input_processor, processed, params, concurrency_limit)

    def _completion_requests(
        self, prompts, sampling_params, lora_request, priority, tokenization_kwargs, mm_processor_kwargs,
        prompt_token_ids,
    ) -> tuple[list[Request], int]:
        """Every request of a generate()/enqueue() call, validated whole."""
        if prompt_token_ids is not None:
            if prompts is not None:
                raise ValueError("pass prompts or prompt_token_ids, not both")
            prompts = as_prompt_list(prompt_token_ids)
        if prompts is None:
            raise ValueError("generate() needs prompts")
        processor = self.input_processor
        prompt_list = as_prompt_list(prompts)
        options = processor.call_options(lora_request, priority, tokenization_kwargs, mm_processor_kwargs, len(prompt_list))
        params_list = processor.sampling_params_list(sampling_params, len(prompt_list))
        processed: list[ProcessedPrompt] = [
            processor.process_prompt(prompt, index, options.add_special_tokens) for index, prompt in enumerate(prompt_list)
        ]
        return processor.make_requests(processed, params_list, options), len(processed)

    def _run(self, requests: list[Request], num_prompts: int, use_tqdm: UseTqdm) -> list[RequestOutput]:
        self.llm_engine.run(requests, use_tqdm)
        return request_outputs(requests, num_prompts, self.tokenizer)

    # ---- pooling ---------------------------------------------------------------------

    @_one_call_at_a_time
    def embed(
        self, prompts: PromptType | Sequence[PromptType], use_tqdm: UseTqdm = True, pooling_params: Any = None,
        lora_request: Any = None, tokenization_kwargs: dict[str, Any] | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt, pooled (and normalized) as the model's sentence-transformers
        config or ``pooler_config`` says; outputs in input order."""
        self._require_runner("pooling", "embed")
        return [
            EmbeddingRequestOutput(request_id, EmbeddingOutput(vector.tolist()), token_ids)
            for request_id, token_ids, vector in self._pool(as_prompt_list(prompts), use_tqdm, lora_request, tokenization_kwargs)
        ]

    @_one_call_at_a_time
    def encode(
        self, prompts: PromptType | Sequence[PromptType], pooling_params: Any = None, use_tqdm: UseTqdm = True,
        lora_request: Any = None, pooling_task: str | None = None, tokenization_kwargs: dict[str, Any] | None = None,
    ) -> list[PoolingRequestOutput]:
        """The pooled vector of each prompt as a tensor (``outputs.data``); the task defaults to
        "embed" with a warning, as in vLLM."""
        self._require_runner("pooling", "encode")
        if pooling_task is None:
            warnings.warn(
                "LLM.encode() got no pooling_task and uses 'embed'; pass pooling_task='embed' or call LLM.embed()",
                UserWarning,
                stacklevel=3,
            )
            pooling_task = "embed"
        if pooling_task not in POOLING_TASKS:
            raise ValueError(f"pooling_task={pooling_task!r} is not supported; supported: {', '.join(POOLING_TASKS)}")
        return [
            PoolingRequestOutput(request_id, PoolingOutput(vector), token_ids)
            for request_id, token_ids, vector in self._pool(as_prompt_list(prompts), use_tqdm, lora_request, tokenization_kwargs)
        ]

    @_one_call_at_a_time
    def score(
        self,
        text_1: PromptType | Sequence[PromptType],
        text_2: PromptType | Sequence[PromptType],
        use_tqdm: UseTqdm = True,
        pooling_params: Any = None,
        lora_request: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
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
        pooled = self._pool(first + second, use_tqdm, lora_request, tokenization_kwargs)
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

    def _pool(
        self, prompts: list[PromptType], use_tqdm: UseTqdm, lora_request: Any, tokenization_kwargs: dict | None
    ) -> list[tuple[str, list[int], Any]]:
        """(request id, prompt token ids, pooled vector) of each prompt, in input order. The whole
        call is validated before anything runs."""
        processor = self.input_processor
        options = processor.call_options(lora_request, None, tokenization_kwargs, None, len(prompts))
        max_model_len = self.llm_engine_config.model.max_model_len
        token_lists = []
        for index, prompt in enumerate(prompts):
            token_ids = processor.tokenize(prompt, index, options.add_special_tokens).token_ids
            if options.truncate_prompt_tokens is not None:
                keep = max_model_len if options.truncate_prompt_tokens == -1 else options.truncate_prompt_tokens
                token_ids = token_ids[-keep:]
            if len(token_ids) > max_model_len:
                raise ValueError(
                    f"prompt {index} has {len(token_ids)} tokens but max_model_len is {max_model_len}: shorten it "
                    f"(or raise max_model_len, up to the model's limit)"
                )
            token_lists.append(token_ids)
        vectors = self.llm_engine.pool(token_lists, use_tqdm)
        return [(processor.next_request_id(), ids, vector) for ids, vector in zip(token_lists, vectors)]

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


def _engine_args(model: str | None, kwargs: dict[str, Any]) -> EngineArgs:
    """``EngineArgs`` of ``LLM(...)``'s arguments: unknown names are an error; vLLM names of
    releases before the ones listed, that change nothing here, warn."""
    unknown = sorted(name for name in kwargs if not known_argument(name))
    if unknown:
        raise TypeError(
            f"LLM() got unknown argument(s): {', '.join(unknown)}; it takes vLLM's engine arguments "
            f"(fxllm.EngineArgs lists them)"
        )
    older = sorted(name for name in kwargs if name not in ENGINE_ARGUMENTS)
    if older:
        warnings.warn(
            f"these vLLM arguments change nothing in fxllm: {'; '.join(f'{n} ({NO_EFFECT[n]})' for n in older)}",
            UserWarning,
            stacklevel=3,
        )
    return EngineArgs(model=model, **{name: value for name, value in kwargs.items() if name in ENGINE_ARGUMENTS})


def _apply_to_model(runner: Any, func: Callable[[Any], Any]) -> Any:
    return func(runner.model)
