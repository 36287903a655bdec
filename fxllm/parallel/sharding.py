"""Which slice of each checkpoint tensor a rank keeps, read without loading the whole tensor.

The plan is per architecture family and names checkpoint modules (HF names, before
the loader fuses q/k/v and gate/up): column-parallel weights are cut along the
output dim (dim 0), row-parallel ones along the input dim (dim 1), vocab-parallel
ones along the vocabulary (dim 0, zero-padded to equal shards); the rest (norms) is
replicated. A row-parallel bias is kept by rank 0 only: the all-reduce after the
projection then adds it exactly once.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Iterator

import torch

from fxllm.parallel.tp_config import TPLayout


class Split(enum.Enum):
    QUERY = "query"  # column-parallel by query heads
    KEY_VALUE = "key_value"  # column-parallel by KV heads (or one replicated KV head)
    COLUMN = "column"  # column-parallel by equal parts of the output dim
    ROW = "row"
    VOCAB = "vocab"
    REPLICATED = "replicated"


LLAMA_PLAN: dict[str, Split] = {
    "q_proj": Split.QUERY,
    "k_proj": Split.KEY_VALUE,
    "v_proj": Split.KEY_VALUE,
    "gate_proj": Split.COLUMN,
    "up_proj": Split.COLUMN,
    "o_proj": Split.ROW,
    "down_proj": Split.ROW,
    "embed_tokens": Split.VOCAB,
    "lm_head": Split.VOCAB,
}


def split_of(tensor_name: str, plan: dict[str, Split] = LLAMA_PLAN) -> Split:
    """How the tensor (a checkpoint tensor, or a model parameter: the module names agree for
    the row- and vocab-parallel ones, which the loader fuses nothing into) is split."""
    parts = tensor_name.split(".")
    module = parts[-2] if len(parts) >= 2 else ""
    return plan.get(module, Split.REPLICATED)


def _dim0_range(split: Split, layout: TPLayout, size: int) -> tuple[int, int]:
    if split is Split.QUERY:
        rows = layout.local_heads * layout.head_dim
        return layout.rank * rows, (layout.rank + 1) * rows
    if split is Split.KEY_VALUE:
        rows = layout.local_kv_heads * layout.head_dim
        start = layout.first_kv_head * layout.head_dim
        return start, start + rows
    rows = size // layout.world_size
    return layout.rank * rows, (layout.rank + 1) * rows


def shard_tensor(name: str, source, shape: list[int], layout: TPLayout) -> torch.Tensor:
    """This rank's part of checkpoint tensor ``name``; ``source`` is a safetensors slice (or a
    tensor), indexed so that only the part is read. A row-parallel bias is zeros on ranks
    other than 0."""
    split = split_of(name)
    is_bias = name.endswith(".bias")
    if split is Split.REPLICATED or layout.world_size == 1:
        return source[:]
    if split is Split.ROW:
        if is_bias:
            bias = source[:]  # a vector: reading it whole costs nothing
            return bias if layout.rank == 0 else torch.zeros_like(bias)
        columns = shape[1] // layout.world_size
        return source[:, layout.rank * columns : (layout.rank + 1) * columns]
    if split is Split.VOCAB:
        start, end = layout.vocab_start, layout.vocab_start + layout.local_vocab
        part = source[start : min(end, shape[0])]
        if part.shape[0] < layout.local_vocab:  # the padded tail of the last shard
            padding = part.new_zeros((layout.local_vocab - part.shape[0], *part.shape[1:]))
            part = torch.cat([part, padding])
        return part
    start, end = _dim0_range(split, layout, shape[0])
    return source[start:end]


def iterate_sharded_safetensors(files: list[Path], layout: TPLayout) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, this rank's slice) for every checkpoint tensor, reading only that slice."""
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                source = handle.get_slice(name)
                yield name, shard_tensor(name, source, source.get_shape(), layout)
