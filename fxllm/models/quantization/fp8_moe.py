"""``Fp8FusedMoE``: a layer's stacked experts in FP8 E4M3, quantized as the checkpoint loads.

Each expert's gate, up and down projections get one float32 scale per output row, computed
from the full-precision checkpoint tensor as it arrives (per channel, like ``Fp8Linear`` at
``quantization="fp8"``); under tensor parallelism each rank quantizes its own slice.
``fxllm::fused_moe`` takes the scales: its CUDA kernels read one byte per weight and widen
it in registers, its CPU path dequantizes each expert before its matmuls. Activations stay
in the model dtype (weight-only FP8). Checkpoints whose experts are already FP8 are not
read yet.
"""

from __future__ import annotations

import torch
from torch import nn

from fxllm.models.moe.fused_moe import fused_moe
from fxllm.models.moe.layer import FusedMoE
from fxllm.models.quantization.fp8_gemm import MIN_FP8_CAPABILITY, has_fp8_gpu
from fxllm.models.quantization.fp8_quant import FP8_DTYPE, quantize_per_channel
from fxllm.models.weights import ExpertShard


class Fp8FusedMoE(FusedMoE):
    """``w13`` [E, 2I, H] and ``w2`` [E, H, I] in FP8, ``w13_scale`` [E, 2I] and ``w2_scale``
    [E, H] float32: one scale per output row of each expert."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, top_k: int, renormalize: bool):
        super().__init__(num_experts, hidden_size, intermediate_size, top_k, renormalize, weight_dtype=FP8_DTYPE)
        device = self.w13.device
        if device.type == "cuda" and not has_fp8_gpu(device):
            # The expert kernels widen FP8 tiles in registers, which Triton does from sm89 on.
            raise ValueError(
                f"FP8 MoE experts need a GPU of compute capability {MIN_FP8_CAPABILITY} or newer, this one is "
                f"{torch.cuda.get_device_capability(device)}; drop quantization='fp8' for this model"
            )
        self.w13_scale = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, dtype=torch.float32))
        self.w2_scale = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))

    @classmethod
    def like(cls, layer: FusedMoE) -> Fp8FusedMoE:
        """The FP8 version of ``layer`` (which may sit on the meta device)."""
        return cls(layer.num_experts, layer.hidden_size, layer.intermediate_size, layer.top_k, layer.renormalize)

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        return fused_moe(
            hidden, router_logits, self.w13, self.w2, self.top_k, self.renormalize, self.w13_scale, self.w2_scale
        )

    def expected_expert_writes(self) -> dict[str, int]:
        writes = super().expected_expert_writes()
        return {**writes, **{f"{name}_scale": count for name, count in writes.items()}}

    def load_expert_tensor(self, checkpoint_name: str, expert: int, shard: ExpertShard, tensor: torch.Tensor) -> tuple[str, ...]:
        if tensor.dtype == FP8_DTYPE:
            raise ValueError(
                f"checkpoint tensor {checkpoint_name!r} is already FP8: fxllm quantizes MoE experts from "
                f"full-precision checkpoints only (quantization='fp8'); load the full-precision checkpoint"
            )
        rows = self.expert_rows(checkpoint_name, expert, shard, tensor)
        weight, scale = quantize_per_channel(tensor.to(self.w13.device))  # [rows, cols] FP8, [rows, 1]
        name = shard.stacked_name
        getattr(self, name)[expert, rows].copy_(weight)
        getattr(self, f"{name}_scale")[expert, rows].copy_(scale.squeeze(1))
        return name, f"{name}_scale"
