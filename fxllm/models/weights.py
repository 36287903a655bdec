"""Reading checkpoints: safetensors files (single or sharded) into a model's parameters."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Protocol, runtime_checkable

import torch
from torch import nn

from fxllm.models.interface import Model

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
# Buffers some checkpoints carry that models recompute.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class FusedShard:
    """A checkpoint tensor that is one slice (along dim 0) of a fused parameter."""

    fused_name: str
    index: int


@dataclass(frozen=True)
class ExpertShard:
    """Where a checkpoint tensor of one expert (``...experts.<expert>.<name>.weight``) goes: into
    that expert's slice of the stacked parameter ``...experts.<stacked_name>`` [experts, rows,
    cols], at the rows of part ``index`` of equal parts (gate and up halves), or all of them
    where ``index`` is None."""

    stacked_name: str
    index: int | None = None


@runtime_checkable
class LoadsExpertTensors(Protocol):
    """A layer of stacked experts (the module named ``experts``): it writes each expert's
    checkpoint tensors into its parameters itself (as they are, or quantized)."""

    def expected_expert_writes(self) -> dict[str, int]:
        """Parameter name -> how many checkpoint tensors write into it (one per expert and shard)."""
        ...

    def load_expert_tensor(self, checkpoint_name: str, expert: int, shard: ExpertShard, tensor: torch.Tensor) -> tuple[str, ...]:
        """Write one expert's tensor where ``shard`` says; return the names of the parameters written."""
        ...


# The module whose children are a checkpoint's experts, numbered: ``experts.0``, ``experts.1``, ...
EXPERTS_MODULE = "experts"


@dataclass(frozen=True)
class ShardRows:
    """The output rows (dim 0) of a layer that one checkpoint tensor fills: a fused shard's."""

    offset: int
    size: int


@runtime_checkable
class LoadsCheckpointTensors(Protocol):
    """A layer that loads its own checkpoint tensors (quantized layers: FP8 weights, scales)."""

    def load_checkpoint_tensor(
        self, checkpoint_name: str, name: str, tensor: torch.Tensor, rows: ShardRows | None
    ) -> tuple[str, ...]:
        """Load the tensor the checkpoint calls ``<layer>.<name>`` into ``rows`` (None: all rows)
        and return the names of the layer's parameters it wrote."""
        ...


@runtime_checkable
class FinishesLoading(Protocol):
    """A layer that converts what it loaded once all of it is there (act-order INT layers)."""

    def finish_loading(self) -> None: ...


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / SAFETENSORS_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise ValueError(f"{index} is not a valid safetensors index ({error}); re-download the checkpoint") from None
        files = sorted({model_dir / name for name in weight_map.values()})
    elif (model_dir / SAFETENSORS_SINGLE).exists():
        files = [model_dir / SAFETENSORS_SINGLE]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no .safetensors weights in {model_dir}: fxllm reads safetensors checkpoints "
            f"(convert .bin weights with transformers' save_pretrained(safe_serialization=True))"
        )
    for file in files:
        if not file.exists():
            raise FileNotFoundError(f"{file} is listed in {SAFETENSORS_INDEX} but missing; re-download the checkpoint")
    return files


def iterate_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        except Exception as error:  # safetensors raises several types for bad files
            if isinstance(error, (KeyboardInterrupt, MemoryError)):
                raise
            raise ValueError(
                f"could not read weights from {file}: {error}. The file may be truncated or "
                f"corrupt; re-download or re-save the checkpoint"
            ) from error


def load_named_weights(
    model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], skip: set[str] = frozenset()
) -> None:
    """Copy checkpoint tensors into ``model`` by HF name, filling fused parameters.

    The model declares ``fused_weights`` (checkpoint module name -> FusedShard) and
    ``fused_shard_sizes(fused_name)``, and for MoE layers ``expert_weights`` (an expert's
    checkpoint module name -> ExpertShard). Layers that are ``LoadsCheckpointTensors`` take
    their tensors themselves. Every parameter must be written exactly once per shard (and
    per expert).
    """
    params = dict(model.named_parameters())
    fused_weights: Mapping[str, FusedShard] = model.fused_weights if isinstance(model, Model) else {}
    expert_weights: Mapping[str, ExpertShard] = model.expert_weights if isinstance(model, Model) else {}
    own_loaders = {name: m for name, m in model.named_modules() if isinstance(m, LoadsCheckpointTensors)}
    expert_layers = {name: m for name, m in model.named_modules() if isinstance(m, LoadsExpertTensors)}
    pending = {name: _num_shards(model, name, fused_weights) for name in params}
    for layer_name, layer in expert_layers.items():
        pending.update({f"{layer_name}.{param}": count for param, count in layer.expected_expert_writes().items()})
    for name, tensor in weights:
        if name in skip or name.endswith(_IGNORED_SUFFIXES):
            continue
        expert = _resolve_expert(name, expert_weights)
        if expert is not None:
            layer_name, index, shard = expert
            if layer_name not in expert_layers:
                raise ValueError(
                    f"checkpoint tensor {name!r} is an expert's, but {type(model).__name__} has no experts at "
                    f"{layer_name!r}; is the config's architecture right for these weights?"
                )
            with torch.no_grad():
                written = expert_layers[layer_name].load_expert_tensor(name, index, shard, tensor)
            for param_name in written:
                pending[f"{layer_name}.{param_name}"] -= 1
            continue
        target, shard = _resolve(name, fused_weights)
        layer_name, _, leaf = target.rpartition(".")
        if layer_name in own_loaders:
            with torch.no_grad():
                written = own_loaders[layer_name].load_checkpoint_tensor(name, leaf, tensor, _shard_rows(model, shard))
            for param_name in written:
                pending[f"{layer_name}.{param_name}"] -= 1
            continue
        if target not in params:
            raise ValueError(
                f"checkpoint tensor {name!r} has no matching parameter in {type(model).__name__}; "
                f"is the config's architecture right for these weights?"
            )
        param = params[target]
        quantized = tensor.dtype in _FP8_DTYPES or not (tensor.is_floating_point() or tensor.is_complex())
        if quantized and param.is_floating_point() and param.dtype not in _FP8_DTYPES:
            raise ValueError(
                f"checkpoint tensor {name!r} is {tensor.dtype}, but {target!r} is not a quantized layer; "
                f"config.json needs the checkpoint's quantization_config (and must not list this layer as ignored)"
            )
        with torch.no_grad():
            if shard is None:
                _check_shape(name, param.shape, tensor.shape)
                param.copy_(tensor)
            else:
                rows = _shard_rows(model, shard)
                part = param.narrow(0, rows.offset, rows.size)
                _check_shape(name, part.shape, tensor.shape)
                part.copy_(tensor)
        pending[target] -= 1
    missing = sorted(name for name, count in pending.items() if count > 0)
    if missing:
        raise ValueError(f"checkpoint is missing weights for: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    with torch.no_grad():
        for module in own_loaders.values():
            if isinstance(module, FinishesLoading):
                module.finish_loading()


def _resolve_expert(name: str, expert_weights: Mapping[str, ExpertShard]) -> tuple[str, int, ExpertShard] | None:
    """(experts layer, expert, shard) of a checkpoint tensor ``...experts.<expert>.<module>.weight``;
    None for any other tensor."""
    parts = name.split(".")
    if len(parts) < 4:
        return None
    *scope, experts, expert, module, leaf = parts
    if experts != EXPERTS_MODULE or not expert.isdigit() or module not in expert_weights or leaf != "weight":
        return None
    return ".".join([*scope, experts]), int(expert), expert_weights[module]


def _shard_rows(model: nn.Module, shard: FusedShard | None) -> ShardRows | None:
    if shard is None:
        return None
    sizes = model.fused_shard_sizes(shard.fused_name)
    return ShardRows(sum(sizes[: shard.index]), sizes[shard.index])


def _resolve(name: str, fused_weights: dict[str, FusedShard]) -> tuple[str, FusedShard | None]:
    parts = name.split(".")
    for i, part in enumerate(parts):
        shard = fused_weights.get(part)
        if shard is not None:
            return ".".join(parts[:i] + [shard.fused_name] + parts[i + 1 :]), shard
    return name, None


def _num_shards(model: nn.Module, param_name: str, fused_weights: dict[str, FusedShard]) -> int:
    module_name = param_name.split(".")[-2] if "." in param_name else ""
    fused_names = {shard.fused_name for shard in fused_weights.values()}
    if module_name in fused_names:
        return len(model.fused_shard_sizes(module_name))
    return 1


def _check_shape(name: str, expected: torch.Size, got: torch.Size) -> None:
    if expected != got:
        raise ValueError(
            f"checkpoint tensor {name!r} has shape {tuple(got)} but the model expects {tuple(expected)}; "
            f"the config.json does not match these weights"
        )
