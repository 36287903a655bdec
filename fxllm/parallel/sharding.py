"""Which slice of each checkpoint tensor a rank keeps, read without loading the whole tensor.

The layout's plan (``parallel.plans``) says how each tensor splits. A row-parallel
bias is kept by rank 0 only: the all-reduce after the projection then adds it
exactly once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import torch

from fxllm.parallel.plans import Split
from fxllm.parallel.tp_config import PackedTensorSplit, TPLayout
from fxllm.utils import cdiv


def _output_range(split: Split, layout: TPLayout, size: int) -> tuple[int, int]:
    """This rank's rows of a column-parallel output dim of ``size`` rows."""
    if split is Split.QUERY:
        rows = layout.local_heads * layout.head_dim
        return layout.rank * rows, (layout.rank + 1) * rows
    if split is Split.KEY_VALUE:
        rows = layout.local_kv_heads * layout.head_dim
        start = layout.first_kv_head * layout.head_dim
        return start, start + rows
    rows = size // layout.world_size
    return layout.rank * rows, (layout.rank + 1) * rows


def _take(source, dim: int, start: int, end: int):
    """``source[start:end]`` along ``dim`` (0 or 1) of a safetensors slice or tensor."""
    return source[start:end] if dim == 0 else source[:, start:end]


def shard_tensor(name: str, source, shape: list[int], layout: TPLayout) -> torch.Tensor:
    """This rank's part of checkpoint tensor ``name``; ``source`` is a safetensors slice (or a
    tensor), indexed so that only the part is read. A row-parallel bias is zeros on ranks
    other than 0."""
    plan = layout.plan
    split = plan.split_of(name)
    if split is Split.REPLICATED or layout.world_size == 1:
        return source[:]
    packed = next((spec for spec in layout.packed_tensors if name.endswith(spec.suffix)), None)
    if packed is not None:
        return _shard_packed(name, source, shape, split, layout, packed)
    if name.endswith(_FP8_SCALE_SUFFIXES):
        return _shard_fp8_scale(name, source, shape, split, layout)
    is_bias = len(shape) == 1
    out_dim = 1 if plan.is_transposed(name) and not is_bias else 0
    if split is Split.ROW:
        if is_bias:
            bias = source[:]  # a vector: reading it whole costs nothing
            return bias if layout.rank == 0 else torch.zeros_like(bias)
        in_dim = 1 - out_dim
        columns = shape[in_dim] // layout.world_size
        return _take(source, in_dim, layout.rank * columns, (layout.rank + 1) * columns)
    if split is Split.VOCAB:
        start, end = layout.vocab_start, layout.vocab_start + layout.local_vocab
        part = source[start : min(end, shape[0])]
        if part.shape[0] < layout.local_vocab:  # the padded tail of the last shard
            padding = part.new_zeros((layout.local_vocab - part.shape[0], *part.shape[1:]))
            part = torch.cat([part, padding])
        return part
    if split is Split.FUSED_QKV:
        q_rows = layout.num_heads * layout.head_dim
        kv_rows = layout.num_kv_heads * layout.head_dim
        parts = []
        for offset, part_split in ((0, Split.QUERY), (q_rows, Split.KEY_VALUE), (q_rows + kv_rows, Split.KEY_VALUE)):
            start, end = _output_range(part_split, layout, 0)
            parts.append(_take(source, out_dim, offset + start, offset + end))
        return torch.cat(parts, dim=out_dim)
    start, end = _output_range(split, layout, shape[out_dim])
    return _take(source, out_dim, start, end)


# Scales of pre-quantized FP8 layers (compressed-tensors, transformers' block format).
_FP8_SCALE_SUFFIXES = (".weight_scale", ".weight_scale_inv", ".input_scale")


def _shard_fp8_scale(name: str, source, shape: list[int], split: Split, layout: TPLayout) -> torch.Tensor:
    """An FP8 scale follows its weight: per-tensor and input scales are replicated, per-channel
    ones split with the output rows (whole on row-parallel layers), and a block grid by whole
    blocks of the weight's slice, which therefore has to start and end on block edges."""
    if name.endswith(".input_scale") or math.prod(shape) == 1:
        return source[:]
    if split is Split.FUSED_QKV or split is Split.VOCAB:
        raise ValueError(f"FP8 scale {name!r}: {split.value} layers are not quantized under tensor parallelism")
    if layout.scale_block is None:  # per channel: one scale per output row
        if split is Split.ROW:
            return source[:]
        start, end = _output_range(split, layout, shape[0])
        return source[start:end]
    block_n, block_k = layout.scale_block
    if split is Split.ROW:
        # A row-parallel layer's input is the attention heads or the MLP width.
        widths = {layout.num_heads * layout.head_dim, layout.intermediate_size}
        in_features = [width for width in widths if cdiv(width, block_k) == shape[1]]
        if len(in_features) != 1:
            raise ValueError(f"FP8 scale {name!r} of shape {tuple(shape)} matches no single input width of this model")
        columns = in_features[0] // layout.world_size
        _check_block_edges(name, columns, block_k, "input", layout)
        first = layout.rank * columns // block_k
        return source[:, first : first + columns // block_k]
    start, end = _output_range(split, layout, layout.intermediate_size)  # COLUMN: the MLP width
    _check_block_edges(name, end - start, block_n, "output", layout)
    return source[start // block_n : end // block_n]


def _shard_packed(name: str, source, shape: list[int], split: Split, layout: TPLayout, spec: PackedTensorSplit):
    """A tensor of a packed integer layer: this rank's outputs (column-parallel) or inputs
    (row-parallel), cut where its elements are whole words and whole groups."""
    if split is Split.FUSED_QKV or split is Split.VOCAB:
        raise ValueError(f"{name!r}: {split.value} layers are not quantized under tensor parallelism")
    if split is Split.ROW:
        if spec.in_dim is None or spec.in_per_element == 0:
            return source[:]
        # A row-parallel layer's input is the attention heads or the MLP width.
        widths = [w for w in {layout.num_heads * layout.head_dim, layout.intermediate_size}
                  if cdiv(w, spec.in_per_element) == shape[spec.in_dim]]
        if not widths:
            raise ValueError(f"{name!r} of shape {tuple(shape)} matches no input width of this model")
        columns = widths[0] // layout.world_size
        for width in widths:
            _check_whole(name, width // layout.world_size, spec.in_per_element, "input", layout)
        first = layout.rank * columns // spec.in_per_element
        return _take(source, spec.in_dim, first, first + columns // spec.in_per_element)
    if spec.out_dim is None:
        return source[:]
    start, end = _output_range(split, layout, shape[spec.out_dim] * spec.out_per_element)
    _check_whole(name, end - start, spec.out_per_element, "output", layout)
    per = spec.out_per_element
    return _take(source, spec.out_dim, start // per, cdiv(end, per))


def _check_whole(name: str, size: int, per_element: int, dim: str, layout: TPLayout) -> None:
    """Each rank's ``size`` features (all ranks alike) must be whole packed words or groups."""
    if size % per_element:
        raise ValueError(
            f"tensor_parallel_size={layout.world_size} gives each rank {size} {dim} features of the layer of "
            f"{name!r}, which are not whole {per_element}-wide groups (or packed words) of the quantized checkpoint; "
            f"choose a tensor_parallel_size that splits this model's heads and MLP width into multiples of "
            f"{per_element}"
        )


def _check_block_edges(name: str, size: int, block: int, dim: str, layout: TPLayout) -> None:
    """Each rank's ``size`` features (all ranks alike) must be whole scale blocks."""
    if size % block:
        raise ValueError(
            f"tensor_parallel_size={layout.world_size} gives each rank {size} {dim} features of the layer of {name!r}, "
            f"which are not whole {block}-wide FP8 scale blocks; choose a tensor_parallel_size that splits this "
            f"model's heads and MLP width into multiples of the checkpoint's weight_block_size"
        )


def iterate_sharded_safetensors(files: list[Path], layout: TPLayout) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, this rank's slice) for every checkpoint tensor, reading only that slice."""
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                source = handle.get_slice(name)
                yield name, shard_tensor(name, source, source.get_shape(), layout)
