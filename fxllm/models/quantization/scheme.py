"""Which FP8 scheme a model loads with: ``LLM(quantization=...)`` and config.json's ``quantization_config``.

Three sources, one ``Fp8Scheme``:
- ``quantization="fp8"`` on a full-precision checkpoint: weights quantized at load,
  per output channel; activations quantized per token on the GPU.
- transformers' FP8 checkpoints (``quant_method: "fp8"``, DeepSeek-V3 / Qwen3-FP8 style):
  ``*.weight`` in float8_e4m3fn with ``*.weight_scale_inv`` [ceil(out/bn), ceil(in/bk)]
  float32 multipliers for (bn, bk) = ``weight_block_size`` blocks; activations dynamic.
- compressed-tensors checkpoints (llm-compressor, ``quant_method: "compressed-tensors"``,
  format ``float-quantized`` or ``naive-quantized``): ``*.weight`` float8_e4m3fn with
  ``*.weight_scale`` [1] (strategy "tensor") or [out, 1] ("channel"), and ``*.input_scale``
  [1] where input activations are static.

Integer checkpoints (GPTQ, AWQ, compressed-tensors ``pack-quantized`` / ``int-quantized``)
are parsed by int_scheme.py into an ``IntWeightScheme`` or ``Int8Scheme``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any, Union

import torch

from fxllm.models.quantization import int_scheme
from fxllm.models.quantization.int_scheme import Int8Scheme, IntWeightScheme, UnsupportedScheme
from fxllm.parallel.tp_config import PackedTensorSplit

# vLLM's names for the methods, as ``LLM(quantization=...)`` takes them.
FP8 = "fp8"
COMPRESSED_TENSORS = int_scheme.COMPRESSED_TENSORS
GPTQ, AWQ = int_scheme.GPTQ, int_scheme.AWQ
QUANTIZATION_METHODS = (FP8, COMPRESSED_TENSORS, GPTQ, AWQ)
# Methods that only describe a checkpoint: nothing is quantized at load.
CHECKPOINT_METHODS = (COMPRESSED_TENSORS, GPTQ, AWQ)
SUPPORTED = (
    "quantization='fp8' (weights quantized to FP8 at load), or a pre-quantized checkpoint, detected from "
    "config.json's quantization_config: transformers' FP8 format (quant_method 'fp8' with weight_block_size); "
    "compressed-tensors (quant_method 'compressed-tensors') FP8 (format 'float-quantized' or 'naive-quantized', "
    "8-bit float weights with strategy 'tensor' or 'channel'), W4A16 / W8A16 (format 'pack-quantized', int "
    "weights with strategy 'group' or 'channel', symmetric or not) or W8A8 INT8 (format 'int-quantized', 8-bit "
    "per-channel weights, activations dynamic per token or static per tensor); GPTQ (quant_method 'gptq', 4 or 8 "
    "bits, group_size -1 or a power of two, sym true or false, desc_act, checkpoint_format 'gptq' or 'gptq_v2'); "
    "AWQ (quant_method 'awq', 4 bits, version 'gemm', zero points)"
)
# Kept in the model dtype whatever the checkpoint says (fxllm module names). MoE routers ("gate",
# Qwen2-MoE's "shared_expert_gate") choose and weigh experts: rounding them would change which run.
UNQUANTIZED_MODULES = frozenset({"lm_head", "gate", "shared_expert_gate"})

_CT_FORMATS = ("float-quantized", "naive-quantized")
_CT_INT_FORMATS = ("pack-quantized", "int-quantized")
_CT_WEIGHT_STRATEGIES = ("tensor", "channel")
_CT_STATUSES_WITH_WEIGHTS = ("compressed", "frozen")


class WeightScales(enum.Enum):
    """How many weights share one scale in the checkpoint."""

    CHANNEL = "channel"  # one per output row
    TENSOR = "tensor"  # one per checkpoint tensor
    BLOCK = "block"  # one per (block_n, block_k) tile


class ActivationScheme(enum.Enum):
    """How the W8A8 GEMM quantizes its input."""

    DYNAMIC = "dynamic"  # per token, at run time
    STATIC = "static"  # one calibrated scale per layer (the checkpoint's input_scale)
    NONE = "none"  # weight-only: activations stay in the model dtype


@dataclass(frozen=True)
class Fp8Scheme:
    """How a model's linear layers are stored in FP8 and run."""

    method: str  # "fp8" or "compressed-tensors"
    prequantized: bool  # False: full-precision checkpoint quantized at load
    weight_scales: WeightScales
    activations: ActivationScheme
    weight_block: tuple[int, int] | None = None  # (block_n, block_k) where weight_scales is BLOCK
    scale_name: str = "weight_scale"  # the checkpoint's name for the weight scale tensor
    ignore: tuple[str, ...] = ()  # checkpoint module names (or patterns) left unquantized
    ignore_rule: str = COMPRESSED_TENSORS  # how ``ignore`` entries match: "fp8" or "compressed-tensors"

    def quantizes(self, checkpoint_module: str) -> bool:
        """Whether the checkpoint module of this name (e.g. ``model.layers.0.self_attn.q_proj``) is FP8."""
        if self.ignore_rule == FP8:
            return not any(_transformers_skip_matches(pattern, checkpoint_module) for pattern in self.ignore)
        return not any(_compressed_tensors_matches(pattern, checkpoint_module) for pattern in self.ignore)


QuantizationScheme = Union[Fp8Scheme, IntWeightScheme, Int8Scheme]

QUANTIZE_ON_LOAD = Fp8Scheme(
    method=FP8, prequantized=False, weight_scales=WeightScales.CHANNEL, activations=ActivationScheme.DYNAMIC
)


def resolve_quantization(requested: Any, hf_config: Any) -> QuantizationScheme | None:
    """The scheme for ``LLM(quantization=requested)`` on a checkpoint with this config, or None."""
    if requested is not None and requested not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization={requested!r} is not supported; supported: None, {SUPPORTED}")
    checkpoint = getattr(hf_config, "quantization_config", None)
    if checkpoint is None:
        if requested in CHECKPOINT_METHODS:
            raise ValueError(
                f"quantization={requested!r} needs a checkpoint saved in that format (config.json "
                "quantization_config); for a full-precision checkpoint pass quantization='fp8'"
            )
        return QUANTIZE_ON_LOAD if requested == FP8 else None
    scheme = parse_quantization_config(checkpoint, _checkpoint_dtype(hf_config))
    if requested is not None and requested != scheme.method:
        raise ValueError(
            f"quantization={requested!r} does not match the checkpoint, which is quantized with {scheme.method!r} "
            f"(config.json quantization_config); drop the quantization argument to load it as it is"
        )
    return scheme


def quantization_method(requested: Any, hf_config: Any) -> str | None:
    """Validate ``LLM(quantization=...)`` against the checkpoint; the method the model loads
    with (ModelConfig.quantization), None for full precision."""
    scheme = resolve_quantization(requested, hf_config)
    return scheme.method if scheme is not None else None


def model_quantization(method: str | None, hf_config: Any) -> QuantizationScheme | None:
    """The scheme the model builder applies for ModelConfig.quantization ``method``."""
    return resolve_quantization(method, hf_config)


def weight_scale_block(hf_config: Any) -> tuple[int, int] | None:
    """(block_n, block_k) one stored weight scale covers in a block-scaled FP8 checkpoint; None
    otherwise (tensor parallelism keeps a rank's slices aligned to it)."""
    scheme = resolve_quantization(None, hf_config)
    if not isinstance(scheme, Fp8Scheme):
        return None
    return scheme.weight_block if scheme.weight_scales is WeightScales.BLOCK else None


def _checkpoint_dtype(hf_config: Any) -> torch.dtype:
    """The dtype the checkpoint's floating tensors (compressed-tensors scales among them) are saved in."""
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def parse_quantization_config(config: Any, checkpoint_dtype: torch.dtype = torch.float32) -> QuantizationScheme:
    if hasattr(config, "to_dict"):  # a transformers QuantizationConfigMixin
        config = config.to_dict()
    if not isinstance(config, dict):
        raise ValueError(f"config.json quantization_config must be an object, got {type(config).__name__}; {SUPPORTED}")
    method = config.get("quant_method")
    try:
        if method == FP8:
            return _parse_transformers_fp8(config)
        if method == COMPRESSED_TENSORS:
            return _parse_compressed_tensors(config, checkpoint_dtype)
        if method == GPTQ:
            return int_scheme.parse_gptq(config)
        if method == AWQ:
            return int_scheme.parse_awq(config)
    except UnsupportedScheme as error:
        raise _malformed(str(error)) from None
    raise ValueError(f"checkpoint quantization quant_method={method!r} is not supported; supported: {SUPPORTED}")


def _malformed(message: str) -> ValueError:
    return ValueError(f"config.json quantization_config: {message}. Supported: {SUPPORTED}")


def _parse_transformers_fp8(config: dict) -> Fp8Scheme:
    block = config.get("weight_block_size")
    if block is None:
        raise _malformed(
            "quant_method 'fp8' without weight_block_size (per-tensor FP8 as AutoFP8 writes it) is not supported; "
            "re-quantize block-wise or to compressed-tensors"
        )
    if (
        not isinstance(block, (list, tuple))
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise _malformed(f"weight_block_size must be two positive ints like [128, 128], got {block!r}")
    activation_scheme = config.get("activation_scheme", "dynamic")
    if activation_scheme != "dynamic":
        # As in vLLM: block-wise weights come with dynamic per-token-group activations only.
        raise _malformed(f"activation_scheme {activation_scheme!r} with block-wise weights; only 'dynamic' is")
    if config.get("fmt", "e4m3") != "e4m3":
        raise _malformed(f"fmt {config['fmt']!r}; only 'e4m3' (float8_e4m3fn) is")
    if config.get("scale_fmt", "float") != "float":
        raise _malformed(f"scale_fmt {config['scale_fmt']!r}; only 'float' (float32 scales) is")
    if config.get("modules_to_convert"):
        raise _malformed("modules_to_convert (FP8 embeddings) is not supported")
    skip = config.get("modules_to_not_convert") or config.get("ignored_layers") or []
    return Fp8Scheme(
        method=FP8,
        prequantized=True,
        weight_scales=WeightScales.BLOCK,
        activations=ActivationScheme.DYNAMIC,
        weight_block=(block[0], block[1]),
        scale_name="weight_scale_inv",
        ignore=tuple(_strings("modules_to_not_convert", skip)),
        ignore_rule=FP8,
    )


def _parse_compressed_tensors(config: dict, checkpoint_dtype: torch.dtype) -> QuantizationScheme:
    groups = config.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        count = len(groups) if isinstance(groups, dict) else 0
        raise _malformed(f"config_groups must hold exactly one group, got {count}")
    group_name, group = next(iter(groups.items()))
    if not isinstance(group, dict):
        raise _malformed(f"config_groups.{group_name} must be an object")
    data_format = group.get("format") or config.get("format")
    weights = group.get("weights")
    integer = isinstance(weights, dict) and weights.get("type") == "int"
    if integer and data_format not in _CT_INT_FORMATS:
        raise _malformed(f"format {data_format!r} with int weights; {' or '.join(_CT_INT_FORMATS)} is supported")
    if not integer and data_format not in _CT_FORMATS:
        raise _malformed(f"format {data_format!r}; FP8 weights are stored as {' or '.join(_CT_FORMATS)}")
    status = config.get("quantization_status", "compressed")
    if status not in _CT_STATUSES_WITH_WEIGHTS:
        raise _malformed(f"quantization_status {status!r}: the weights are not quantized yet")
    if group.get("targets") != ["Linear"]:
        raise _malformed(f"config_groups.{group_name}.targets {group.get('targets')!r}; only ['Linear'] is")
    if group.get("output_activations") is not None:
        raise _malformed("output_activations quantization is not supported")
    if config.get("kv_cache_scheme") is not None:
        raise _malformed("kv_cache_scheme (an FP8 KV cache) is not supported")
    if (config.get("sparsity_config") or {}).get("format", "dense") != "dense":
        raise _malformed("sparse checkpoints (sparsity_config) are not supported")
    if config.get("transform_config"):
        raise _malformed("transform_config (weights rotated by Hadamard or other transforms) is not supported")
    ignore = tuple(_strings("ignore", config.get("ignore") or []))
    if integer:
        return int_scheme.parse_compressed_tensors_int(
            data_format, weights, group.get("input_activations"), ignore, checkpoint_dtype
        )
    weight_scales = _ct_weight_scales(group_name, weights)
    activations = _ct_activations(group_name, group.get("input_activations"))
    return Fp8Scheme(
        method=COMPRESSED_TENSORS,
        prequantized=True,
        weight_scales=weight_scales,
        activations=activations,
        scale_name="weight_scale",
        ignore=ignore,
        ignore_rule=COMPRESSED_TENSORS,
    )


def _is_float8(args: dict) -> bool:
    return args.get("num_bits") == 8 and args.get("type") == "float" and args.get("symmetric", True) is True


def _ct_weight_scales(group_name: str, weights: Any) -> WeightScales:
    where = f"config_groups.{group_name}.weights"
    if not isinstance(weights, dict) or not _is_float8(weights):
        raise _malformed(f"{where} must be 8-bit symmetric floats (num_bits 8, type 'float'), got {weights!r}")
    strategy = weights.get("strategy")
    if strategy not in _CT_WEIGHT_STRATEGIES:
        raise _malformed(f"{where}.strategy {strategy!r}; one of {', '.join(_CT_WEIGHT_STRATEGIES)} is")
    if weights.get("dynamic", False) is not False:
        raise _malformed(f"{where}.dynamic must be false (weights carry their scales)")
    return WeightScales(strategy)


def _ct_activations(group_name: str, inputs: Any) -> ActivationScheme:
    where = f"config_groups.{group_name}.input_activations"
    if inputs is None:
        return ActivationScheme.NONE
    if not isinstance(inputs, dict) or not _is_float8(inputs):
        raise _malformed(f"{where} must be null or 8-bit symmetric floats, got {inputs!r}")
    dynamic, strategy = inputs.get("dynamic"), inputs.get("strategy")
    if dynamic is True and strategy == "token":
        return ActivationScheme.DYNAMIC
    if dynamic is False and strategy == "tensor":
        return ActivationScheme.STATIC
    raise _malformed(
        f"{where} dynamic={dynamic!r} strategy={strategy!r}; supported: dynamic per 'token' or static per 'tensor'"
    )


def _strings(key: str, values: Any) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise _malformed(f"{key} must be a list of module names, got {values!r}")
    return values


def _compressed_tensors_matches(pattern: str, name: str) -> bool:
    """compressed-tensors' rule: the exact module name, or a regex after 're:' matched at the start."""
    if pattern.startswith("re:"):
        return re.match(pattern.removeprefix("re:"), name) is not None
    return pattern == name


def _transformers_skip_matches(pattern: str, name: str) -> bool:
    """transformers' ``modules_to_not_convert`` rule: a prefix (or regex) ending at a module
    boundary, or a suffix ("fc1" skips "model.decoder.layers.23.fc1")."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return re.match(rf"(?:{pattern}){boundary}", name) is not None or name.endswith(pattern)


def packed_tensor_splits(hf_config: Any, world_size: int) -> tuple[PackedTensorSplit, ...]:
    """How an integer checkpoint's packed tensors split over ``world_size`` tensor-parallel
    ranks (parallel.sharding cuts them); () for other checkpoints."""
    scheme = resolve_quantization(None, hf_config)
    if not isinstance(scheme, IntWeightScheme):
        return ()
    if scheme.act_order and world_size > 1:
        raise ValueError(
            f"tensor_parallel_size={world_size} with an act-order checkpoint ({scheme.method} desc_act / actorder "
            f"'group') is not supported yet: a rank's inputs would not hold whole groups. Use tensor_parallel_size=1 "
            f"or a checkpoint quantized without act-order"
        )
    return int_scheme.packed_tensor_splits(scheme)
