"""vLLM's ``vllm.entrypoints`` names."""
