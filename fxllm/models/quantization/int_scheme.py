"""Which integer scheme a checkpoint's config.json ``quantization_config`` describes.

Two kinds of layers come out of it:
- ``IntWeightScheme``: weight-only INT4 / INT8 with group (or channel) scales, activations in
  the model dtype. GPTQ (``quant_method: "gptq"``, AutoGPTQ / GPTQModel), AutoAWQ's GEMM
  format (``"awq"``) and compressed-tensors ``pack-quantized`` (llm-compressor's W4A16 /
  W8A16).
- ``Int8Scheme``: compressed-tensors ``int-quantized`` (llm-compressor's W8A8 INT8):
  int8 weights with one scale per output channel, activations quantized to int8 per token at
  run time or with a calibrated per-tensor scale.

Every option these formats have that fxllm does not run is an error naming it
(``scheme.SUPPORTED`` lists what is).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

import torch

from fxllm.models.quantization.int_pack import pack_factor
from fxllm.parallel.tp_config import PackedTensorSplit

GPTQ = "gptq"
AWQ = "awq"
COMPRESSED_TENSORS = "compressed-tensors"

WEIGHT_BITS = (4, 8)
# Group sizes: powers of two (a power-of-two K tile then holds whole groups) of at least one
# int32 word of 4-bit values (so a word's values share their scale).
MIN_GROUP_SIZE = 8
WHOLE_ROW = -1  # the formats' group_size for one scale per output channel
GPTQ_FORMATS = ("gptq", "gptq_v2")
AWQ_VERSIONS = ("gemm",)


class WeightLayout(enum.Enum):
    """How the checkpoint stores a layer's packed weight, zero points and scales (int_pack.py)."""

    GPTQ = "gptq"
    AWQ = "awq"
    COMPRESSED_TENSORS = "compressed-tensors"


class Int8Activations(enum.Enum):
    DYNAMIC = "dynamic"  # per token, at run time
    STATIC = "static"  # the checkpoint's per-tensor input_scale


@dataclass(frozen=True)
class IntWeightScheme:
    """Weight-only integer layers: ``real = (q - zero) * scale`` per group of input features."""

    method: str  # "gptq", "awq" or "compressed-tensors"
    layout: WeightLayout
    bits: int
    group_size: int  # input features per scale; WHOLE_ROW: one per output channel
    symmetric: bool  # True: zero is 2 ** (bits - 1) and no zero points are stored
    act_order: bool  # input features grouped by a stored g_idx, not in order
    zero_offset: int = 0  # added to stored zero points (GPTQ's original format stores zero - 1)
    scale_dtype: torch.dtype = torch.float16
    ignore: tuple[str, ...] = ()  # checkpoint module names (or patterns) left unquantized
    ignore_rule: str = COMPRESSED_TENSORS  # how ignore entries match: a method name
    only: tuple[str, ...] = ()  # GPTQ's modules_in_block_to_quantize: if any, only modules ending in one

    @property
    def label(self) -> str:
        return f"INT{self.bits}"

    def quantizes(self, checkpoint_module: str) -> bool:
        if self.only and not any(checkpoint_module.endswith("." + name) for name in self.only):
            return False
        return not any(ignore_matches(self.ignore_rule, pattern, checkpoint_module) for pattern in self.ignore)


@dataclass(frozen=True)
class Int8Scheme:
    """W8A8 INT8: int8 weights [out, in] with a float scale per output channel."""

    method: str
    activations: Int8Activations
    ignore: tuple[str, ...] = ()
    ignore_rule: str = COMPRESSED_TENSORS
    label: str = "INT8"

    def quantizes(self, checkpoint_module: str) -> bool:
        return not any(ignore_matches(self.ignore_rule, pattern, checkpoint_module) for pattern in self.ignore)


def ignore_matches(rule: str, pattern: str, name: str) -> bool:
    if rule == AWQ:  # AutoAWQ / transformers: a part of the name
        return pattern in name
    if rule == GPTQ:  # GPTQModel's dynamic "-:" entries: a regex matched at the start
        return re.match(pattern, name) is not None
    if pattern.startswith("re:"):  # compressed-tensors: the exact name, or a regex after "re:"
        return re.match(pattern.removeprefix("re:"), name) is not None
    return pattern == name


class UnsupportedScheme(ValueError):
    """A quantization_config option fxllm does not run (scheme.py adds what is supported)."""


def _int(config: dict, key: str, default: Any = None) -> Any:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UnsupportedScheme(f"{key} must be an int, got {value!r}")
    return value


def _check_bits(bits: int, method: str) -> None:
    if bits not in WEIGHT_BITS:
        raise UnsupportedScheme(f"{method} with {bits}-bit weights; {' or '.join(map(str, WEIGHT_BITS))} bits are")


def _check_group_size(group_size: int, where: str) -> None:
    power_of_two = group_size > 0 and group_size & (group_size - 1) == 0
    if group_size != WHOLE_ROW and not (power_of_two and group_size >= MIN_GROUP_SIZE):
        raise UnsupportedScheme(
            f"{where} {group_size}; supported: -1 (one scale per output channel) or a power of two >= {MIN_GROUP_SIZE} "
            f"(e.g. 32, 64, 128)"
        )


def parse_gptq(config: dict) -> IntWeightScheme:
    bits = _int(config, "bits")
    _check_bits(bits, "GPTQ")
    group_size = _int(config, "group_size")
    _check_group_size(group_size, "GPTQ group_size")
    checkpoint_format = config.get("checkpoint_format") or "gptq"
    if checkpoint_format not in GPTQ_FORMATS:
        raise UnsupportedScheme(f"GPTQ checkpoint_format {checkpoint_format!r}; {' or '.join(GPTQ_FORMATS)} is")
    if config.get("lm_head", False):
        raise UnsupportedScheme("GPTQ with a quantized lm_head (lm_head: true)")
    ignore = []
    for pattern, override in (config.get("dynamic") or {}).items():
        if not pattern.startswith("-:"):  # GPTQModel: "+:" or bare patterns override bits/group per module
            raise UnsupportedScheme(f"GPTQ dynamic per-module override {pattern!r}: {override!r}; only '-:' exclusions")
        ignore.append(pattern.removeprefix("-:"))
    blocks = config.get("modules_in_block_to_quantize") or []
    only = tuple(name for block in blocks for name in (block if isinstance(block, list) else [block]))
    desc_act = config.get("desc_act", False)
    symmetric = config.get("sym", True)
    if not isinstance(desc_act, bool) or not isinstance(symmetric, bool):
        raise UnsupportedScheme(f"GPTQ desc_act and sym must be true or false, got {desc_act!r} and {symmetric!r}")
    return IntWeightScheme(
        method=GPTQ,
        layout=WeightLayout.GPTQ,
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
        act_order=desc_act,
        zero_offset=1 if checkpoint_format == "gptq" else 0,
        ignore=tuple(ignore),
        ignore_rule=GPTQ,
        only=only,
    )


def parse_awq(config: dict) -> IntWeightScheme:
    bits = _int(config, "bits", config.get("w_bit"))
    if bits != 4:
        raise UnsupportedScheme(f"AWQ with {bits}-bit weights; 4 bits are")
    group_size = _int(config, "group_size", config.get("q_group_size"))
    _check_group_size(group_size, "AWQ group_size")
    version = str(config.get("version", "gemm")).lower()
    if version not in AWQ_VERSIONS:
        raise UnsupportedScheme(f"AWQ version {version!r}; the GEMM packing ('gemm') is")
    if config.get("zero_point", True) is not True:
        raise UnsupportedScheme("AWQ without zero points (zero_point: false)")
    skip = config.get("modules_to_not_convert") or []
    if not isinstance(skip, list) or not all(isinstance(name, str) for name in skip):
        raise UnsupportedScheme(f"AWQ modules_to_not_convert must be a list of names, got {skip!r}")
    return IntWeightScheme(
        method=AWQ,
        layout=WeightLayout.AWQ,
        bits=4,
        group_size=group_size,
        symmetric=False,
        act_order=False,
        ignore=tuple(skip),
        ignore_rule=AWQ,
    )


# compressed-tensors' actorder values: "group" stores g_idx; "weight" / "static" reorder only
# while quantizing, so the checkpoint's groups are in order.
_CT_ACTORDER_IN_ORDER = (None, False, "weight", "static")


def parse_compressed_tensors_int(
    data_format: str, weights: dict, inputs: dict | None, ignore: tuple[str, ...], scale_dtype: torch.dtype
) -> IntWeightScheme | Int8Scheme:
    """A compressed-tensors config group with integer weights (format pack-quantized or int-quantized)."""
    bits, strategy = weights.get("num_bits"), weights.get("strategy")
    if weights.get("dynamic", False) is not False:
        raise UnsupportedScheme("weights.dynamic must be false (weights carry their scales)")
    if data_format == "pack-quantized":
        if inputs is not None:
            raise UnsupportedScheme(f"pack-quantized weights with quantized input activations {inputs!r}")
        _check_bits(bits, "compressed-tensors pack-quantized")
        if strategy == "group":
            group_size = _int(weights, "group_size")
            _check_group_size(group_size, "weights.group_size")
        elif strategy == "channel":
            group_size = WHOLE_ROW
        else:
            raise UnsupportedScheme(f"pack-quantized weights.strategy {strategy!r}; 'group' or 'channel' is")
        actorder = weights.get("actorder")
        if actorder not in (*_CT_ACTORDER_IN_ORDER, "group"):
            raise UnsupportedScheme(f"weights.actorder {actorder!r}")
        symmetric = weights.get("symmetric", True)
        return IntWeightScheme(
            method=COMPRESSED_TENSORS,
            layout=WeightLayout.COMPRESSED_TENSORS,
            bits=bits,
            group_size=group_size,
            symmetric=bool(symmetric),
            act_order=actorder == "group",
            scale_dtype=scale_dtype,
            ignore=ignore,
        )
    # int-quantized (W8A8)
    if bits != 8 or strategy != "channel" or weights.get("symmetric", True) is not True:
        raise UnsupportedScheme(
            f"int-quantized weights {bits}-bit strategy {strategy!r} symmetric={weights.get('symmetric')!r}; "
            f"8-bit symmetric per 'channel' is"
        )
    if inputs is None:
        raise UnsupportedScheme("int-quantized weights without input_activations (use pack-quantized for W8A16)")
    if inputs.get("num_bits") != 8 or inputs.get("type") != "int" or inputs.get("symmetric", True) is not True:
        raise UnsupportedScheme(f"input_activations {inputs!r}; 8-bit symmetric ints are supported")
    dynamic, input_strategy = inputs.get("dynamic"), inputs.get("strategy")
    if dynamic is True and input_strategy == "token":
        activations = Int8Activations.DYNAMIC
    elif dynamic is False and input_strategy == "tensor":
        activations = Int8Activations.STATIC
    else:
        raise UnsupportedScheme(
            f"input_activations dynamic={dynamic!r} strategy={input_strategy!r}; dynamic per 'token' or static per "
            f"'tensor' is"
        )
    return Int8Scheme(method=COMPRESSED_TENSORS, activations=activations, ignore=ignore)


def packed_tensor_splits(scheme: IntWeightScheme) -> tuple[PackedTensorSplit, ...]:
    """Where each checkpoint tensor of ``scheme``'s layers keeps its outputs and inputs (int_pack.py)."""
    per_word = pack_factor(scheme.bits)
    group = 0 if scheme.group_size == WHOLE_ROW else scheme.group_size  # 0: every rank has all groups
    if scheme.layout is WeightLayout.GPTQ:  # [K / pack, N] words, [groups, N / pack] zeros, [groups, N] scales
        return (
            PackedTensorSplit(".qweight", out_dim=1, out_per_element=1, in_dim=0, in_per_element=per_word),
            PackedTensorSplit(".qzeros", out_dim=1, out_per_element=per_word, in_dim=0, in_per_element=group),
            PackedTensorSplit(".scales", out_dim=1, out_per_element=1, in_dim=0, in_per_element=group),
            PackedTensorSplit(".g_idx", out_dim=None, out_per_element=1, in_dim=0, in_per_element=1),
        )
    if scheme.layout is WeightLayout.AWQ:  # [K, N / 8] words, [groups, N / 8] zeros, [groups, N] scales
        return (
            PackedTensorSplit(".qweight", out_dim=1, out_per_element=per_word, in_dim=0, in_per_element=1),
            PackedTensorSplit(".qzeros", out_dim=1, out_per_element=per_word, in_dim=0, in_per_element=group),
            PackedTensorSplit(".scales", out_dim=1, out_per_element=1, in_dim=0, in_per_element=group),
        )
    # compressed-tensors: [N, K / pack] words, [N, groups] scales, [N / pack, groups] zero points
    return (
        PackedTensorSplit(".weight_packed", out_dim=0, out_per_element=1, in_dim=1, in_per_element=per_word),
        PackedTensorSplit(".weight_scale", out_dim=0, out_per_element=1, in_dim=1, in_per_element=group),
        PackedTensorSplit(".weight_zero_point", out_dim=0, out_per_element=per_word, in_dim=1, in_per_element=group),
        PackedTensorSplit(".weight_g_idx", out_dim=None, out_per_element=1, in_dim=0, in_per_element=1),
        PackedTensorSplit(".weight_shape", out_dim=None, out_per_element=1, in_dim=None, in_per_element=0),
    )
