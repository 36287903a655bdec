"""Helpers for images that vLLM scripts import from ``vllm.multimodal``."""
