"""``LLM.get_metrics()``'s types where vLLM scripts import them from."""

from fxllm.metrics import Counter, Gauge, Histogram, Metric, Vector

__all__ = ["Counter", "Gauge", "Histogram", "Metric", "Vector"]
