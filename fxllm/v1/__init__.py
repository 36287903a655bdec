"""Names vLLM scripts import from ``vllm.v1`` (fxllm's own types under vLLM's paths)."""
