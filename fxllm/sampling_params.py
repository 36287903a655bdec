"""SamplingParams with vLLM's names, defaults and validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Below this temperature sampling is greedy, as in vLLM.
GREEDY_TEMPERATURE_EPSILON = 1e-5


@dataclass
class SamplingParams:
    """How to sample one request's completions (vLLM's ``SamplingParams``)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int | None = 16
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.n, int) or self.n != 1:
            raise ValueError(f"n must be 1 (parallel sampling is not supported yet), got {self.n!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise ValueError(f"top_k must be an int >= -1 (0 or -1 mean all tokens), got {self.top_k!r}")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1
        ):
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be a list of ints, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPSILON

    @property
    def all_tokens_k(self) -> bool:
        """top_k of 0 or -1 means no top-k cut."""
        return self.top_k <= 0

    @classmethod
    def from_generation_config(cls, generation_config: dict[str, Any]) -> "SamplingParams":
        """Defaults from a model's generation_config.json, as vLLM's ``generation_config="auto"``.

        Like vLLM, only the sampling knobs the file sets explicitly are taken
        (``do_sample`` is ignored); ``max_new_tokens`` becomes ``max_tokens``.
        """
        known = ("temperature", "top_p", "top_k")
        kwargs: dict[str, Any] = {k: generation_config[k] for k in known if generation_config.get(k) is not None}
        if generation_config.get("max_new_tokens"):
            kwargs["max_tokens"] = int(generation_config["max_new_tokens"])
        return cls(**kwargs)
