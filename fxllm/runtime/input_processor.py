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
from fxllm.runtime.chat import CONTENT_FORMATS, render_conversation
from fxllm.runtime.detokenizer import IncrementalDetokenizer
from fxllm.runtime.logits_processors import validate_request_params
from fxllm.runtime.multimodal.inputs import MultiModalPrompt
from fxllm.runtime.multimodal.processor import MultiModalProcessor, check_mm_data
from fxllm.runtime.request import Request
from fxllm.runtime.structured_outputs.compiler import GrammarCompiler
from fxllm.runtime.structured_outputs.matcher import RequestGrammar
from fxllm.sampling_params import ALL_LOGPROBS, SamplingParams
from fxllm.validation import check_bool, check_int


@dataclass
class ProcessedPrompt:
    text: str | None
    token_ids: list[int]
    multimodal: MultiModalPrompt | None = None  # images, videos and M-RoPE positions
    cache_salt: str | None = None  # prompts of different salts never share prefix-cache blocks


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


# tokenization_kwargs fxllm reads (vLLM's names).
TOKENIZATION_KWARGS = ("truncate_prompt_tokens", "add_special_tokens")


@dataclass
class CallOptions:
    """What one generate()/chat()/embed() call asks of all its prompts."""

    priorities: list[int] | None = None  # one per prompt (scheduling_policy="priority")
    truncate_prompt_tokens: int | None = None
    add_special_tokens: bool = True


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
        self._grammar_compiler: GrammarCompiler | None = None  # built for the first constrained request

    def next_request_id(self) -> str:
        return str(next(self._request_counter))

    def call_options(
        self,
        lora_request: Any,
        priority: list[int] | None,
        tokenization_kwargs: dict[str, Any] | None,
        mm_processor_kwargs: dict[str, Any] | None,
        num_prompts: int | None = None,
    ) -> CallOptions:
        """The call-wide keywords of vLLM's methods, checked."""
        if lora_request is not None and lora_request != [] and not (
            isinstance(lora_request, (list, tuple)) and all(r is None for r in lora_request)
        ):
            raise ValueError("lora_request: LoRA adapters are not supported yet; pass lora_request=None")
        if mm_processor_kwargs:
            raise ValueError(
                "mm_processor_kwargs per call are not supported yet; pass them to LLM(mm_processor_kwargs=...)"
            )
        options = CallOptions()
        if priority is not None:
            if self.config.scheduler.policy != "priority":
                raise ValueError('priority needs LLM(..., scheduling_policy="priority")')
            if not isinstance(priority, (list, tuple)) or not all(isinstance(p, int) and not isinstance(p, bool) for p in priority):
                raise TypeError(f"priority must be a list of ints, one per prompt, got {priority!r}")
            if num_prompts is not None and len(priority) != num_prompts:
                raise ValueError(f"got {len(priority)} priorities for {num_prompts} prompts: pass one per prompt")
            options.priorities = list(priority)
        kwargs = dict(tokenization_kwargs or {})
        if not isinstance(tokenization_kwargs or {}, dict):
            raise TypeError(f"tokenization_kwargs must be a dict, got {type(tokenization_kwargs).__name__}")
        unknown = sorted(set(kwargs) - set(TOKENIZATION_KWARGS))
        if unknown:
            raise ValueError(f"tokenization_kwargs has keys fxllm does not read: {unknown}; known: {', '.join(TOKENIZATION_KWARGS)}")
        if "truncate_prompt_tokens" in kwargs and kwargs["truncate_prompt_tokens"] is not None:
            keep = kwargs["truncate_prompt_tokens"]
            if keep != -1:
                check_int("tokenization_kwargs['truncate_prompt_tokens']", keep, minimum=1)
            options.truncate_prompt_tokens = keep
        if "add_special_tokens" in kwargs:
            options.add_special_tokens = check_bool("tokenization_kwargs['add_special_tokens']", kwargs["add_special_tokens"])
        return options

    # ---- prompts ------------------------------------------------------------------------

    def process_prompt(self, prompt: PromptType, index: int, add_special_tokens: bool = True) -> ProcessedPrompt:
        """Tokens of a prompt; with ``multi_modal_data``, its images processed and their
        placeholders expanded."""
        if not isinstance(prompt, dict):
            return self.tokenize(prompt, index, add_special_tokens)
        _check_prompt_keys(prompt, index)
        processed = self.tokenize(
            {k: v for k, v in prompt.items() if k not in ("multi_modal_data", "mm_processor_kwargs")}, index,
            add_special_tokens,
        )
        if "multi_modal_data" not in prompt:
            if prompt.get("mm_processor_kwargs"):
                raise ValueError(f"prompt {index}: mm_processor_kwargs applies to prompts with multi_modal_data")
            return processed
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
        if prompt.get("mm_processor_kwargs"):
            raise ValueError(
                f"prompt {index}: per-prompt mm_processor_kwargs are not supported yet; pass them to "
                f"LLM(mm_processor_kwargs=...)"
            )
        # The text lets an architecture find textual placeholders (InternVL's <image>), where the
        # tokens came from it rather than from the caller's prompt_token_ids.
        text = None if "prompt_token_ids" in prompt else processed.text
        mm_prompt = self.mm_processor.process(processed.token_ids, data, index, text, add_special_tokens)
        return ProcessedPrompt(processed.text, mm_prompt.token_ids, mm_prompt, processed.cache_salt)

    def tokenize(self, prompt: PromptType, index: int, add_special_tokens: bool = True) -> ProcessedPrompt:
        """A text-only prompt's tokens, checked against the vocabulary."""
        if isinstance(prompt, dict):
            if "multi_modal_data" in prompt:
                raise ValueError(f"prompt {index}: multi_modal_data is supported by generate() and chat() only")
            _check_prompt_keys(prompt, index)
        salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        if salt is not None and not isinstance(salt, str):
            raise TypeError(f"prompt {index}: cache_salt must be a string, got {type(salt).__name__}")
        if isinstance(prompt, str):
            text, token_ids = prompt, self._encode(prompt, index, add_special_tokens)
        elif isinstance(prompt, dict) and "prompt_embeds" in prompt:
            raise ValueError(
                f"prompt {index}: prompt_embeds are not supported yet; pass text or prompt_token_ids"
            )
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
            text, token_ids = prompt["prompt"], self._encode(prompt["prompt"], index, add_special_tokens)
        else:
            raise TypeError(
                f"prompt {index} must be a string, a list of token ids, {{'prompt': str}} or "
                f"{{'prompt_token_ids': [int, ...]}}, got {type(prompt).__name__}"
            )
        processed = self.checked(text, token_ids, index)
        processed.cache_salt = salt
        return processed

    def _encode(self, text: str, index: int, add_special_tokens: bool) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(
                f"prompt {index} is text, but this engine was built with skip_tokenizer_init=True: pass "
                f"prompt_token_ids"
            )
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

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
        content_format: str = "auto",
        template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[ProcessedPrompt]:
        """Each conversation rendered with the chat template, then tokenized (its images and
        videos processed as a generate() prompt's)."""
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be True")
        if content_format not in CONTENT_FORMATS:
            raise ValueError(f"chat_template_content_format must be one of {', '.join(CONTENT_FORMATS)}, got {content_format!r}")
        if template_kwargs is not None and not isinstance(template_kwargs, dict):
            raise TypeError(f"chat_template_kwargs must be a dict, got {type(template_kwargs).__name__}")
        if self.tokenizer is None:
            raise ValueError("chat() needs a tokenizer, but this engine was built with skip_tokenizer_init=True")
        template = chat_template if chat_template is not None else self.config.model.chat_template
        processed = []
        for index, conversation in enumerate(conversations):
            rendered = render_conversation(
                self.tokenizer, conversation, index, template, content_format, add_generation_prompt,
                continue_final_message, template_kwargs or {}, tools,
            )
            prompt: dict[str, Any] = {"prompt": rendered.text}
            if rendered.multi_modal_data:
                prompt["multi_modal_data"] = rendered.multi_modal_data
            # The template already holds the special tokens (BOS): do not add them twice.
            processed.append(self.process_prompt(prompt, index, add_special_tokens=False))
        return processed

    # ---- sampling params ----------------------------------------------------------------

    def sampling_params_list(
        self, sampling_params: SamplingParams | Sequence[SamplingParams] | None, num_prompts: int
    ) -> list[SamplingParams]:
        """One checked, normalized copy per prompt (one copy where every prompt shares the same)."""
        if sampling_params is None:
            return [self.default_sampling_params()] * num_prompts
        if isinstance(sampling_params, SamplingParams):
            return [self._checked_params(sampling_params, None)] * num_prompts
        if not isinstance(sampling_params, (list, tuple)):
            raise TypeError(
                f"sampling_params must be a SamplingParams, a list of them or None, got {type(sampling_params).__name__}"
            )
        if len(sampling_params) != num_prompts:
            raise ValueError(
                f"got {len(sampling_params)} sampling_params for {num_prompts} prompts: pass one "
                f"SamplingParams, or a list with one per prompt"
            )
        copies: dict[int, SamplingParams] = {}
        for index, params in enumerate(sampling_params):
            if not isinstance(params, SamplingParams):
                raise TypeError(f"sampling_params[{index}] must be a SamplingParams, got {type(params).__name__}")
            if id(params) not in copies:
                copies[id(params)] = self._checked_params(params, index)
        return [copies[id(params)] for params in sampling_params]

    def _checked_params(self, params: SamplingParams, index: int | None) -> SamplingParams:
        """The request's copy: fields checked again (one may have been set after construction),
        logprob counts checked against ``max_logprobs`` and -1 resolved to the vocabulary."""
        where = "sampling_params" if index is None else f"sampling_params[{index}]"
        try:
            params = params.for_request()
        except (TypeError, ValueError) as error:
            raise type(error)(f"{where}: {error}") from None
        cap = self.config.model.max_logprobs
        cap = self.vocab_size if cap == ALL_LOGPROBS else cap
        for name in ("logprobs", "prompt_logprobs"):
            asked = getattr(params, name)
            if asked is None:
                continue
            wanted = self.vocab_size if asked == ALL_LOGPROBS else asked
            if wanted > cap:
                raise ValueError(
                    f"{where}: {name}={asked} asks for {wanted} logprobs, above max_logprobs={cap}: ask for fewer, "
                    f"or raise LLM(max_logprobs=...) (-1 allows the whole vocabulary)"
                )
            if wanted > self.vocab_size:
                raise ValueError(f"{where}: {name}={asked} is above the vocabulary's {self.vocab_size} tokens")
            setattr(params, name, wanted)
        return params

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams from the model's generation_config.json (vLLM's generation_config="auto"),
        under ``override_generation_config``."""
        model_config = self.config.model
        return SamplingParams.from_generation_config(model_config.generation_config, model_config.override_generation_config)

    # ---- requests -----------------------------------------------------------------------

    def make_requests(
        self, prompts: list[ProcessedPrompt], params_list: list[SamplingParams], options: CallOptions | None = None
    ) -> list[Request]:
        """The requests of a whole call, every one validated before any is returned."""
        options = options or CallOptions()
        requests = []
        for index, (prompt, params) in enumerate(zip(prompts, params_list)):
            keep = params.truncate_prompt_tokens if params.truncate_prompt_tokens is not None else options.truncate_prompt_tokens
            priority = 0 if options.priorities is None else options.priorities[index]
            requests.extend(self._requests_of(prompt, params, index, keep, priority))
        return requests

    def _truncated(self, prompt: ProcessedPrompt, keep: int | None, index: int) -> list[int]:
        """The prompt's last ``keep`` tokens (vLLM's ``truncate_prompt_tokens``; -1: up to max_model_len)."""
        if keep is None:
            return prompt.token_ids
        if prompt.multimodal is not None:
            raise ValueError(f"prompt {index}: truncate_prompt_tokens cannot cut a prompt with images or videos")
        keep = self.max_model_len if keep == -1 else keep
        return prompt.token_ids[-keep:]

    def _requests_of(
        self, prompt: ProcessedPrompt, params: SamplingParams, index: int, keep: int | None, priority: int
    ) -> list[Request]:
        """The ``n`` requests of one prompt, validated against this model."""
        token_ids, max_model_len = self._truncated(prompt, keep, index), self.max_model_len
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
        if self.tokenizer is None and (params.bad_words or params.stop):
            raise ValueError(
                f"sampling params of prompt {index}: bad_words and stop strings need a tokenizer, but this engine "
                f"was built with skip_tokenizer_init=True"
            )
        bad_word_ids = tokenize_bad_words(self.tokenizer, params.bad_words or [])
        _check_some_token_allowed(params, bad_word_ids, stop_ids, self.vocab_size, index)
        validate_request_params(self.config.logits_processors, params, index)
        grammar = self.compiled_grammar(params, index)
        requests = []
        for completion in range(params.n):
            generator = None
            if params.seed is not None:
                # Each of the n completions gets its own stream, derived from the seed.
                generator = torch.Generator(device=self.config.device)
                generator.manual_seed(params.seed + completion)
            detokenizer = (
                IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
                if params.detokenize and self.tokenizer is not None
                else None
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
                    cache_salt=prompt.cache_salt,
                    priority=priority,
                    grammar=None if grammar is None else RequestGrammar(grammar, frozenset(stop_ids)),
                )
            )
        return requests

    def compiled_grammar(self, params: SamplingParams, index: int) -> Any:
        """The request's structured-outputs constraint compiled (once per distinct constraint), or None."""
        constraint = params.structured_outputs
        if constraint is None:
            return None
        if self.tokenizer is None:
            raise ValueError(
                f"sampling params of prompt {index}: structured outputs need a tokenizer, but this engine was built "
                f"with skip_tokenizer_init=True"
            )
        if self._grammar_compiler is None:
            self._grammar_compiler = GrammarCompiler(
                self.tokenizer, self.vocab_size, self.eos_token_ids, self.config.structured_outputs
            )
        return self._grammar_compiler.compile(constraint, index)


def _check_some_token_allowed(
    params: SamplingParams, bad_word_ids: list[list[int]], stop_ids: set[int], vocab_size: int, index: int
) -> None:
    """A request whose allowed tokens are all banned (one-token bad words, stop tokens before
    ``min_tokens``) could only sample garbage: refuse it."""
    if not params.allowed_token_ids:
        return
    banned = {ids[0] for ids in bad_word_ids if len(ids) == 1}
    if params.min_tokens > 0:
        banned |= stop_ids
    if set(params.allowed_token_ids) <= banned:
        raise ValueError(
            f"sampling params of prompt {index} ban every token they allow: allowed_token_ids "
            f"{sorted(params.allowed_token_ids)[:8]} are all banned by bad_words or, before min_tokens, by stop "
            f"tokens; allow more tokens or drop the bans"
        )


# The keys a prompt dict may hold (vLLM's TextPrompt / TokensPrompt / EmbedsPrompt).
PROMPT_KEYS = frozenset(
    {"prompt", "prompt_token_ids", "prompt_embeds", "multi_modal_data", "mm_processor_kwargs", "cache_salt"}
)


def _check_prompt_keys(prompt: dict[str, Any], index: int) -> None:
    unknown = sorted(set(prompt) - PROMPT_KEYS)
    if unknown and not set(prompt) & {"prompt", "prompt_token_ids", "prompt_embeds"}:
        raise TypeError(
            f"prompt {index} must be a string, a list of token ids, {{'prompt': str}} or "
            f"{{'prompt_token_ids': [int, ...]}}, got a dict with keys {sorted(prompt)}"
        )
    if unknown:
        raise ValueError(f"prompt {index} has unknown keys {unknown}; known: {', '.join(sorted(PROMPT_KEYS))}")
