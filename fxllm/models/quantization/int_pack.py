"""Integer weights packed into int32 words: the layouts of GPTQ, AutoAWQ and compressed-tensors, and fxllm's own.

fxllm keeps every weight-only INT4 / INT8 layer in one layout, GPTQ's (what its kernels read):
``qweight`` int32 [K / pack, N], ``pack = 32 // bits`` unsigned values of consecutive input
features k per word, feature ``k`` in bits ``(k % pack) * bits`` (lowest first); one scale
(and, asymmetric, one zero point) per (group of ``group_size`` input features, output
feature): ``real = (q - zero) * scale``.

The checkpoints:
- GPTQ: ``qweight`` exactly that; ``qzeros`` [groups, N / pack] packed the same way along N,
  in the original ``gptq`` format stored as ``zero - 1`` (``gptq_v2``: as is).
- AutoAWQ (GEMM): ``qweight`` [K, N / 8] packed along N in the interleaved order
  ``AWQ_PACK_ORDER`` (word nibble i holds column ``AWQ_PACK_ORDER[i]`` of its 8), ``qzeros``
  [groups, N / 8] likewise.
- compressed-tensors ``pack-quantized``: ``weight_packed`` [N, K / pack], packed along K as
  GPTQ packs it, of signed values offset by ``2 ** (bits - 1)``, so its words are GPTQ's
  transposed; asymmetric ``weight_zero_point`` [ceil(N / pack), groups] packed along N.
"""

from __future__ import annotations

import torch

WORD_BITS = 32
# AutoAWQ's GEMM order: nibble i of a word holds output column AWQ_PACK_ORDER[i] of its 8.
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_factor(bits: int) -> int:
    return WORD_BITS // bits


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> their unsigned values (int32), ``pack_factor(bits)`` per word along ``dim``
    (lowest bits first)."""
    shifts = torch.arange(0, WORD_BITS, bits, dtype=torch.int32, device=packed.device)
    mask = (1 << bits) - 1
    if dim == 0:  # [W, C] -> [W, pack, C] -> [W * pack, C]
        values = (packed[:, None, :] >> shifts[None, :, None]) & mask
        return values.reshape(-1, packed.shape[1])
    values = (packed[:, :, None] >> shifts[None, None, :]) & mask  # [R, W, pack]
    return values.reshape(packed.shape[0], -1)


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned ``bits``-bit values (any int dtype) -> int32 words along ``dim`` (its size a
    multiple of the pack factor), the inverse of ``unpack``."""
    per_word = pack_factor(bits)
    if values.shape[dim] % per_word:
        raise ValueError(f"cannot pack {values.shape[dim]} values along dim {dim} into words of {per_word}")
    wide = values.to(torch.int64)  # shifts into the sign bit stay exact before the int32 cast
    shifts = torch.arange(0, WORD_BITS, bits, dtype=torch.int64, device=values.device)
    if dim == 0:
        words = (wide.reshape(-1, per_word, values.shape[1]) << shifts[None, :, None]).sum(1)
    else:
        words = (wide.reshape(values.shape[0], -1, per_word) << shifts[None, None, :]).sum(2)
    return _to_int32(words)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words held in int64 -> the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def awq_column_order(num_columns: int, device: torch.device | None = None) -> torch.Tensor:
    """Index that turns AWQ-ordered unpacked columns into natural order: natural[:, c] = awq[:, index[c]]."""
    inverse = [AWQ_PACK_ORDER.index(column) for column in range(len(AWQ_PACK_ORDER))]
    base = torch.arange(0, num_columns, len(AWQ_PACK_ORDER), device=device)[:, None]
    return (base + torch.tensor(inverse, device=device)[None, :]).reshape(-1)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AutoAWQ GEMM words [R, C / 8] -> unsigned 4-bit values [R, C] in natural column order."""
    interleaved = unpack(packed, 4, dim=1)
    return interleaved[:, awq_column_order(interleaved.shape[1], packed.device)]


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit values [R, C] -> AutoAWQ GEMM words [R, C / 8] (the inverse of ``unpack_awq``)."""
    order = torch.arange(values.shape[1], device=values.device).reshape(-1, len(AWQ_PACK_ORDER))
    interleaved = values[:, order[:, list(AWQ_PACK_ORDER)].reshape(-1)]
    return pack(interleaved, 4, dim=1)


def dequantize_packed(
    qweight: torch.Tensor,  # [K / pack, N] int32
    scales: torch.Tensor,  # [groups, N]
    zeros: torch.Tensor | None,  # [groups, N] float, None: symmetric (zero 2 ** (bits - 1))
    bits: int,
    group_size: int,  # input features per scale row
    dtype: torch.dtype,
) -> torch.Tensor:
    """The weight [N, K] in ``dtype``: ``(q - zero) * scale`` in float32, rounded once."""
    values = unpack(qweight, bits, dim=0).float()  # [K, N]
    zero = zeros.float() if zeros is not None else torch.tensor(float(1 << (bits - 1)), device=values.device)
    if zero.dim() == 2:
        zero = zero.repeat_interleave(group_size, dim=0)[: values.shape[0]]
    scale = scales.float().repeat_interleave(group_size, dim=0)[: values.shape[0]]
    return ((values - zero) * scale).t().to(dtype)
