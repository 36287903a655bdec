"""The engine's counters, gauges and histograms since it started (``LLM.get_metrics()``)."""

from __future__ import annotations

import bisect
from collections import Counter as Tally
from dataclasses import dataclass, field

from fxllm.metrics import Counter, Gauge, Histogram, Metric
from fxllm.runtime.request import Request

# Bucket upper bounds (seconds, or tokens), as Prometheus histograms keep them.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
TOKEN_COUNT_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 131072)


@dataclass
class _Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def snapshot(self, name: str, labels: dict[str, str]) -> Histogram:
        cumulative, buckets = 0, {}
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts):
            cumulative += count
            buckets[bound] = cumulative
        return Histogram(name, labels, count=cumulative, sum=self.total, buckets=buckets)


class EngineStats:
    def __init__(self, model_name: str):
        self.labels = {"model_name": model_name, "engine": "0"}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished = Tally()  # finish reason -> requests
        self.histograms = {
            "vllm:time_to_first_token_seconds": _Histogram(LATENCY_BUCKETS),
            "vllm:inter_token_latency_seconds": _Histogram(LATENCY_BUCKETS),
            "vllm:e2e_request_latency_seconds": _Histogram(LATENCY_BUCKETS),
            "vllm:request_queue_time_seconds": _Histogram(LATENCY_BUCKETS),
            "vllm:request_prompt_tokens": _Histogram(TOKEN_COUNT_BUCKETS),
            "vllm:request_generation_tokens": _Histogram(TOKEN_COUNT_BUCKETS),
        }

    def on_token(self, request: Request, now: float) -> None:
        """A generated token reached the host."""
        self.generation_tokens += 1
        stats = request.stats
        if stats.num_generation_tokens == 1:
            self.histograms["vllm:time_to_first_token_seconds"].observe(now - stats.queued_ts)
        else:
            self.histograms["vllm:inter_token_latency_seconds"].observe(now - stats.last_token_ts)

    def on_finished(self, request: Request, now: float) -> None:
        stats = request.stats
        self.prompt_tokens += request.num_prompt_tokens
        self.finished[request.finish_reason] += 1
        self.histograms["vllm:e2e_request_latency_seconds"].observe(now - stats.queued_ts)
        self.histograms["vllm:request_queue_time_seconds"].observe(max(stats.scheduled_ts - stats.queued_ts, 0.0))
        self.histograms["vllm:request_prompt_tokens"].observe(request.num_prompt_tokens)
        self.histograms["vllm:request_generation_tokens"].observe(len(request.output_token_ids))

    def snapshot(
        self, num_running: int, num_waiting: int, kv_usage: float, preemptions: int, prefix_queries: int,
        prefix_hits: int,
    ) -> list[Metric]:
        labels = self.labels
        metrics: list[Metric] = [
            Counter("vllm:prompt_tokens", dict(labels), self.prompt_tokens),
            Counter("vllm:generation_tokens", dict(labels), self.generation_tokens),
            Counter("vllm:num_preemptions", dict(labels), preemptions),
            Counter("vllm:prefix_cache_queries", dict(labels), prefix_queries),
            Counter("vllm:prefix_cache_hits", dict(labels), prefix_hits),
            Gauge("vllm:num_requests_running", dict(labels), float(num_running)),
            Gauge("vllm:num_requests_waiting", dict(labels), float(num_waiting)),
            Gauge("vllm:kv_cache_usage_perc", dict(labels), kv_usage),
        ]
        for reason in ("stop", "length", "abort"):
            metrics.append(Counter("vllm:request_success", {**labels, "finished_reason": reason}, self.finished[reason]))
        metrics += [histogram.snapshot(name, dict(labels)) for name, histogram in self.histograms.items()]
        return metrics
