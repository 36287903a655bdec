"""FP8 E4M3 numerics: quantize with a scale per channel, tensor, block or token; dequantize.

Convention everywhere (and in both checkpoint formats): ``real = fp8 * scale``, with
float32 scales. A weight's scales form a grid: scale [i, j] covers rows
i*block_n .. (i+1)*block_n and columns j*block_k .. (j+1)*block_k, the last block of
each dimension partial where the size is not a multiple (ceil-sized grids, as
transformers' FP8Linear allocates them). Per channel is the block (1, in_features).
"""

from __future__ import annotations

import torch

from fxllm.utils import cdiv

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
# Floor for computed scales, so an all-zero row or token divides by something; its values
# quantize to 0 whatever the floor is.
MIN_SCALE = 1e-12


def _to_fp8(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (values.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 [N, K], scale [N, 1]): one scale per output row, its absolute maximum maps to 448."""
    scale = (weight.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=MIN_SCALE)
    return _to_fp8(weight, scale), scale


def quantize_per_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8, scale [1]): one scale for the whole tensor."""
    scale = (weight.abs().amax().float() / FP8_MAX).clamp(min=MIN_SCALE).reshape(1)
    return _to_fp8(weight, scale), scale


def quantize_per_block(weight: torch.Tensor, block_n: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 [N, K], scale [ceil(N/block_n), ceil(K/block_k)]), partial edge blocks included."""
    rows, cols = weight.shape
    padded_shape = (cdiv(rows, block_n) * block_n, cdiv(cols, block_k) * block_k)
    padded = torch.zeros(padded_shape, dtype=torch.float32, device=weight.device)
    padded[:rows, :cols] = weight.float()
    tiles = padded.unflatten(1, (-1, block_k)).unflatten(0, (-1, block_n))  # [rows/bn, bn, cols/bk, bk]
    scale = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=MIN_SCALE)
    return _to_fp8(weight, expand_scale(scale, block_n, block_k, rows, cols)), scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] -> (fp8 [M, K], scale [M, 1]): one scale per token (row)."""
    return quantize_per_channel(x)


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Activations with a given (static, per-tensor) scale."""
    return _to_fp8(x, scale)


def expand_scale(scale: torch.Tensor, block_n: int, block_k: int, rows: int, cols: int) -> torch.Tensor:
    """The scale grid repeated to one value per weight [rows, cols]."""
    return scale.repeat_interleave(block_n, dim=0)[:rows].repeat_interleave(block_k, dim=1)[:, :cols]


def dequantize(
    weight: torch.Tensor, scale: torch.Tensor, block_n: int, block_k: int, dtype: torch.dtype
) -> torch.Tensor:
    """``fp8 * scale`` in float32, rounded once to ``dtype``."""
    rows, cols = weight.shape
    if block_k >= cols:  # per-channel or per-row-block: broadcast instead of expanding
        full = weight.float() * scale.repeat_interleave(block_n, dim=0)[:rows]
    else:
        full = weight.float() * expand_scale(scale.float(), block_n, block_k, rows, cols)
    return full.to(dtype)
