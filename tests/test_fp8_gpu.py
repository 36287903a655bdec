"""FP8 on a GPU with FP8 tensor cores (skipped elsewhere): the CUDA GEMMs and whole engines.

The GEMMs are checked against the dequantize reference (WEIGHT_ONLY) and an FP8
emulation (W8A8) at decode and prefill sizes. Whole engines, bf16 with CUDA graphs,
follow the rule bf16 itself follows against fp32: at the first token where FP8 and bf16
greedy outputs differ, each side's token is in the other's top-5.
"""

from __future__ import annotations

import gc
import importlib.util
from pathlib import Path

import pytest
import torch

from fxllm import LLM, SamplingParams
from fxllm.models.quantization.fp8_gemm import MIN_FP8_CAPABILITY, dequantize_gemm, w8a8_gemm
from fxllm.models.quantization.fp8_quant import quantize_per_channel, quantize_per_token
from fxllm.models.quantization.fp8_triton import fp8_weight_only_gemm
from tests.near_ties import TOP_K, assert_diverge_only_between_near_ties
from tests.test_fp8 import quantize_weight

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < MIN_FP8_CAPABILITY,
        reason="needs a GPU with FP8 (sm89 or newer)",
    ),
]

_TOOL = Path(__file__).resolve().parent.parent / "tools" / "write_fp8_checkpoint.py"
_spec = importlib.util.spec_from_file_location("write_fp8_checkpoint", _TOOL)
write_fp8 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(write_fp8)

NEW_TOKENS = 12
BF16_RELATIVE_ERROR = 1e-2
# Prompts long enough that prefill steps exceed WEIGHT_ONLY_MAX_TOKENS and take W8A8.
PROMPTS = [
    "Once upon a time there was a tiny model that learned to count: one two three four five six seven",
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog again and again.",
    "Hello",
]


@pytest.mark.parametrize("num_tokens", [1, 7, 16, 33, 300])
@pytest.mark.parametrize("block", [None, (128, 128)], ids=["per-channel", "block128"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weight_only_gemm_equals_the_dequantize_reference(num_tokens, block, dtype):
    generator = torch.Generator(device="cuda").manual_seed(0)
    out_features, in_features = 1536, 1024 + 64  # a partial 128-block along K
    weight = torch.randn(out_features, in_features, device="cuda", generator=generator) * 0.02
    quantized, scale, block = quantize_weight(weight, block)
    x = torch.randn(num_tokens, in_features, device="cuda", generator=generator).to(dtype)
    bias = torch.randn(out_features, device="cuda", generator=generator).to(dtype)
    out = fp8_weight_only_gemm(x, quantized, scale, bias, *block)
    reference = dequantize_gemm(x, quantized, scale, bias, *block)
    # fp32: the reference matmul may use another summation order; bf16: one rounding each.
    relative = 1e-4 if dtype == torch.float32 else BF16_RELATIVE_ERROR
    torch.testing.assert_close(out.float(), reference.float(), rtol=0, atol=relative * reference.abs().max().item())


@pytest.mark.parametrize("block", [None, (128, 128)], ids=["per-channel", "block128"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemv_kernel_equals_the_dequantize_reference(block, dtype):
    generator = torch.Generator(device="cuda").manual_seed(1)
    out_features, in_features = 4096 + 8, 1024 + 64  # partial output tiles and a partial 128-block along K
    weight = torch.randn(out_features, in_features, device="cuda", generator=generator) * 0.02
    quantized, scale, block = quantize_weight(weight, block)
    x = torch.randn(1, in_features, device="cuda", generator=generator).to(dtype)
    bias = torch.randn(out_features, device="cuda", generator=generator).to(dtype)
    out = fp8_weight_only_gemm(x, quantized, scale, bias, *block, gemv=True)
    reference = dequantize_gemm(x, quantized, scale, bias, *block)
    relative = 1e-4 if dtype == torch.float32 else BF16_RELATIVE_ERROR
    torch.testing.assert_close(out.float(), reference.float(), rtol=0, atol=relative * reference.abs().max().item())


@pytest.mark.parametrize("num_tokens", [1, 17, 256])
@pytest.mark.parametrize("static", [False, True], ids=["per-token", "static"])
def test_w8a8_gemm_equals_fp8_emulation(num_tokens, static):
    generator = torch.Generator(device="cuda").manual_seed(1)
    quantized, scale = quantize_per_channel(torch.randn(512, 256, device="cuda", generator=generator) * 0.1)
    x = torch.randn(num_tokens, 256, device="cuda", generator=generator).bfloat16()
    bias = torch.randn(512, device="cuda", generator=generator).bfloat16()
    if static:
        input_scale = x.float().abs().amax().reshape(1) / 448
        x_fp8, x_scale = (x.float() / input_scale).to(torch.float8_e4m3fn), input_scale
    else:
        input_scale = None
        x_fp8, x_scale = quantize_per_token(x)
    emulated = (x_fp8.float() * x_scale) @ (quantized.float() * scale).t() + bias.float()
    out = w8a8_gemm(x, quantized, scale, bias, input_scale)
    assert out.dtype == torch.bfloat16
    tolerance = BF16_RELATIVE_ERROR * emulated.abs().max().item()
    torch.testing.assert_close(out.float(), emulated, rtol=0, atol=tolerance)


def _greedy(model: Path, **kwargs) -> list:
    llm = LLM(model=str(model), device="cuda", dtype="bfloat16", max_model_len=256, gpu_memory_utilization=0.3, **kwargs)
    assert llm.compile_report().cudagraph_sizes, "CUDA graphs were not captured"
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP_K)
    outputs = [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return outputs


@pytest.fixture(scope="module")
def bf16_outputs(tiny_model_dirs):
    return {arch: _greedy(tiny_model_dirs[arch]) for arch in ("llama", "qwen3")}


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_dynamic_fp8_diverges_from_bf16_only_between_near_ties(arch, tiny_model_dirs, bf16_outputs):
    assert_diverge_only_between_near_ties(_greedy(tiny_model_dirs[arch], quantization="fp8"), bf16_outputs[arch])


@pytest.mark.parametrize("fmt", [dict(fmt="fp8"), dict(fmt="compressed-tensors", strategy="channel")],
                         ids=["block128", "ct-channel"])
def test_fp8_checkpoints_diverge_from_bf16_only_between_near_ties(fmt, llama_dir, tmp_path, bf16_outputs):
    checkpoint = write_fp8.write_fp8_checkpoint(llama_dir, tmp_path / "fp8", **fmt)
    assert_diverge_only_between_near_ties(_greedy(checkpoint), bf16_outputs["llama"])
