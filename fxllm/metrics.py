"""Metrics with vLLM's shapes: what ``LLM.get_metrics()`` returns and ``RequestOutput.metrics`` holds."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Metric:
    """One metric, named as vLLM names it (``vllm:prompt_tokens``), with its labels."""

    name: str
    labels: dict[str, str]


@dataclass
class Counter(Metric):
    """A count that only grows."""

    value: int


@dataclass
class Vector(Metric):
    """An ordered array of counters."""

    values: list[int]


@dataclass
class Gauge(Metric):
    """A value that goes up and down."""

    value: float


@dataclass
class Histogram(Metric):
    """Observations by bucket: upper bound (as a string, "+Inf" last) -> cumulative count."""

    count: int
    sum: float
    buckets: dict[str, int]


@dataclass
class RequestStateStats:
    """One request's timeline (vLLM's): ``arrival_time`` is wall-clock, the ``*_ts`` are
    monotonic seconds."""

    num_generation_tokens: int = 0
    arrival_time: float = 0.0
    queued_ts: float = 0.0
    scheduled_ts: float = 0.0
    first_token_ts: float = 0.0
    last_token_ts: float = 0.0
    first_token_latency: float = 0.0  # seconds from arrival to the first generated token
