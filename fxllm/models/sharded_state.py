"""``load_format="sharded_state"``: one weights file per tensor-parallel rank, written once.

Each file holds one rank's parameters exactly as its model holds them (q/k/v and
gate/up already fused, already sliced), so loading reads one file a rank and does
no slicing: load time stays flat as the number of ranks grows.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

SHARDED_STATE_INFO = "sharded_state.json"


def rank_file(directory: Path, rank: int) -> Path:
    return directory / f"model-rank-{rank}-part-0.safetensors"


def save_sharded_state(model: nn.Module, directory: Path, rank: int, world_size: int) -> None:
    from safetensors.torch import save_model  # handles tied (shared) weights

    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(rank_file(directory, rank)))
    if rank == 0:
        (directory / SHARDED_STATE_INFO).write_text(json.dumps({"tensor_parallel_size": world_size}) + "\n")


def load_sharded_state(model: nn.Module, directory: Path, rank: int, world_size: int) -> None:
    from safetensors.torch import load_model

    info = directory / SHARDED_STATE_INFO
    if not info.exists():
        raise FileNotFoundError(
            f"load_format='sharded_state' but {directory} has no {SHARDED_STATE_INFO}: write the per-rank files "
            f"with tools/save_sharded_state.py (or LLM.save_sharded_state) first"
        )
    saved = json.loads(info.read_text())["tensor_parallel_size"]
    if saved != world_size:
        raise ValueError(
            f"{directory} holds weights sharded for tensor_parallel_size={saved}; load it with "
            f"tensor_parallel_size={saved}, or save it again for {world_size}"
        )
    load_model(model, str(rank_file(directory, rank)), strict=True)
