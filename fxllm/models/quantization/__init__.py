"""Quantized linear layers: ``LLM(quantization="fp8")`` and pre-quantized FP8, INT4 and INT8 checkpoints.

scheme.py (which scheme a model loads with; int_scheme.py parses the integer formats) ->
quantized_model.py (build the model with quantized layers) ->
- FP8: fp8_linear.py (the layer and how it loads) -> fp8_gemm.py (the ``fxllm::fp8_linear``
  op and its GEMMs) -> fp8_triton.py (the weight-only kernel); fp8_quant.py holds the FP8
  numerics they share.
- INT: int_linear.py (``IntWeightLinear``, ``Int8Linear`` and how each format loads) ->
  int_gemm.py (the ``fxllm::int_weight_linear`` and ``fxllm::int8_linear`` ops) ->
  int_triton.py (the weight-only kernels); int_pack.py holds the packed layouts.
"""

from fxllm.models.quantization.quantized_model import construct_with_quantized_linears
from fxllm.models.quantization.scheme import (
    Fp8Scheme,
    model_quantization,
    packed_tensor_splits,
    quantization_method,
    resolve_quantization,
    weight_scale_block,
)

__all__ = [
    "Fp8Scheme",
    "construct_with_quantized_linears",
    "model_quantization",
    "packed_tensor_splits",
    "quantization_method",
    "resolve_quantization",
    "weight_scale_block",
]
