"""Build any model with quantized linear layers, leaving the model files untouched.

While the model class constructs itself, each ``nn.Linear`` (and each MoE layer's stacked
experts, ``FusedMoE``) moves to the meta device as it is registered, so the full-precision
model never exists at once (the peak is one layer). Afterwards every linear of the decoder
becomes the scheme's layer (``Fp8Linear``, ``IntWeightLinear`` or ``Int8Linear``) and, under
FP8, every ``FusedMoE`` an ``Fp8FusedMoE`` (quantized at load; pre-quantized FP8 experts are
not read yet); ``lm_head`` and the layers the checkpoint leaves unquantized get real storage
for the loader to fill.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from fxllm.models.moe.layer import FusedMoE
from fxllm.models.quantization.fp8_linear import Fp8Linear
from fxllm.models.quantization.fp8_moe import Fp8FusedMoE
from fxllm.models.quantization.int_linear import Int8Linear, IntWeightLinear
from fxllm.models.quantization.int_scheme import Int8Scheme, IntWeightScheme
from fxllm.models.quantization.scheme import UNQUANTIZED_MODULES, Fp8Scheme, QuantizationScheme


def construct_with_quantized_linears(construct: Callable[[], nn.Module], scheme: QuantizationScheme) -> nn.Module:
    """``construct()`` the model (inside the caller's device and default-dtype context) with
    its linear layers quantized as ``scheme`` says."""

    def linear_to_meta(parent: nn.Module, name: str, module: nn.Module) -> nn.Module | None:
        return module.to("meta") if type(module) in (nn.Linear, FusedMoE) else None

    handle = register_module_module_registration_hook(linear_to_meta)
    try:
        model = construct()
    finally:
        handle.remove()
    for name, module in list(model.named_modules()):
        if type(module) is FusedMoE:
            if not isinstance(scheme, Fp8Scheme):
                raise ValueError(
                    f"this checkpoint's MoE experts ({name}) are {_label(scheme)}-quantized, which fxllm does not "
                    f"read yet; load a full-precision checkpoint (quantization='fp8' quantizes its experts)"
                )
            if scheme.prequantized:
                raise ValueError(
                    f"this checkpoint's MoE experts ({name}) are pre-quantized FP8, which fxllm does not read yet; "
                    f"load a full-precision checkpoint with quantization='fp8'"
                )
            model.set_submodule(name, Fp8FusedMoE.like(module))
            continue
        if type(module) is not nn.Linear:
            continue
        shards = _checkpoint_shards(model, name, module.out_features)
        if _is_quantized(name, shards, scheme):
            sizes = [size for _, size in shards]
            model.set_submodule(name, _quantized_linear(module, scheme, sizes))
        else:
            _materialize(module)
    return model


def _quantized_linear(linear: nn.Linear, scheme: QuantizationScheme, shard_sizes: list[int]) -> nn.Module:
    shape = (linear.in_features, linear.out_features, linear.bias is not None)
    if isinstance(scheme, IntWeightScheme):
        return IntWeightLinear(*shape, scheme)
    if isinstance(scheme, Int8Scheme):
        return Int8Linear(*shape, scheme)
    return Fp8Linear(*shape, scheme, shard_sizes)


def _label(scheme: QuantizationScheme) -> str:
    return "FP8" if isinstance(scheme, Fp8Scheme) else scheme.label


def _checkpoint_shards(model: nn.Module, name: str, out_features: int) -> list[tuple[str, int]]:
    """(checkpoint module name, output rows) of each checkpoint layer fused into layer ``name``
    (``...qkv_proj`` -> ``...q_proj``, ``...k_proj``, ``...v_proj``); itself where not fused."""
    prefix, _, leaf = name.rpartition(".")
    parts = sorted(
        (shard.index, checkpoint_leaf)
        for checkpoint_leaf, shard in model.fused_weights.items()
        if shard.fused_name == leaf
    )
    if not parts:
        return [(name, out_features)]
    sizes = model.fused_shard_sizes(leaf)
    scope = f"{prefix}." if prefix else ""
    return [(scope + checkpoint_leaf, sizes[index]) for index, checkpoint_leaf in parts]


def _is_quantized(name: str, shards: list[tuple[str, int]], scheme: QuantizationScheme) -> bool:
    if name.rpartition(".")[2] in UNQUANTIZED_MODULES:
        return False
    quantized = {scheme.quantizes(checkpoint_name) for checkpoint_name, _ in shards}
    if len(quantized) > 1:
        names = ", ".join(checkpoint_name for checkpoint_name, _ in shards)
        raise ValueError(
            f"the checkpoint's quantization_config leaves some of {names} unquantized but not all; fxllm fuses "
            f"them into one layer ({name}), which must be all {_label(scheme)} or none"
        )
    return quantized.pop()


def _materialize(linear: nn.Linear) -> None:
    """Uninitialized storage on the context's device for a linear parked on meta (the loader fills it)."""
    for param_name, param in list(linear.named_parameters(recurse=False)):
        if param.is_meta:
            setattr(linear, param_name, nn.Parameter(torch.empty(param.shape, dtype=param.dtype)))
