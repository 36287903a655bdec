"""FP8: ``quantization="fp8"``, transformers' block-wise and compressed-tensors checkpoints, the FP8 GEMMs.

Checkpoints are written by tools/write_fp8_checkpoint.py from the tiny Llama: its fused
q/k/v shards have 64/32/32 rows and its hidden size is 64, so 128 x 128 blocks straddle
shards and overhang the weights' edges. The loader is checked exactly against HF transformers running the
checkpoint's own dequantized weights; the distance to full precision is checked with a
stated tolerance. The CUDA GEMMs run here on CPU: the Triton kernel under Triton's
interpreter, W8A8 through ``torch._scaled_mm``'s CPU implementation.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from fxllm import LLM, SamplingParams
from fxllm.models.quantization.fp8_gemm import (
    WEIGHT_ONLY_MAX_TOKENS,
    Fp8Gemm,
    dequantize_gemm,
    select_fp8_gemm,
    w8a8_gemm,
)
from fxllm.models.quantization.fp8_linear import Fp8Linear, scale_block
from fxllm.models.quantization.fp8_quant import quantize_per_block, quantize_per_channel, quantize_per_token
from fxllm.models.quantization.fp8_triton import fp8_weight_only_gemm
from fxllm.models.quantization.scheme import ActivationScheme, resolve_quantization
from tests.tiny_models import VOCAB_SIZE

_TOOL = Path(__file__).resolve().parent.parent / "tools" / "write_fp8_checkpoint.py"
_spec = importlib.util.spec_from_file_location("write_fp8_checkpoint", _TOOL)
write_fp8 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(write_fp8)

PROMPT = "Once upon a time there was a tiny model that learned to count: one two three"
# fxllm's CPU path is the checkpoint's weights dequantized, then fp32 matmuls: it equals HF
# running those weights up to float32 summation order.
DEQUANTIZED_TOLERANCE = 1e-4  # max |logprob difference|
# Relative L2 distance of each position's centered logits from full precision. E4M3 keeps 3
# mantissa bits (every weight moves by up to 1/16 of itself), and these random tiny models
# amplify weight noise: measured 0.09-0.20 for the tiny Llama / Qwen3 / Granite, where
# bf16 weights and activations give 0.015-0.03.
FULL_PRECISION_TOLERANCE = 0.3
BF16_RELATIVE_ERROR = 1e-2
# (tool arguments, LLM's quantization method)
CHECKPOINTS = {
    # 128 x 128 blocks: q/k/v shards (64/32/32 rows) cannot share blocks -> per-row scales.
    "fp8-block128": (dict(fmt="fp8"), "fp8"),
    # 32 x 32 blocks: every shard aligned -> the block grids concatenate.
    "fp8-block32": (dict(fmt="fp8", block=(32, 32)), "fp8"),
    # 48 x 40 blocks: unaligned shards and partial blocks along both dimensions.
    "fp8-block48x40": (dict(fmt="fp8", block=(48, 40)), "fp8"),
    "ct-tensor": (dict(fmt="compressed-tensors", strategy="tensor"), "compressed-tensors"),
    "ct-channel-static": (
        dict(fmt="compressed-tensors", strategy="channel", activations="static"),
        "compressed-tensors",
    ),
}
QUANTIZE_ON_LOAD = "fp8-on-load"


@pytest.fixture(scope="module")
def checkpoint_dirs(llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp8_checkpoints")
    return {
        name: write_fp8.write_fp8_checkpoint(llama_dir, root / name, **args) for name, (args, _) in CHECKPOINTS.items()
    }


@pytest.fixture(scope="module")
def engines(llama_dir, checkpoint_dirs):
    """One eager engine per variant, built on first use."""
    built: dict[str, LLM] = {}

    def get(variant: str) -> LLM:
        if variant not in built:
            if variant == QUANTIZE_ON_LOAD:
                built[variant] = LLM(model=str(llama_dir), quantization="fp8", enforce_eager=True, max_logprobs=-1)
            elif variant == "full":
                built[variant] = LLM(model=str(llama_dir), enforce_eager=True, max_logprobs=-1)
            else:
                built[variant] = LLM(model=str(checkpoint_dirs[variant]), enforce_eager=True, max_logprobs=-1)
        return built[variant]

    return get


def engine_logprobs(llm: LLM) -> tuple[list[int], torch.Tensor]:
    """Prompt ids and the log-softmax [len - 1, vocab] of every position that predicts a prompt token."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=-1)  # the whole vocabulary
    output = llm.generate(PROMPT, params, use_tqdm=False)[0]
    rows = torch.empty(len(output.prompt_token_ids) - 1, VOCAB_SIZE)
    for row, position in enumerate(output.prompt_logprobs[1:]):
        for token_id, logprob in position.items():
            rows[row, token_id] = logprob.logprob
    return output.prompt_token_ids, rows


def hf_logprobs(model_dir: Path, prompt_ids: list[int], weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """HF transformers in fp32 with ``weights`` (name -> tensor) in place of the checkpoint's."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, tensor in weights.items():
            model.get_parameter(name).copy_(tensor)
        return model(torch.tensor([prompt_ids])).logits[0, :-1].log_softmax(-1)


def dequantized_checkpoint(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """Each FP8 weight times the scale of its block, as the formats define it (written
    independently of fxllm's dequantize)."""
    config = json.loads((checkpoint_dir / "config.json").read_text())["quantization_config"]
    block = config.get("weight_block_size")
    with safe_open(str(checkpoint_dir / "model.safetensors"), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    weights = {}
    for name, weight in tensors.items():
        if weight.dtype != torch.float8_e4m3fn:
            continue
        prefix = name.removesuffix("weight")
        scale = tensors.get(prefix + "weight_scale_inv", tensors.get(prefix + "weight_scale")).float()
        if block is not None:
            rows = torch.arange(weight.shape[0])[:, None] // block[0]
            cols = torch.arange(weight.shape[1])[None, :] // block[1]
            scale = scale[rows, cols]
        weights[name] = weight.float() * scale  # [1], [out, 1] and [out, in] broadcast alike
    return weights


def quantized_on_load(model_dir: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's linear weights rounded to E4M3 with one scale per output row."""
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as handle:
        names = [n for n in handle.keys() if n.endswith("proj.weight")]
        weights = {n: handle.get_tensor(n) for n in names}
    rounded = {}
    for name, weight in weights.items():
        scale = weight.abs().amax(dim=1, keepdim=True) / torch.finfo(torch.float8_e4m3fn).max
        rounded[name] = (weight / scale).to(torch.float8_e4m3fn).float() * scale
    return rounded


def centered_distance(logprobs: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest relative L2 distance of a position's centered logits (log-softmax minus its mean)."""
    ours, theirs = logprobs - logprobs.mean(-1, keepdim=True), reference - reference.mean(-1, keepdim=True)
    return ((ours - theirs).norm(dim=-1) / theirs.norm(dim=-1)).max().item()


# ---- checkpoints and quantization at load ---------------------------------------------


@pytest.mark.parametrize("variant", sorted(CHECKPOINTS))
def test_checkpoint_loads_without_options_and_generates(variant, engines):
    llm = engines(variant)
    assert llm.llm_engine_config.model.quantization == CHECKPOINTS[variant][1]
    model = llm.llm_engine.runner.model
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert len(layers) == 8  # q/k/v, o, gate/up, down in each of two layers
    assert all(layer.weight.dtype == torch.float8_e4m3fn for layer in layers.values())
    assert not isinstance(model.lm_head, Fp8Linear) and model.lm_head.weight.dtype == torch.float32
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    output = llm.generate([PROMPT, "Hello"], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in output] == [6, 6]


@pytest.mark.parametrize("variant", [*sorted(CHECKPOINTS), QUANTIZE_ON_LOAD])
def test_fp8_logits_equal_hf_running_the_same_fp8_weights(variant, engines, llama_dir, checkpoint_dirs):
    prompt_ids, logprobs = engine_logprobs(engines(variant))
    if variant == QUANTIZE_ON_LOAD:
        weights = quantized_on_load(llama_dir)
    else:
        weights = dequantized_checkpoint(checkpoint_dirs[variant])
    assert len(weights) == 14  # q, k, v, o, gate, up, down in two layers
    reference = hf_logprobs(llama_dir, prompt_ids, weights)
    assert (logprobs - reference).abs().max().item() < DEQUANTIZED_TOLERANCE


@pytest.mark.parametrize("variant", [*sorted(CHECKPOINTS), QUANTIZE_ON_LOAD])
def test_fp8_logits_stay_within_tolerance_of_full_precision(variant, engines):
    full_ids, full = engine_logprobs(engines("full"))
    prompt_ids, logprobs = engine_logprobs(engines(variant))
    assert prompt_ids == full_ids
    assert centered_distance(logprobs, full) < FULL_PRECISION_TOLERANCE


def test_block_scales_concatenate_only_when_every_shard_is_block_aligned(engines):
    config = write_fp8.transformers_fp8_config((128, 128))
    scheme = resolve_quantization(None, SimpleNamespace(quantization_config=config))
    assert scale_block(scheme, 64, [64, 32, 32]) == (1, 128)  # q ends mid-block: per row
    assert scale_block(scheme, 64, [128, 128, 100]) == (128, 128)  # only the last shard may be partial
    qkv = {name: engines(name).llm_engine.runner.model.model.layers[0].self_attn.qkv_proj for name in CHECKPOINTS}
    assert (qkv["fp8-block128"].block_n, qkv["fp8-block128"].block_k) == (1, 128)
    assert (qkv["fp8-block32"].block_n, qkv["fp8-block32"].block_k) == (32, 32)
    assert tuple(qkv["fp8-block32"].weight_scale.shape) == (4, 2)
    assert tuple(qkv["fp8-block48x40"].weight_scale.shape) == (128, 2)
    assert tuple(qkv["ct-tensor"].weight_scale.shape) == (128, 1)  # per-shard scales, one per row


def test_static_input_scale_of_a_fused_layer_is_the_largest_of_its_shards(engines, checkpoint_dirs):
    with safe_open(str(checkpoint_dirs["ct-channel-static"] / "model.safetensors"), framework="pt") as handle:
        names = [f"model.layers.1.self_attn.{shard}.input_scale" for shard in ("q_proj", "k_proj", "v_proj")]
        shard_scales = [handle.get_tensor(name) for name in names]
    layer = engines("ct-channel-static").llm_engine.runner.model.model.layers[1].self_attn.qkv_proj
    assert layer.activation_scheme == "static"
    assert layer.input_scale.item() == max(s.item() for s in shard_scales) > 0


def test_fp8_weights_take_less_memory_than_bf16(llama_dir):
    def weight_bytes(llm: LLM) -> int:
        return llm.compile_report().weight_bytes

    bf16 = LLM(model=str(llama_dir), dtype="bfloat16", enforce_eager=True)
    fp8 = LLM(model=str(llama_dir), dtype="bfloat16", quantization="fp8", enforce_eager=True)
    linear_weights = sum(
        m.weight.numel() for m in fp8.llm_engine.runner.model.modules() if isinstance(m, Fp8Linear)
    )
    # One byte saved per linear weight, less 4 bytes of scale per output row.
    assert weight_bytes(fp8) <= weight_bytes(bf16) - linear_weights + 4 * linear_weights // 64
    assert weight_bytes(fp8) < weight_bytes(bf16)


def test_piecewise_compile_traces_fp8_linear_and_equals_eager(llama_dir, engines):
    # Inductor left out: a cold compile costs ~40 s here; capture and split are what meet Fp8Linear.
    compilation = {"level": 3, "use_inductor": False}
    compiled = LLM(model=str(llama_dir), quantization="fp8", max_model_len=128, compilation_config=compilation)
    report = compiled.compile_report()
    assert report.dynamo_compiles == 1
    assert sum(ops.get("fxllm.fp8_linear", 0) for ops in report.piece_ops) == 8
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    prompts = [PROMPT, "Hello", "The capital of France is"]
    eager = engines(QUANTIZE_ON_LOAD).generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in compiled.generate(prompts, params, use_tqdm=False)] == [
        o.outputs[0].token_ids for o in eager
    ]


# ---- the GEMMs -----------------------------------------------------------------------


def quantize_weight(weight: torch.Tensor, block: tuple[int, int] | None):
    """(FP8 weight, scales, (block_n, block_k)): per output channel where ``block`` is None."""
    if block is None:
        return (*quantize_per_channel(weight), (1, weight.shape[1]))
    return (*quantize_per_block(weight, *block), block)


@pytest.mark.parametrize(
    "num_tokens, out_features, in_features, block, dtype, with_bias",
    [
        (1, 96, 64, None, torch.float32, True),  # decode, per channel
        (5, 130, 200, (128, 128), torch.float32, False),  # partial blocks along both dimensions
        (33, 80, 72, (1, 32), torch.bfloat16, True),  # several row tiles, per-row blocks, partial K
    ],
)
def test_triton_weight_only_gemm_equals_the_dequantize_reference(
    num_tokens, out_features, in_features, block, dtype, with_bias
):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.1
    quantized, scale, block = quantize_weight(weight, block)
    x = torch.randn(num_tokens, in_features, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype) if with_bias else None
    out = fp8_weight_only_gemm(x, quantized, scale, bias, *block)
    reference = dequantize_gemm(x, quantized, scale, bias, *block)
    assert out.dtype == dtype
    # bf16: both round a float32 sum once, so they may differ by an ulp of the output's scale.
    tolerance = 1e-5 if dtype == torch.float32 else BF16_RELATIVE_ERROR * reference.abs().max().item()
    torch.testing.assert_close(out.float(), reference.float(), rtol=0, atol=tolerance)


@pytest.mark.parametrize(
    "out_features, in_features, block, dtype",
    [
        (96, 200, None, torch.float32),  # per channel, a partial K tile
        (130, 200, (128, 128), torch.bfloat16),  # blocks spanning whole K tiles, partial blocks
        (80, 72, (1, 32), torch.bfloat16),  # blocks narrower than the tile: per element, rounded
    ],
)
@pytest.mark.parametrize("gemv", [True, False], ids=["gemv", "tile"])
def test_one_row_takes_the_gemv_kernel_where_enabled_and_both_equal_the_reference(
    out_features, in_features, block, dtype, gemv, monkeypatch
):
    import fxllm.models.quantization.fp8_triton as fp8_triton

    monkeypatch.setattr(fp8_triton, "GEMV_MAX_ROWS", 1 if gemv else 0)
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.1
    quantized, scale, block = quantize_weight(weight, block)
    x = torch.randn(1, in_features, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype)
    gemv_calls = []
    monkeypatch.setattr(fp8_triton, "_fp8_gemv", _recording(fp8_triton._fp8_gemv, gemv_calls))
    out = fp8_weight_only_gemm(x, quantized, scale, bias, *block)
    assert len(gemv_calls) == int(gemv)
    reference = dequantize_gemm(x, quantized, scale, bias, *block)
    tolerance = 1e-5 if dtype == torch.float32 else BF16_RELATIVE_ERROR * reference.abs().max().item()
    torch.testing.assert_close(out.float(), reference.float(), rtol=0, atol=tolerance)


def _recording(function, calls: list):
    def recorded(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)

    return recorded


@pytest.mark.parametrize("static", [False, True], ids=["per-token", "static"])
def test_w8a8_scaled_mm_equals_fp8_emulation(static):
    generator = torch.Generator().manual_seed(1)
    quantized, scale = quantize_per_channel(torch.randn(48, 64, generator=generator) * 0.1)
    x = torch.randn(20, 64, generator=generator)
    bias = torch.randn(48, generator=generator)
    if static:
        input_scale = x.abs().amax().reshape(1) / 448
        x_fp8, x_scale = (x / input_scale).to(torch.float8_e4m3fn), input_scale
    else:
        input_scale = None
        x_fp8, x_scale = quantize_per_token(x)
    emulated = (x_fp8.float() * x_scale) @ (quantized.float() * scale).t()
    out = w8a8_gemm(x, quantized, scale, bias, input_scale)
    expected = emulated.bfloat16().float() + bias  # _scaled_mm rounds its product to bf16
    torch.testing.assert_close(out, expected, rtol=BF16_RELATIVE_ERROR, atol=BF16_RELATIVE_ERROR)


def test_gemm_is_chosen_by_device_step_size_and_scale_layout():
    per_channel, dynamic = (1, 256), ActivationScheme.DYNAMIC
    large = WEIGHT_ONLY_MAX_TOKENS + 1
    assert select_fp8_gemm(False, large, (512, 256), per_channel, dynamic) is Fp8Gemm.DEQUANTIZE
    assert select_fp8_gemm(True, 1, (512, 256), per_channel, dynamic) is Fp8Gemm.WEIGHT_ONLY
    assert select_fp8_gemm(True, WEIGHT_ONLY_MAX_TOKENS, (512, 256), per_channel, dynamic) is Fp8Gemm.WEIGHT_ONLY
    assert select_fp8_gemm(True, large, (512, 256), per_channel, dynamic) is Fp8Gemm.W8A8
    assert select_fp8_gemm(True, large, (512, 256), per_channel, ActivationScheme.STATIC) is Fp8Gemm.W8A8
    # Block scales, weight-only checkpoints and shapes _scaled_mm rejects stay weight-only.
    assert select_fp8_gemm(True, large, (512, 256), (128, 128), dynamic) is Fp8Gemm.WEIGHT_ONLY
    assert select_fp8_gemm(True, large, (512, 256), per_channel, ActivationScheme.NONE) is Fp8Gemm.WEIGHT_ONLY
    assert select_fp8_gemm(True, large, (500, 256), per_channel, dynamic) is Fp8Gemm.WEIGHT_ONLY


# ---- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["int8", "FP8", "bitsandbytes", 8])
def test_unsupported_quantization_argument_says_what_is_supported(value, llama_dir):
    with pytest.raises(ValueError, match="not supported; supported: None, quantization='fp8'.*compressed-tensors"):
        LLM(model=str(llama_dir), quantization=value, enforce_eager=True)


def test_quantization_argument_must_match_the_checkpoint(llama_dir, checkpoint_dirs):
    with pytest.raises(ValueError, match="needs a checkpoint saved in that format"):
        LLM(model=str(llama_dir), quantization="compressed-tensors", enforce_eager=True)
    with pytest.raises(ValueError, match="does not match the checkpoint, which is quantized with 'compressed-tensors'"):
        LLM(model=str(checkpoint_dirs["ct-tensor"]), quantization="fp8", enforce_eager=True)


def _ct(**changes) -> dict:
    config = write_fp8.compressed_tensors_config("channel", "dynamic")
    config.update(changes)
    return config


def _ct_group(**changes) -> dict:
    config = _ct()
    config["config_groups"]["group_0"].update(changes)
    return config


def _ct_weights(**changes) -> dict:
    config = _ct()
    config["config_groups"]["group_0"]["weights"].update(changes)
    return config


MALFORMED = {
    "unknown method": ({"quant_method": "bitsandbytes"}, "quant_method='bitsandbytes' is not supported"),
    "per-tensor fp8": ({"quant_method": "fp8", "activation_scheme": "static"}, "without weight_block_size"),
    "block of one int": ({"quant_method": "fp8", "weight_block_size": [128]}, "two positive ints"),
    "static block-wise": (
        {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"},
        "only 'dynamic' is",
    ),
    "two groups": (_ct(config_groups={"a": {}, "b": {}}), "exactly one group, got 2"),
    "int weights, float format": (_ct_weights(type="int"), "format 'float-quantized' with int weights"),
    "group strategy": (_ct_weights(strategy="group", group_size=128), "strategy 'group'"),
    "packed format": (_ct(format="pack-quantized"), "format 'pack-quantized'"),
    "static per token": (
        _ct_group(input_activations={"num_bits": 8, "type": "float", "dynamic": False, "strategy": "token"}),
        "dynamic per 'token' or static per 'tensor'",
    ),
    "fp8 kv cache": (_ct(kv_cache_scheme={"num_bits": 8, "type": "float"}), "kv_cache_scheme"),
    "not a dict": ("fp8", "must be an object"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_quantization_config_is_a_clear_error(case):
    config, message = MALFORMED[case]
    with pytest.raises(ValueError, match=message) as error:
        resolve_quantization(None, SimpleNamespace(quantization_config=config))
    assert "quantization='fp8'" in str(error.value)  # and the rest of what is supported


def _copy_with_config(source: Path, target: Path, edit) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    edit(config["quantization_config"])
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_malformed_checkpoint_config_fails_at_llm_creation(checkpoint_dirs, tmp_path):
    def four_bit_weights(config: dict) -> None:
        config["config_groups"]["group_0"]["weights"]["num_bits"] = 4

    broken = _copy_with_config(checkpoint_dirs["ct-tensor"], tmp_path / "broken", four_bit_weights)
    with pytest.raises(ValueError, match="config.json quantization_config: .*8-bit symmetric floats"):
        LLM(model=str(broken), enforce_eager=True)


def test_ignore_lists_match_as_each_tool_matches_them():
    def scheme(config):
        return resolve_quantization(None, SimpleNamespace(quantization_config=config))

    ct = scheme(_ct(ignore=["lm_head", "model.layers.0.mlp.down_proj", "re:.*self_attn\\.o_proj$"]))
    assert not ct.quantizes("model.layers.0.mlp.down_proj") and ct.quantizes("model.layers.1.mlp.down_proj")
    assert not ct.quantizes("model.layers.3.self_attn.o_proj") and ct.quantizes("model.layers.3.self_attn.q_proj")
    skip = ["model.layers.1", "down_proj"]  # a prefix ending at a module boundary; a suffix
    hf = scheme({**write_fp8.transformers_fp8_config((128, 128)), "modules_to_not_convert": skip})
    assert not hf.quantizes("model.layers.1.self_attn.q_proj") and hf.quantizes("model.layers.11.self_attn.q_proj")
    assert not hf.quantizes("model.layers.0.mlp.down_proj") and hf.quantizes("model.layers.0.mlp.up_proj")


def test_a_fused_layer_must_be_quantized_in_all_or_none_of_its_shards(checkpoint_dirs, tmp_path):
    partial = _copy_with_config(
        checkpoint_dirs["ct-tensor"], tmp_path / "partial", lambda config: config["ignore"].append("re:.*k_proj")
    )
    with pytest.raises(ValueError, match="k_proj.*unquantized but not all.*must be all FP8 or none"):
        LLM(model=str(partial), enforce_eager=True)


def test_fp8_tensor_for_a_layer_the_config_leaves_unquantized_is_an_error(checkpoint_dirs, tmp_path):
    ignored = _copy_with_config(
        checkpoint_dirs["ct-tensor"], tmp_path / "ignored", lambda config: config["ignore"].append("re:.*down_proj")
    )
    with pytest.raises(ValueError, match="down_proj.weight' is torch.float8_e4m3fn, but .* is not a quantized layer"):
        LLM(model=str(ignored), enforce_eager=True)
