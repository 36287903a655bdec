"""What device fxllm runs on, as vLLM scripts ask it (``vllm.platforms.current_platform``)."""

from __future__ import annotations

import torch


class Platform:
    """CUDA where a GPU is visible, else the CPU. Counting GPUs does not initialize CUDA."""

    @property
    def device_type(self) -> str:
        return "cuda" if torch.cuda.device_count() > 0 else "cpu"

    def is_cuda(self) -> bool:
        return self.device_type == "cuda"

    def is_cuda_alike(self) -> bool:
        return self.is_cuda()

    def is_rocm(self) -> bool:
        return False

    def is_cpu(self) -> bool:
        return self.device_type == "cpu"

    def empty_cache(self) -> None:
        if self.is_cuda() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()


current_platform = Platform()
