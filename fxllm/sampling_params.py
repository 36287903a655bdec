"""SamplingParams and BeamSearchParams with vLLM's names, defaults and validation.

A request's parameters are checked twice: when they are built, and again when they are
submitted (a field set after construction is caught there); each request samples from
its own copy, normalized as vLLM normalizes it.
"""

from __future__ import annotations

import copy
import enum
import warnings
from dataclasses import dataclass
from typing import Any, Callable

# GuidedDecodingParams is re-exported: vLLM scripts import both from here.
from fxllm.structured_outputs import GuidedDecodingParams, StructuredOutputsParams  # noqa: F401
from fxllm.validation import INT64_MAX, INT64_MIN, check_bool, check_int, check_number, check_optional, is_int

# Below this temperature sampling is greedy, as in vLLM.
GREEDY_TEMPERATURE_EPSILON = 1e-5
# Temperatures in (0, this) are raised to it, as vLLM does: dividing logits by less
# overflows half-precision tensors.
MIN_SAMPLING_TEMPERATURE = 1e-2
# Penalty bounds, as OpenAI's API and vLLM.
PENALTY_BOUND = 2.0
# logprobs / prompt_logprobs = -1: the whole vocabulary.
ALL_LOGPROBS = -1


class RequestOutputKind(enum.Enum):
    """vLLM's output kinds. Offline calls return finished outputs, so every kind gives the
    whole completion; DELTA (streaming) has no meaning here and is refused."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


# A per-request logits processor (vLLM 0.11): (output_ids, logits) -> logits, or
# (prompt_ids, output_ids, logits) -> logits, on one row of logits.
LogitsProcessor = Callable[..., Any]


@dataclass
class SamplingParams:
    """How to sample one prompt's completions (vLLM's ``SamplingParams``)."""

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    extra_args: dict[str, Any] | None = None  # free for custom logits processors (vLLM's)
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last k tokens (-1: up to max_model_len)
    logits_processors: list[LogitsProcessor] | None = None  # vLLM 0.11's per-request processors
    structured_outputs: StructuredOutputsParams | None = None  # JSON schema, regex, choice, grammar ...
    guided_decoding: StructuredOutputsParams | None = None  # vLLM's older name of structured_outputs
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    skip_clone: bool = False

    def __post_init__(self) -> None:
        self._normalize()

    def _normalize(self) -> None:
        """Check every field, then bring it to the form the engine reads (as vLLM does)."""
        self._validate()
        if self.guided_decoding is not None:
            self.structured_outputs, self.guided_decoding = self.guided_decoding, None
        if self.seed == -1:
            self.seed = None
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logprobs is True:
            self.logprobs = 1
        if self.prompt_logprobs is True:
            self.prompt_logprobs = 1
        if 0 < self.temperature < MIN_SAMPLING_TEMPERATURE:
            warnings.warn(
                f"temperature {self.temperature} is below {MIN_SAMPLING_TEMPERATURE}, which overflows half-precision "
                f"logits: raised to {MIN_SAMPLING_TEMPERATURE} (as vLLM does)",
                UserWarning,
                stacklevel=4,
            )
            self.temperature = MIN_SAMPLING_TEMPERATURE
        if self.greedy:
            if self.n > 1:
                raise ValueError(f"n must be 1 when sampling greedily (temperature=0), got n={self.n}")
            # Greedy ignores them: as vLLM, they are reset so that no row pays for them.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def _validate(self) -> None:
        check_int("n", self.n, minimum=1)
        for name in ("presence_penalty", "frequency_penalty"):
            check_number(name, getattr(self, name), minimum=-PENALTY_BOUND, maximum=PENALTY_BOUND)
        check_number("repetition_penalty", self.repetition_penalty, minimum=0.0, exclusive_minimum=True)
        check_number("temperature", self.temperature, minimum=0.0)
        check_number("top_p", self.top_p, minimum=0.0, maximum=1.0, exclusive_minimum=True)
        check_int("top_k", self.top_k, minimum=-1)  # 0 or -1: every token; above the vocabulary: every token
        check_number("min_p", self.min_p, minimum=0.0, maximum=1.0)
        check_optional(check_int, "seed", self.seed, minimum=INT64_MIN, maximum=INT64_MAX - self.n)
        if self.stop is not None and not isinstance(self.stop, str):
            if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
                raise TypeError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if self.stop is not None and any(s == "" for s in ([self.stop] if isinstance(self.stop, str) else self.stop)):
            raise ValueError("stop cannot contain an empty string")
        _check_int_list("stop_token_ids", self.stop_token_ids)
        check_optional(check_int, "max_tokens", self.max_tokens, minimum=1)
        check_int("min_tokens", self.min_tokens, minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value is not True:
                check_int(name, value, minimum=ALL_LOGPROBS)
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens",
                     "spaces_between_special_tokens", "detokenize", "skip_clone"):
            check_bool(name, getattr(self, name))
        if self.stop and not self.detokenize:
            raise ValueError("stop strings need detokenize=True: they are matched on the text")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or not all(is_int(k) for k in self.logit_bias):
                raise TypeError(f"logit_bias must be a dict of token id -> float, got {self.logit_bias!r}")
            for token, bias in self.logit_bias.items():
                check_number(f"logit_bias[{token}]", bias)
        _check_int_list("allowed_token_ids", self.allowed_token_ids)
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids must not be empty")
        if self.bad_words is not None:
            if not isinstance(self.bad_words, (list, tuple)) or not all(isinstance(w, str) for w in self.bad_words):
                raise TypeError(f"bad_words must be a list of strings, got {self.bad_words!r}")
            if not all(w.strip() for w in self.bad_words):
                raise ValueError(f"bad_words must not hold blank strings, got {self.bad_words!r}")
        if self.extra_args is not None and not isinstance(self.extra_args, dict):
            raise TypeError(f"extra_args must be a dict, got {type(self.extra_args).__name__}")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens != -1:
            check_int("truncate_prompt_tokens", self.truncate_prompt_tokens, minimum=1)
        if self.logits_processors is not None and (
            not isinstance(self.logits_processors, (list, tuple)) or not all(callable(p) for p in self.logits_processors)
        ):
            raise TypeError("logits_processors must be a list of callables (output_ids, logits) -> logits")
        for name in ("structured_outputs", "guided_decoding"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, StructuredOutputsParams):
                raise TypeError(f"{name} must be a StructuredOutputsParams, got {type(value).__name__}")
            if value is not None:
                value.validate()
        if self.guided_decoding is not None and self.structured_outputs not in (None, self.guided_decoding):
            raise ValueError("structured_outputs and guided_decoding are one setting under two names: pass one")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise TypeError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}")
        if self.output_kind is RequestOutputKind.DELTA:
            raise ValueError("output_kind=DELTA streams partial outputs, which offline calls do not: use CUMULATIVE")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPSILON

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def token_ids_to_check(self) -> list[int]:
        """Every token id this request names, for the range check against the vocabulary."""
        ids = list(self.stop_token_ids) + list(self.allowed_token_ids or [])
        return ids + list((self.logit_bias or {}).keys())

    def clone(self) -> "SamplingParams":
        """A copy (vLLM's ``clone``): shallow with ``skip_clone``, else deep."""
        return copy.copy(self) if self.skip_clone else copy.deepcopy(self)

    def for_request(self) -> "SamplingParams":
        """The copy a request samples with: every field checked again (one may have been set
        after construction) and normalized; processors and extra args are shared, not copied."""
        params = copy.copy(self)
        params._normalize()
        return params

    def update_from_generation_config(self, generation_config: dict[str, Any], eos_token_id: int | None = None) -> None:
        """vLLM's: the file's extra EOS ids become stop token ids (unless ``ignore_eos``)."""
        eos_ids = generation_config.get("eos_token_id")
        if eos_ids is None or self.ignore_eos:
            return
        extra = {eos_ids} if is_int(eos_ids) else set(eos_ids)
        extra.discard(eos_token_id)
        self.stop_token_ids = sorted(set(self.stop_token_ids) | extra)

    @classmethod
    def from_generation_config(
        cls, generation_config: dict[str, Any], overrides: dict[str, Any] | None = None
    ) -> "SamplingParams":
        """Defaults from a model's generation_config.json, as vLLM's ``generation_config="auto"``.

        Like vLLM, only the sampling knobs the file sets explicitly are taken
        (``do_sample`` is ignored); ``max_new_tokens`` becomes ``max_tokens``.
        ``overrides`` (vLLM's ``override_generation_config``) win over the file."""
        merged = {**generation_config, **(overrides or {})}
        known = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
        kwargs: dict[str, Any] = {k: merged[k] for k in known if merged.get(k) is not None}
        if merged.get("max_new_tokens"):
            kwargs["max_tokens"] = int(merged["max_new_tokens"])
        return cls(**kwargs)


def _check_int_list(name: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, (list, tuple)) or not all(is_int(v) for v in value):
        raise TypeError(f"{name} must be a list of ints, got {value!r}")


@dataclass
class BeamSearchParams:
    """vLLM's ``BeamSearchParams`` for ``LLM.beam_search``. ``include_stop_str_in_output`` is
    accepted as vLLM accepts it; like vLLM's, a beam's text is the decode of all its tokens."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        check_int("beam_width", self.beam_width, minimum=1)
        check_int("max_tokens", self.max_tokens, minimum=1)
        check_bool("ignore_eos", self.ignore_eos)
        check_number("temperature", self.temperature, minimum=0.0)
        check_number("length_penalty", self.length_penalty)
        check_bool("include_stop_str_in_output", self.include_stop_str_in_output)
