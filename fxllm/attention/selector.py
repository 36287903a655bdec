"""Which attention backend an engine runs on a device."""

from __future__ import annotations

import torch

from fxllm.attention.backend import AttentionBackend
from fxllm.attention.torch_backend import TorchAttentionBackend


def select_attention_backend(device: torch.device) -> AttentionBackend:
    """Triton kernels on CUDA; the torch reference elsewhere (and as the oracle)."""
    if device.type == "cuda":
        from fxllm.attention.triton_backend import TritonAttentionBackend  # Triton: GPUs only here

        return TritonAttentionBackend()
    return TorchAttentionBackend()
