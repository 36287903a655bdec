"""Integer linear layers and how they load: ``IntWeightLinear`` (INT4 / INT8 weights) and ``Int8Linear`` (W8A8).

``IntWeightLinear`` keeps one layout whatever the checkpoint (int_pack.py): ``qweight`` int32
[N, K / pack], ``scales`` [groups, N] in the checkpoint's scale dtype, ``zeros`` [groups, N]
(asymmetric checkpoints; unsigned zero points held as floats, exact) and, for act-order
checkpoints, ``g_idx`` and the input order ``input_perm`` derived from it. Each checkpoint
tensor is converted as it arrives; fused projections (q/k/v, gate/up) take each shard into
its own output rows with its own scales and zero points, so no weight is requantized.

Act-order (GPTQ ``desc_act``, compressed-tensors ``actorder: group``): ``g_idx[k]`` names the
group of input feature k. Once loaded, the layer sorts its inputs by group (``input_perm``)
and stores the weight rows in that order, so groups are contiguous again and the kernels
stay the same; the op reorders the activations' features. The shards of a fused layer
share their input, hence their g_idx (GPTQ orders by the input's statistics).
"""

from __future__ import annotations

import torch
from torch import nn

from fxllm.models.quantization import int_pack
from fxllm.models.quantization.int_gemm import counters_needed, int8_linear, int_weight_linear
from fxllm.models.quantization.int_scheme import Int8Activations, Int8Scheme, IntWeightScheme, WeightLayout, WHOLE_ROW
from fxllm.models.weights import ShardRows
from fxllm.utils import cdiv

# The checkpoint's tensor names for each layout: packed weight, scales, zero points, g_idx,
# and tensors accepted without being stored.
_NAMES = {
    WeightLayout.GPTQ: ("qweight", "scales", "qzeros", "g_idx", ()),
    WeightLayout.AWQ: ("qweight", "scales", "qzeros", None, ()),
    # weight_shape repeats the layer's [out, in] (of the whole tensor, not of a TP rank's slice).
    WeightLayout.COMPRESSED_TENSORS: ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx",
                                      ("weight_shape",)),
}


class IntWeightLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: IntWeightScheme):
        super().__init__()
        per_word = int_pack.pack_factor(scheme.bits)
        if in_features % per_word:
            raise ValueError(
                f"a {scheme.bits}-bit layer needs a multiple of {per_word} input features, got {in_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.scheme = scheme
        self.bits = scheme.bits
        self.group_size = in_features if scheme.group_size == WHOLE_ROW else scheme.group_size
        groups = cdiv(in_features, self.group_size)
        frozen = dict(requires_grad=False)
        self.qweight = nn.Parameter(torch.empty(out_features, in_features // per_word, dtype=torch.int32), **frozen)
        self.scales = nn.Parameter(torch.empty(groups, out_features, dtype=scheme.scale_dtype), **frozen)
        zeros = None if scheme.symmetric else torch.empty(groups, out_features, dtype=scheme.scale_dtype)
        self.zeros = nn.Parameter(zeros, **frozen) if zeros is not None else None
        self.g_idx = nn.Parameter(torch.empty(in_features, dtype=torch.int32), **frozen) if scheme.act_order else None
        perm = torch.empty(in_features, dtype=torch.int32) if scheme.act_order else None
        self.register_buffer("input_perm", perm)
        self.bias = nn.Parameter(torch.empty(out_features), **frozen) if bias else None
        self.register_buffer("split_counters", torch.zeros(counters_needed(out_features), dtype=torch.int32))
        self._g_idx_loaded = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int_weight_linear(
            x, self.qweight, self.scales, self.zeros, self.input_perm, self.bias, self.split_counters,
            self.bits, self.group_size,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}, symmetric={self.zeros is None}, "
            f"act_order={self.g_idx is not None}"
        )

    # ---- loading (weights.load_named_weights calls these) ----

    def load_checkpoint_tensor(
        self, checkpoint_name: str, name: str, tensor: torch.Tensor, rows: ShardRows | None
    ) -> tuple[str, ...]:
        rows = rows or ShardRows(0, self.out_features)
        weight_name, scales_name, zeros_name, g_idx_name, accepted = _NAMES[self.scheme.layout]
        layout = self.scheme.layout
        if name == weight_name:
            _check_dtype(checkpoint_name, tensor, torch.int32, self.scheme)
            qweight = tensor.t() if layout is WeightLayout.GPTQ else tensor  # [rows, K / pack]
            if layout is WeightLayout.AWQ:
                qweight = int_pack.pack(int_pack.unpack_awq(tensor), self.bits, dim=0).t()
            _copy(checkpoint_name, self.qweight.narrow(0, rows.offset, rows.size), qweight)
            return ("qweight",)
        if name == scales_name:
            scales = tensor.t() if layout is WeightLayout.COMPRESSED_TENSORS else tensor  # [groups, rows]
            _copy(checkpoint_name, self.scales.narrow(1, rows.offset, rows.size), scales)
            return ("scales",)
        if name == zeros_name:
            if self.zeros is None:  # symmetric GPTQ stores its constant zero points anyway
                return ()
            _check_dtype(checkpoint_name, tensor, torch.int32, self.scheme)
            _copy(checkpoint_name, self.zeros.narrow(1, rows.offset, rows.size), self._unpack_zeros(tensor, rows.size))
            return ("zeros",)
        if name == g_idx_name and name is not None:
            if self.g_idx is None:  # without act-order GPTQ stores the trivial k // group_size
                return ()
            if self._g_idx_loaded and not torch.equal(self.g_idx, tensor.to(self.g_idx.dtype)):
                raise ValueError(
                    f"checkpoint tensor {checkpoint_name!r} orders the inputs differently from the other shards "
                    f"of its fused layer; act-order shards of one input must share their g_idx"
                )
            _copy(checkpoint_name, self.g_idx, tensor)
            self._g_idx_loaded = True
            return ("g_idx",)
        if name in accepted:
            return ()
        if name == "bias" and self.bias is not None:
            _copy(checkpoint_name, self.bias.narrow(0, rows.offset, rows.size), tensor)
            return ("bias",)
        raise ValueError(
            f"checkpoint tensor {checkpoint_name!r} is not part of a {self.scheme.method} {self.scheme.label} layer "
            f"(tensors {weight_name}, {scales_name}{'' if self.scheme.symmetric else ', ' + zeros_name}); does "
            f"config.json's quantization_config describe these weights?"
        )

    def _unpack_zeros(self, packed: torch.Tensor, size: int) -> torch.Tensor:
        """Stored zero points -> unsigned zero points [groups, size] as the scale dtype."""
        layout = self.scheme.layout
        if layout is WeightLayout.AWQ:
            zeros = int_pack.unpack_awq(packed)
        elif layout is WeightLayout.GPTQ:
            zeros = int_pack.unpack(packed, self.bits, dim=1)
        else:  # [ceil(rows / pack), groups] packed along the rows, signed values stored offset: unsigned
            zeros = int_pack.unpack(packed, self.bits, dim=0).t()
        return (zeros[:, :size] + self.scheme.zero_offset).to(self.scheme.scale_dtype)

    def finish_loading(self) -> None:
        """Act-order: store the inputs sorted by group (see the module docstring)."""
        if self.g_idx is None:
            return
        order = torch.argsort(self.g_idx.long(), stable=True)
        groups = self.g_idx.long()[order]
        if not torch.equal(groups, torch.arange(self.in_features, device=groups.device) // self.group_size):
            raise ValueError(
                f"the act-order g_idx of a layer with {self.in_features} inputs does not put {self.group_size} "
                f"inputs in each group; is group_size in config.json's quantization_config right?"
            )
        values = int_pack.unpack(self.qweight.t(), self.bits, dim=0)  # [K, N]
        self.qweight.copy_(int_pack.pack(values[order], self.bits, dim=0).t())
        self.input_perm.copy_(order.to(torch.int32))


class Int8Linear(nn.Module):
    """W8A8: ``weight`` int8 [out, in], ``weight_scale`` float32 [out, 1], ``input_scale`` [1]
    where activations are static (a fused layer keeps the largest of its shards', which
    clips none of them, as vLLM does)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: Int8Scheme):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme = scheme
        frozen = dict(requires_grad=False)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), **frozen)
        self.weight_scale = nn.Parameter(torch.empty(out_features, 1, dtype=torch.float32), **frozen)
        static = scheme.activations is Int8Activations.STATIC
        # Zero until the shards' scales arrive: loading keeps the largest.
        self.input_scale = nn.Parameter(torch.zeros(1), **frozen) if static else None
        self.bias = nn.Parameter(torch.empty(out_features), **frozen) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.weight_scale, self.bias, self.input_scale)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"activations={self.scheme.activations.value}"
        )

    def load_checkpoint_tensor(
        self, checkpoint_name: str, name: str, tensor: torch.Tensor, rows: ShardRows | None
    ) -> tuple[str, ...]:
        rows = rows or ShardRows(0, self.out_features)
        if name == "weight":
            _check_dtype(checkpoint_name, tensor, torch.int8, self.scheme)
            _copy(checkpoint_name, self.weight.narrow(0, rows.offset, rows.size), tensor)
            return ("weight",)
        if name == "weight_scale":
            _copy(checkpoint_name, self.weight_scale.narrow(0, rows.offset, rows.size), tensor)
            return ("weight_scale",)
        if name == "input_scale" and self.input_scale is not None:
            if tensor.numel() != 1:
                raise ValueError(f"checkpoint tensor {checkpoint_name!r} has shape {tuple(tensor.shape)}; a per-tensor "
                                 f"input scale has one value")
            self.input_scale.copy_(torch.maximum(self.input_scale, tensor.reshape(1).float()))
            return ("input_scale",)
        if name in ("weight_zero_point", "input_zero_point"):  # symmetric: written as zeros by some versions
            if torch.count_nonzero(tensor):
                raise ValueError(f"checkpoint tensor {checkpoint_name!r} holds nonzero zero points, but the "
                                 f"quantization_config says symmetric")
            return ()
        if name == "bias" and self.bias is not None:
            _copy(checkpoint_name, self.bias.narrow(0, rows.offset, rows.size), tensor)
            return ("bias",)
        raise ValueError(
            f"checkpoint tensor {checkpoint_name!r} is not part of a W8A8 INT8 layer ({self.scheme.activations.value} "
            f"activations); does config.json's quantization_config describe these weights?"
        )


def _check_dtype(checkpoint_name: str, tensor: torch.Tensor, dtype: torch.dtype, scheme) -> None:
    if tensor.dtype != dtype:
        raise ValueError(
            f"checkpoint tensor {checkpoint_name!r} is {tensor.dtype}, but config.json's quantization_config "
            f"({scheme.method}) makes it {dtype}; if the checkpoint left this layer unquantized, its "
            f"quantization_config should say so ('ignore' / 'modules_to_not_convert' / 'dynamic')"
        )


def _copy(checkpoint_name: str, target: torch.Tensor, tensor: torch.Tensor) -> None:
    if tuple(tensor.shape) != tuple(target.shape):
        raise ValueError(
            f"checkpoint tensor {checkpoint_name!r} gives shape {tuple(tensor.shape)} where the quantized layer "
            f"expects {tuple(target.shape)}; config.json (or its quantization_config: bits, group_size) does not "
            f"match these weights"
        )
    target.copy_(tensor)
