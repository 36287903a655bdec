"""``Fp8Linear``: a linear layer with an FP8 E4M3 weight and float32 scales, and how it loads.

Parameters: ``weight`` [out, in] float8_e4m3fn; ``weight_scale`` a grid of float32
multipliers, one per (block_n, block_k) tile (per channel: (1, in)); ``input_scale`` [1]
where the checkpoint's activations are static; ``bias`` in the model dtype.

Fused projections (q/k/v, gate/up) take one checkpoint tensor per shard, each landing in
its own output rows:
- per-tensor scales stay per shard, written to the shard's rows of a per-channel grid.
  vLLM instead requantizes every shard to the largest scale so one scale serves the
  fused GEMM; that rounds the weights a second time, while a row-wise grid is exact and
  costs 4 bytes a row (the W8A8 GEMM scales rows anyway).
- block scales concatenate along the output dimension when every shard but the last has
  a multiple of block_n rows; otherwise (tiny models, odd head counts) a block would
  straddle two shards, so the grid is kept per row: block (1, block_k), each row taking
  its shard's block scale. Both are exact.
- static input scales: the largest of the shards' (they all see the same input, and the
  largest clips none of them), as vLLM does.
"""

from __future__ import annotations

import torch
from torch import nn

from fxllm.models.quantization.fp8_gemm import fp8_linear
from fxllm.models.quantization.fp8_quant import FP8_DTYPE, quantize_per_channel
from fxllm.utils import cdiv
from fxllm.models.quantization.scheme import ActivationScheme, Fp8Scheme, WeightScales
from fxllm.models.weights import ShardRows


def scale_block(scheme: Fp8Scheme, in_features: int, shard_sizes: list[int]) -> tuple[int, int]:
    """The (block_n, block_k) tile one stored scale covers, for a layer of these output shards."""
    if scheme.weight_scales is not WeightScales.BLOCK:
        return 1, in_features
    block_n, block_k = scheme.weight_block
    if all(size % block_n == 0 for size in shard_sizes[:-1]):
        return block_n, block_k
    return 1, block_k


class Fp8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: Fp8Scheme, shard_sizes: list[int]):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme = scheme
        self.activation_scheme = scheme.activations.value
        self.block_n, self.block_k = scale_block(scheme, in_features, shard_sizes)
        grid = (cdiv(out_features, self.block_n), cdiv(in_features, self.block_k))
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(grid, dtype=torch.float32), requires_grad=False)
        static = scheme.activations is ActivationScheme.STATIC
        # Zero until the shards' scales arrive: loading keeps the largest.
        self.input_scale = nn.Parameter(torch.zeros(1, dtype=torch.float32), requires_grad=False) if static else None
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(
            x, self.weight, self.weight_scale, self.bias, self.input_scale,
            self.block_n, self.block_k, self.activation_scheme,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"scale_block=({self.block_n}, {self.block_k}), activations={self.activation_scheme}"
        )

    # ---- loading (weights.load_named_weights calls this for every tensor of the layer) ----

    def load_checkpoint_tensor(
        self, checkpoint_name: str, name: str, tensor: torch.Tensor, rows: ShardRows | None
    ) -> tuple[str, ...]:
        """Load the checkpoint tensor ``<layer>.<name>`` into ``rows`` of this layer (None:
        all of them); return the names of the parameters written."""
        rows = rows or ShardRows(0, self.out_features)
        if name == "weight":
            return self._load_weight(checkpoint_name, tensor, rows)
        if name == self.scheme.scale_name and self.scheme.prequantized:
            self._load_weight_scale(checkpoint_name, tensor, rows)
            return ("weight_scale",)
        if name == "input_scale" and self.input_scale is not None:
            _check_single(checkpoint_name, tensor)
            self.input_scale.copy_(torch.maximum(self.input_scale, tensor.reshape(1).float()))
            return ("input_scale",)
        if name == "bias" and self.bias is not None:
            _copy(checkpoint_name, self.bias.narrow(0, rows.offset, rows.size), tensor)
            return ("bias",)
        raise ValueError(
            f"checkpoint tensor {checkpoint_name!r} is not part of an FP8 layer "
            f"({self.scheme.method}, {self.scheme.weight_scales.value} scales, {self.scheme.activations.value} "
            f"activations); does config.json's quantization_config describe these weights?"
        )

    def _load_weight(self, checkpoint_name: str, tensor: torch.Tensor, rows: ShardRows) -> tuple[str, ...]:
        weight_rows = self.weight.narrow(0, rows.offset, rows.size)
        if self.scheme.prequantized:
            if tensor.dtype != FP8_DTYPE:
                raise ValueError(
                    f"checkpoint tensor {checkpoint_name!r} is {tensor.dtype}, but config.json's quantization_config "
                    f"({self.scheme.method}) makes this layer float8_e4m3fn; if the checkpoint left it unquantized, "
                    f"its quantization_config should list it in 'ignore' / 'modules_to_not_convert'"
                )
            _copy(checkpoint_name, weight_rows, tensor)
            return ("weight",)
        if not tensor.is_floating_point() or tensor.dtype == FP8_DTYPE:
            raise ValueError(
                f"checkpoint tensor {checkpoint_name!r} is {tensor.dtype}: quantization='fp8' quantizes "
                f"full-precision weights; a pre-quantized checkpoint needs its quantization_config in config.json"
            )
        _check_shape(checkpoint_name, tensor, tuple(weight_rows.shape))
        quantized, scale = quantize_per_channel(tensor.to(self.weight.device))
        weight_rows.copy_(quantized)
        self.weight_scale.narrow(0, rows.offset, rows.size).copy_(scale)
        return ("weight", "weight_scale")

    def _load_weight_scale(self, checkpoint_name: str, tensor: torch.Tensor, rows: ShardRows) -> None:
        tensor = tensor.float()
        kind = self.scheme.weight_scales
        if kind is WeightScales.TENSOR:
            _check_single(checkpoint_name, tensor)
            self.weight_scale.narrow(0, rows.offset, rows.size).copy_(tensor.reshape(1, 1).expand(rows.size, 1))
        elif kind is WeightScales.CHANNEL:
            _copy(checkpoint_name, self.weight_scale.narrow(0, rows.offset, rows.size), tensor)
        elif self.block_n == 1:  # block scales kept per row: each row takes its block's scale
            block_n, block_k = self.scheme.weight_block
            _check_shape(checkpoint_name, tensor, (cdiv(rows.size, block_n), cdiv(self.in_features, block_k)))
            self.weight_scale.narrow(0, rows.offset, rows.size).copy_(tensor.repeat_interleave(block_n, 0)[: rows.size])
        else:
            block_rows = self.weight_scale.narrow(0, rows.offset // self.block_n, cdiv(rows.size, self.block_n))
            _copy(checkpoint_name, block_rows, tensor)


def _check_shape(checkpoint_name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(
            f"checkpoint tensor {checkpoint_name!r} has shape {tuple(tensor.shape)} but the FP8 layer expects "
            f"{tuple(expected)}; config.json (or its quantization_config) does not match these weights"
        )


def _check_single(checkpoint_name: str, tensor: torch.Tensor) -> None:
    """A per-tensor scale: shape [1] as compressed-tensors writes it, or [] as older tools did."""
    if tensor.numel() != 1:
        raise ValueError(
            f"checkpoint tensor {checkpoint_name!r} has shape {tuple(tensor.shape)} but a per-tensor scale has one "
            f"value; does config.json's quantization_config (strategy 'tensor') match these weights?"
        )


def _copy(checkpoint_name: str, target: torch.Tensor, tensor: torch.Tensor) -> None:
    _check_shape(checkpoint_name, tensor, tuple(target.shape))
    target.copy_(tensor)
