"""Prompts, conversations and sampling params -> validated ``Request``s.

A whole call is processed before anything is queued: any bad prompt or parameter is an
error naming its index, and the engine never sees half a call.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from fxllm.config import EngineConfig
from fxllm.inputs import PromptType
from fxllm.runtime.detokenizer import IncrementalDetokenizer
from fxllm.runtime.multimodal.inputs import MultiModalPrompt
from fxllm.runtime.multimodal.processor import MultiModalProcessor, check_mm_data
from fxllm.runtime.request import Request
from fxllm.sampling_params import SamplingParams


@dataclass
class ProcessedPrompt:
    text: str | None
    token_ids: list[int]
    multimodal: MultiModalPrompt | None = None  # images, videos and M-RoPE positions


def load_tokenizer(source: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        # fxllm runs no code from checkpoints: a config.json with auto_map (InternLM2, InternVL)
        # must not make transformers ask whether to import it.
        return AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"could not load a tokenizer from {source}: {error}") from error


def collect_eos_token_ids(tokenizer: Any, hf_config: Any, generation_config: dict) -> tuple[int, ...]:
    """EOS ids from the tokenizer, config.json and generation_config.json (each may be a list)."""
    ids: set[int] = set()
    for value in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(hf_config, "eos_token_id", None),
        generation_config.get("eos_token_id"),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return tuple(sorted(ids))


def tokenize_bad_words(tokenizer: Any, bad_words: list[str]) -> list[list[int]]:
    """Token sequences of each bad word, as it would appear mid-text and at the start
    (with and without a leading space), as vLLM does."""
    sequences: list[list[int]] = []
    for word in bad_words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids and ids not in sequences:
                sequences.append(ids)
    return sequences


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer: Any):
        self.config = config
        self.tokenizer = tokenizer
        model_config = config.model
        self.vocab_size = model_config.vocab_size
        self.max_model_len = model_config.max_model_len
        text_config = model_config.hf_config.get_text_config()
        self.eos_token_ids = collect_eos_token_ids(tokenizer, text_config, model_config.generation_config)
        # Images and videos are processed on the host before requests are queued; none when every limit is 0.
        multimodal = model_config.multimodal
        self.mm_processor: MultiModalProcessor | None = None
        if multimodal is not None and multimodal.takes_any():
            self.mm_processor = MultiModalProcessor(Path(model_config.model), model_config.hf_config, multimodal, tokenizer)
        self._request_counter = itertools.count()

    def next_request_id(self) -> str:
        return str(next(self._request_counter))

    # ---- prompts ------------------------------------------------------------------------

    def process_prompt(self, prompt: PromptType, index: int) -> ProcessedPrompt:
        """Tokens of a prompt; with ``multi_modal_data``, its images processed and their placeholders expanded."""
        if not (isinstance(prompt, dict) and "multi_modal_data" in prompt):
            return self.tokenize(prompt, index)
        processed = self.tokenize({k: v for k, v in prompt.items() if k != "multi_modal_data"}, index)
        data = prompt["multi_modal_data"]
        multimodal = self.config.model.multimodal
        if multimodal is None:
            raise ValueError(
                f"prompt {index} has multi_modal_data but {self.config.model.architecture} is a text-only "
                f"model: load a vision-language model (e.g. Qwen2VLForConditionalGeneration) to pass images"
            )
        if self.mm_processor is None:
            check_mm_data(data, multimodal, index)  # raises unless it holds no items
            return processed
        mm_prompt = self.mm_processor.process(processed.token_ids, data, index, processed.text)
        return ProcessedPrompt(processed.text, mm_prompt.token_ids, mm_prompt)

    def tokenize(self, prompt: PromptType, index: int) -> ProcessedPrompt:
        """A text-only prompt's tokens, checked against the vocabulary."""
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
        return self.checked(text, token_ids, index)

    def checked(self, text: str | None, token_ids: list[int], index: int) -> ProcessedPrompt:
        if not token_ids:
            raise ValueError(f"prompt {index} is empty; give at least one token")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt {index}: token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return ProcessedPrompt(text, token_ids)

    def render_chat(
        self,
        conversations: list[list[dict[str, Any]]],
        chat_template: str | None,
        add_generation_prompt: bool,
        continue_final_message: bool,
    ) -> list[ProcessedPrompt]:
        """Each conversation rendered with the chat template, then tokenized."""
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be True")
        processed = []
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
            processed.append(self.checked(text, token_ids, index))
        return processed

    # ---- sampling params ----------------------------------------------------------------

    def sampling_params_list(
        self, sampling_params: SamplingParams | Sequence[SamplingParams] | None, num_prompts: int
    ) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.default_sampling_params()] * num_prompts
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

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams from the model's generation_config.json (vLLM's generation_config="auto")."""
        return SamplingParams.from_generation_config(self.config.model.generation_config)

    # ---- requests -----------------------------------------------------------------------

    def make_requests(self, prompts: list[ProcessedPrompt], params_list: list[SamplingParams]) -> list[Request]:
        """The requests of a whole call, every one validated before any is returned."""
        requests = []
        for index, (prompt, params) in enumerate(zip(prompts, params_list)):
            requests.extend(self._requests_of(prompt, params, index))
        return requests

    def _requests_of(self, prompt: ProcessedPrompt, params: SamplingParams, index: int) -> list[Request]:
        """The ``n`` requests of one prompt, validated against this model."""
        token_ids, max_model_len = prompt.token_ids, self.max_model_len
        if len(token_ids) >= max_model_len:
            raise ValueError(
                f"prompt {index} has {len(token_ids)} tokens but max_model_len is {max_model_len}; a prompt must "
                f"leave room for at least one generated token: shorten it or raise max_model_len"
            )
        bad_ids = [t for t in params.token_ids_to_check() if not 0 <= t < self.vocab_size]
        if bad_ids:
            raise ValueError(
                f"sampling params of prompt {index} name token ids {bad_ids[:5]} outside the vocabulary "
                f"[0, {self.vocab_size})"
            )
        room = max_model_len - len(token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.eos_token_ids)
        bad_word_ids = tokenize_bad_words(self.tokenizer, params.bad_words or [])
        requests = []
        for completion in range(params.n):
            generator = None
            if params.seed is not None:
                # Each of the n completions gets its own stream, derived from the seed.
                generator = torch.Generator(device=self.config.device)
                generator.manual_seed(params.seed + completion)
            detokenizer = (
                IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens) if params.detokenize else None
            )
            requests.append(
                Request(
                    request_id=self.next_request_id(),
                    prompt=prompt.text,
                    prompt_token_ids=token_ids,
                    sampling_params=params,
                    max_tokens=max_tokens,
                    stop_token_ids=frozenset(stop_ids),
                    detokenizer=detokenizer,
                    generator=generator,
                    prompt_index=index,
                    completion_index=completion,
                    bad_word_ids=bad_word_ids,
                    multimodal=prompt.multimodal,
                )
            )
        return requests
