"""``LLM``: vLLM's offline API, a thin face over the engine.

Arguments become an ``EngineConfig`` (engine_args.py), prompts become requests
(runtime/input_processor.py), the engine runs them (runtime/engine.py) and finished
requests become outputs (runtime/output_processor.py). Every call is validated whole
before anything is queued.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch.nn.functional as F

from fxllm.beam_search import run_beam_search
from fxllm.compiler import CompileReport
from fxllm.config import EngineConfig
from fxllm.engine_args import EngineArgs
from fxllm.inputs import PromptType, as_conversations, as_prompt_list
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
from fxllm.runtime.input_processor import InputProcessor, load_tokenizer
from fxllm.runtime.output_processor import request_outputs
from fxllm.runtime.pooling_engine import PoolingEngine
from fxllm.sampling_params import BeamSearchParams, SamplingParams

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
        "served_model_name",
    }
)

# What each kind of model serves.
_RUNNER_METHODS = {"generate": "generate(), chat() and beam_search()", "pooling": "embed(), encode() and score()"}
_RUNNER_NOUNS = {"generate": "generative", "pooling": "pooling"}
POOLING_TASKS = ("embed",)
_ENGINE_ARGUMENTS = frozenset(field.name for field in dataclasses.fields(EngineArgs))


class LLM:
    """An offline engine over one model: ``LLM(model=...).generate(prompts, SamplingParams(...))``.

    Takes the arguments of ``EngineArgs`` (vLLM's names and defaults)."""

    def __init__(self, model: str | None = None, **kwargs: Any):
        self._reject_unknown_arguments(kwargs)
        engine_args = EngineArgs(model=model, **{k: v for k, v in kwargs.items() if k in _ENGINE_ARGUMENTS})
        self.llm_engine_config: EngineConfig = engine_args.create_engine_config()
        model_config = self.llm_engine_config.model
        self.tokenizer = load_tokenizer(model_config.tokenizer)
        self.input_processor = InputProcessor(self.llm_engine_config, self.tokenizer)
        # A pooling model runs whole prompts without KV cache or scheduler: an engine of its own.
        engine_class = PoolingEngine if model_config.runner_type == "pooling" else LLMEngine
        self.llm_engine: LLMEngine | PoolingEngine = engine_class(self.llm_engine_config, self.tokenizer)

    @staticmethod
    def _reject_unknown_arguments(kwargs: dict[str, Any]) -> None:
        ignored = set(kwargs) - _ENGINE_ARGUMENTS
        unknown = sorted(ignored - IGNORED_VLLM_ARGUMENTS)
        if unknown:
            raise TypeError(
                f"LLM() got unknown argument(s): {', '.join(unknown)}. Arguments vLLM accepts that fxllm "
                f"ignores: {', '.join(sorted(IGNORED_VLLM_ARGUMENTS))}"
            )
        if ignored:
            warnings.warn(f"fxllm ignores these vLLM arguments: {', '.join(sorted(ignored))}", UserWarning, stacklevel=3)

    # ---- engine ----------------------------------------------------------------------

    @property
    def mm_processor(self):
        return self.input_processor.mm_processor

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def compile_report(self) -> CompileReport:
        """What the compiler did at start-up: pieces, ops per piece, compile time, cache use."""
        return self.llm_engine.compile_report

    def collective_rpc(self, method: Any, args: tuple = (), kwargs: dict[str, Any] | None = None) -> list[Any]:
        """Run a ``ModelRunner`` method (by name), or ``method(runner, *args, **kwargs)``, on every
        rank of the engine; the results in rank order (vLLM's ``collective_rpc``)."""
        self._require_runner("generate", "collective_rpc")
        return self.llm_engine.collective_rpc(method, args, kwargs)

    def save_sharded_state(self, path: str | Path) -> None:
        """Write each tensor-parallel rank's weights to ``path`` as model-rank-R-part-0.safetensors, so
        that ``LLM(model=path, load_format="sharded_state", tensor_parallel_size=N)`` reads one file a
        rank (tools/save_sharded_state.py also copies the config and tokenizer)."""
        if self.llm_engine_config.model.runner_type != "generate":
            raise ValueError("save_sharded_state() needs a generative model")
        self.llm_engine.collective_rpc("save_sharded_state", (Path(path),))

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams from the model's generation_config.json (vLLM's generation_config="auto")."""
        return self.input_processor.default_sampling_params()

    # ---- generation ------------------------------------------------------------------

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: UseTqdm = True,
    ) -> list[RequestOutput]:
        """Complete each prompt; outputs come back in input order."""
        self._require_runner("generate", "generate")
        prompt_list = as_prompt_list(prompts)
        params_list = self.input_processor.sampling_params_list(sampling_params, len(prompt_list))
        processed = [self.input_processor.process_prompt(prompt, index) for index, prompt in enumerate(prompt_list)]
        return self._run(processed, params_list, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: UseTqdm = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, rendered with the chat template."""
        self._require_runner("generate", "chat")
        conversations = as_conversations(messages)
        processed = self.input_processor.render_chat(
            conversations, chat_template, add_generation_prompt, continue_final_message
        )
        params_list = self.input_processor.sampling_params_list(sampling_params, len(processed))
        return self._run(processed, params_list, use_tqdm)

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams) -> list[BeamSearchOutput]:
        """vLLM's beam search: every step expands each beam by its 2 x beam_width most likely
        tokens and keeps the beam_width best by cumulative logprob (prefix caching shares the
        beams' common prefixes); finished beams are ranked with the length penalty."""
        self._require_runner("generate", "beam_search")
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        processed = [self.input_processor.tokenize(prompt, index) for index, prompt in enumerate(as_prompt_list(prompts))]
        return run_beam_search(self.llm_engine, self.input_processor, processed, params)

    def _run(self, processed, params_list: list[SamplingParams], use_tqdm: UseTqdm) -> list[RequestOutput]:
        requests = self.input_processor.make_requests(processed, params_list)
        self.llm_engine.run(requests, use_tqdm)
        return request_outputs(requests, len(processed), self.tokenizer)

    # ---- pooling ---------------------------------------------------------------------

    def embed(self, prompts: PromptType | Sequence[PromptType], use_tqdm: UseTqdm = True) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt, pooled (and normalized) as the model's sentence-transformers
        config or ``override_pooler_config`` says; outputs in input order."""
        self._require_runner("pooling", "embed")
        return [
            EmbeddingRequestOutput(request_id, EmbeddingOutput(vector.tolist()), token_ids)
            for request_id, token_ids, vector in self._pool(as_prompt_list(prompts), use_tqdm)
        ]

    def encode(
        self, prompts: PromptType | Sequence[PromptType], pooling_task: str | None = None, use_tqdm: UseTqdm = True
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
        use_tqdm: UseTqdm = True,
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

    def _pool(self, prompts: list[PromptType], use_tqdm: UseTqdm) -> list[tuple[str, list[int], Any]]:
        """(request id, prompt token ids, pooled vector) of each prompt, in input order. The whole
        call is validated before anything runs."""
        max_model_len = self.llm_engine_config.model.max_model_len
        token_lists = []
        for index, prompt in enumerate(prompts):
            token_ids = self.input_processor.tokenize(prompt, index).token_ids
            if len(token_ids) > max_model_len:
                raise ValueError(
                    f"prompt {index} has {len(token_ids)} tokens but max_model_len is {max_model_len}: shorten it "
                    f"(or raise max_model_len, up to the model's limit)"
                )
            token_lists.append(token_ids)
        vectors = self.llm_engine.pool(token_lists, use_tqdm)
        return [(self.input_processor.next_request_id(), ids, vector) for ids, vector in zip(token_lists, vectors)]

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
