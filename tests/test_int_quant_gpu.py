"""INT4 / INT8 on a CUDA GPU (skipped elsewhere): the Triton kernels, W8A8 and whole engines.

The weight-only kernels are checked against the dequantize reference at every group size and
at decode, split-K and prefill step sizes; W8A8 against an int8 emulation. Whole engines, bf16
with CUDA graphs, follow the rule bf16 itself follows against fp32: at the first token where
the quantized and bf16 greedy outputs differ, each side's token is in the other's top-5.
"""

from __future__ import annotations

import gc
import importlib.util
from pathlib import Path

import pytest
import torch

from fxllm import LLM, SamplingParams
from fxllm.models.quantization.int_gemm import counters_needed, int8_gemm, quantize_int8_per_token
from fxllm.models.quantization.int_pack import dequantize_packed
from fxllm.models.quantization.int_triton import int_weight_gemm
from tests.near_ties import TOP_K, assert_diverge_only_between_near_ties
from tests.test_int_quant import quantized_layer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

_TOOL = Path(__file__).resolve().parent.parent / "tools" / "write_int_checkpoint.py"
_spec = importlib.util.spec_from_file_location("write_int_checkpoint", _TOOL)
write_int = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(write_int)

BF16_RELATIVE_ERROR = 1e-2
NEW_TOKENS = 12
PROMPTS = [
    "Once upon a time there was a tiny model that learned to count: one two three four five six seven",
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog again and again.",
    "Hello",
]


@pytest.mark.parametrize("num_tokens", [1, 7, 16, 33, 256])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("bits, symmetric", [(4, True), (4, False), (8, True)], ids=["int4", "int4-asym", "int8"])
def test_int_weight_gemm_equals_the_dequantize_reference(num_tokens, group_size, bits, symmetric):
    out_features, in_features = 1536 + 8, 2048 + 128  # partial output tiles, K not a power of two
    qweight, scales, zeros, group = quantized_layer(out_features, in_features, bits, group_size, symmetric)
    qweight, scales = qweight.cuda(), scales.half().cuda()
    zeros = zeros.half().cuda() if zeros is not None else None
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(num_tokens, in_features, device="cuda", generator=generator).bfloat16()
    bias = torch.randn(out_features, device="cuda", generator=generator).bfloat16()
    counters = torch.zeros(counters_needed(out_features), dtype=torch.int32, device="cuda")
    out = int_weight_gemm(x, qweight, scales, zeros, bias, counters, bits, group)
    weight = dequantize_packed(qweight.t(), scales, zeros, bits, group, torch.float32)
    reference = torch.nn.functional.linear(x.float(), weight, bias.float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float(), reference, rtol=0, atol=BF16_RELATIVE_ERROR * reference.abs().max().item()
    )
    assert not counters.any()  # split-K counters reset for the next call


@pytest.mark.parametrize("num_tokens", [1, 17, 256])
@pytest.mark.parametrize("static", [False, True], ids=["per-token", "static"])
def test_w8a8_gemm_equals_int8_emulation(num_tokens, static):
    generator = torch.Generator(device="cuda").manual_seed(1)
    weight = torch.randint(-127, 128, (512, 256), device="cuda", generator=generator, dtype=torch.int8)
    weight_scale = torch.rand(512, 1, device="cuda", generator=generator) * 0.01
    x = torch.randn(num_tokens, 256, device="cuda", generator=generator).bfloat16()
    if static:
        input_scale = x.float().abs().amax().reshape(1) / 127
        x_int8, x_scale = (x.float() / input_scale).round().clamp(-128, 127), input_scale
    else:
        input_scale = None
        x_int8, x_scale = quantize_int8_per_token(x)
    emulated = (x_int8.float() * x_scale) @ (weight.float() * weight_scale).t()
    out = int8_gemm(x, weight, weight_scale, None, input_scale)
    torch.testing.assert_close(out.float(), emulated, rtol=0, atol=BF16_RELATIVE_ERROR * emulated.abs().max().item())


def _greedy(model: Path) -> list:
    llm = LLM(model=str(model), device="cuda", dtype="bfloat16", max_model_len=256, gpu_memory_utilization=0.3)
    assert llm.compile_report().cudagraph_sizes, "CUDA graphs were not captured"
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP_K)
    outputs = [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return outputs


CHECKPOINTS = {
    "gptq-int4-g32": dict(fmt="gptq", bits=4, group_size=32),
    "gptq-int8-act-order": dict(fmt="gptq", bits=8, group_size=32, symmetric=False, desc_act=True),
    "awq-g32": dict(fmt="awq", group_size=32, symmetric=False),
    "ct-w4a16-g64-asym": dict(fmt="compressed-tensors", bits=4, group_size=64, symmetric=False),
    "ct-w8a8-dynamic": dict(fmt="compressed-tensors", w8a8="dynamic"),
}


@pytest.mark.parametrize("variant", CHECKPOINTS)
def test_int_checkpoints_dequantized_on_the_gpu_diverge_from_their_cpu_dequantized_run_only_between_near_ties(
    variant, llama_dir, tmp_path
):
    """The CUDA kernels against the same checkpoint's CPU path (dequantize, fp32 matmul)."""
    checkpoint = write_int.write_int_checkpoint(llama_dir, tmp_path / variant, **CHECKPOINTS[variant])
    cpu = LLM(model=str(checkpoint), enforce_eager=True, max_model_len=256, device="cpu")
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP_K)
    reference = [o.outputs[0] for o in cpu.generate(PROMPTS, params, use_tqdm=False)]
    assert_diverge_only_between_near_ties(_greedy(checkpoint), reference)
