"""From a user's ``model=`` argument to a built model with its weights loaded."""

from __future__ import annotations

import contextlib
import functools
import json
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from fxllm.config import ModelConfig
from fxllm.models.interface import Model
from fxllm.models.native_configs import read_native_config
from fxllm.models.quantization import (
    construct_with_quantized_linears,
    model_quantization,
    packed_tensor_splits,
    weight_scale_block,
)
from fxllm.models.registry import resolve_architecture
from fxllm.models.sharded_state import load_sharded_state
from fxllm.parallel.sharding import iterate_sharded_safetensors
from fxllm.parallel.tp_config import TPLayout, tp_layout, tp_local_config
from fxllm.models.weights import iterate_safetensors, safetensors_files

HfOverrides = dict[str, Any] | Callable[[PretrainedConfig], PretrainedConfig] | None

# The initializers torch's layers call from reset_parameters(). Every parameter is then
# overwritten by the checkpoint (the loaders fail on any they leave unwritten), so running
# them only costs time: on a CPU, seconds for a 1B model.
_PARAMETER_INITIALIZERS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)


def resolve_model_dir(model: str | None) -> Path:
    """A local HF-style directory for ``model``: the default model, a .gguf file or a directory."""
    if model is None:
        from fxllm.models.default_model import default_model

        return Path(default_model())
    if not isinstance(model, (str, Path)):
        raise TypeError(f"model must be a path (str), got {type(model).__name__}")
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model path {model!r} does not exist; pass a local Hugging Face model directory or a "
            f".gguf file (fxllm does not download from model hubs)"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {model!r} is not a .gguf file; pass a model directory or a .gguf file")
        from fxllm.models.gguf import gguf_to_hf_dir

        return Path(gguf_to_hf_dir(path))
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {path}: is this a Hugging Face model directory?")
    return path


def load_hf_config(model_dir: Path, hf_overrides: HfOverrides) -> PretrainedConfig:
    """config.json as transformers reads it, or as fxllm does for architectures whose config class
    is remote code (``native_configs``), with ``hf_overrides`` applied."""
    config = read_native_config(model_dir)
    if config is None:
        try:
            config = AutoConfig.from_pretrained(str(model_dir))
        except (ValueError, KeyError, OSError, json.JSONDecodeError) as error:
            raise ValueError(f"could not read {model_dir / 'config.json'}: {error}") from error
    if hf_overrides is None:
        return config
    if callable(hf_overrides):
        return hf_overrides(config)
    if not isinstance(hf_overrides, dict):
        raise TypeError(f"hf_overrides must be a dict or a callable, got {type(hf_overrides).__name__}")
    for key, value in hf_overrides.items():
        setattr(config, key, value)
    return config


def load_generation_config(source: str, model_dir: Path) -> dict:
    """vLLM's ``generation_config``: "auto" reads the model's file, "vllm" ignores it, else a folder.
    A file that is not valid JSON gives the defaults, with a warning naming it (as vLLM)."""
    if not isinstance(source, str):
        raise TypeError(f"generation_config must be 'auto', 'vllm' or a folder path, got {type(source).__name__}")
    if source == "vllm":
        return {}
    folder = model_dir if source == "auto" else Path(source).expanduser()
    if source != "auto" and not folder.is_dir():
        raise FileNotFoundError(f"generation_config={source!r}: no such folder")
    file = folder / "generation_config.json"
    if not file.exists():
        if source != "auto":
            raise FileNotFoundError(f"generation_config={source!r}: no generation_config.json in {folder}")
        return {}
    try:
        values = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        warnings.warn(f"{file} is not valid JSON ({error}): sampling defaults are vLLM's", UserWarning, stacklevel=2)
        return {}
    if not isinstance(values, dict):
        warnings.warn(f"{file} does not hold a JSON object: sampling defaults are vLLM's", UserWarning, stacklevel=2)
        return {}
    return values


def model_tp_layout(hf_config: PretrainedConfig, rank: int, world_size: int) -> TPLayout:
    """Rank ``rank``'s part of a model split over ``world_size`` ranks, its quantized tensors
    included; a clear error where the model cannot split that way."""
    return tp_layout(
        hf_config, rank, world_size, weight_scale_block(hf_config), packed_tensor_splits(hf_config, world_size)
    )


def build_model(model_config: ModelConfig, device: torch.device, tp_layout: TPLayout | None = None) -> Model:
    """The model of ``model_config`` on ``device`` with its checkpoint's weights; quantized linears
    where the checkpoint or ``quantization`` asks for them; the vision tower of a
    vision-language architecture as its ``multimodal`` config allows. With ``tp_layout``,
    this rank's part: built from the TP-local config, reading only its weight slices."""
    hf_config = model_config.hf_config
    model_dir = Path(model_config.model)
    sharded = tp_layout is not None and tp_layout.world_size > 1
    if sharded:
        hf_config = tp_local_config(hf_config, tp_layout)
    _, model_class = resolve_architecture(getattr(hf_config, "architectures", None), f"{model_dir}/config.json")
    extra = () if model_config.multimodal is None else (model_config.multimodal,)
    construct = functools.partial(model_class, hf_config, model_config.max_model_len, *extra)
    quantization = model_quantization(model_config.quantization, hf_config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(model_config.dtype)
    try:
        with torch.device(device), _skip_parameter_init():
            model = construct() if quantization is None else construct_with_quantized_linears(construct, quantization)
    finally:
        torch.set_default_dtype(previous)
    if model_config.load_format == "sharded_state":
        rank, world_size = (0, 1) if tp_layout is None else (tp_layout.rank, tp_layout.world_size)
        load_sharded_state(model, model_dir, rank, world_size)
    elif model_config.load_format == "dummy":
        _fill_dummy_weights(model)
    else:
        files = safetensors_files(model_dir)
        model.load_weights(iterate_sharded_safetensors(files, tp_layout) if sharded else iterate_safetensors(files))
    return model.eval().requires_grad_(False)


# vLLM's load_format="dummy": small uniform weights, the same on every run.
DUMMY_WEIGHT_BOUND = 1e-3
DUMMY_WEIGHT_SEED = 0


@torch.no_grad()
def _fill_dummy_weights(model: nn.Module) -> None:
    """Random weights of the checkpoint's shapes, nothing read from disk (benchmarks without
    weights)."""
    generator = torch.Generator(device="cpu").manual_seed(DUMMY_WEIGHT_SEED)
    for name, parameter in model.named_parameters():
        if not parameter.dtype.is_floating_point:
            raise ValueError(
                f"load_format='dummy' fills floating-point weights only, and {name} is {parameter.dtype} (an "
                f"integer-quantized checkpoint): load its weights (load_format='auto')"
            )
        values = torch.empty(parameter.shape, dtype=torch.float32).uniform_(
            -DUMMY_WEIGHT_BOUND, DUMMY_WEIGHT_BOUND, generator=generator
        )
        parameter.copy_(values.to(parameter.dtype))


@contextlib.contextmanager
def _skip_parameter_init():
    """Layers built inside keep their parameters uninitialized (torch.nn.init does nothing).

    Buffers a layer computes itself (RoPE tables) are not initializers and still get their
    values."""
    saved = {name: getattr(nn.init, name) for name in _PARAMETER_INITIALIZERS}
    try:
        for name in saved:
            setattr(nn.init, name, _leave_uninitialized)
        yield
    finally:
        for name, initializer in saved.items():
            setattr(nn.init, name, initializer)


def _leave_uninitialized(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


def weight_bytes(model: nn.Module) -> int:
    """Device memory the model's parameters and buffers take (FP8 weights count one byte each)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
