"""FP8 quantization: ``LLM(quantization="fp8")`` and pre-quantized FP8 checkpoints.

scheme.py (which scheme a model loads with) -> fp8_model.py (build the model with
``Fp8Linear`` layers) -> fp8_linear.py (the layer and how it loads) -> fp8_gemm.py (the
``fxllm::fp8_linear`` op and its GEMMs) -> fp8_triton.py (the weight-only kernel);
fp8_quant.py holds the FP8 numerics they share.
"""

from fxllm.models.quantization.fp8_model import construct_with_fp8_linears
from fxllm.models.quantization.scheme import (
    Fp8Scheme,
    model_quantization,
    quantization_method,
    resolve_quantization,
    weight_scale_block,
)

__all__ = [
    "Fp8Scheme",
    "construct_with_fp8_linears",
    "model_quantization",
    "quantization_method",
    "resolve_quantization",
    "weight_scale_block",
]
