"""vLLM's ``vllm.engine`` names."""
