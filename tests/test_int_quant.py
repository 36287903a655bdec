"""INT4 / INT8 checkpoints: GPTQ, AWQ and compressed-tensors (pack-quantized, int-quantized), their kernels.

Checkpoints come from tools/write_int_checkpoint.py on the tiny Llama (fused q/k/v of
64/32/32 rows, hidden size 64, MLP 128): GPTQ and AWQ by their published packing (checked
here against golden words and compressed-tensors' own AutoAWQ unpacking), compressed-tensors
by the library itself. The oracle is HF transformers in fp32 running each checkpoint's
weights dequantized by code independent of fxllm's (compressed-tensors' decompressors for
its formats): greedy tokens must be identical. The CUDA kernels run here under Triton's
interpreter against the dequantize reference; tests/test_int_quant_gpu.py runs them on a GPU.
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

from fxllm import LLM, SamplingParams
from fxllm.models.quantization import int_triton
from fxllm.models.quantization.int_gemm import counters_needed, int8_gemm, quantize_int8_per_token
from fxllm.models.quantization.int_linear import Int8Linear, IntWeightLinear
from fxllm.models.quantization.int_pack import dequantize_packed, pack
from fxllm.models.quantization.scheme import resolve_quantization
from tests.test_fp8 import DEQUANTIZED_TOLERANCE, engine_logprobs, hf_logprobs
from tests.tiny_models import hf_greedy

_TOOL = Path(__file__).resolve().parent.parent / "tools" / "write_int_checkpoint.py"
_spec = importlib.util.spec_from_file_location("write_int_checkpoint", _TOOL)
write_int = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(write_int)

PROMPTS = ["Once upon a time there was a tiny model", "The capital of France is", "Hello"]
NEW_TOKENS = 8
BF16_RELATIVE_ERROR = 1e-2
# (tool arguments, LLM's quantization method)
CHECKPOINTS = {
    "gptq-int4-g32": (dict(fmt="gptq", bits=4, group_size=32), "gptq"),
    "gptq-int4-g64-asym-v2": (dict(fmt="gptq", bits=4, group_size=64, symmetric=False, gptq_v2=True), "gptq"),
    "gptq-int4-channel": (dict(fmt="gptq", bits=4, group_size=-1), "gptq"),
    "gptq-int8-g32-asym-act-order": (
        dict(fmt="gptq", bits=8, group_size=32, symmetric=False, desc_act=True), "gptq"
    ),
    "awq-g32": (dict(fmt="awq", group_size=32, symmetric=False), "awq"),
    "ct-w4a16-g32": (dict(fmt="compressed-tensors", bits=4, group_size=32), "compressed-tensors"),
    "ct-w4a16-g64-asym": (dict(fmt="compressed-tensors", bits=4, group_size=64, symmetric=False), "compressed-tensors"),
    "ct-w8a16-channel-asym": (
        dict(fmt="compressed-tensors", bits=8, group_size=-1, symmetric=False), "compressed-tensors"
    ),
    "ct-w8a8-dynamic": (dict(fmt="compressed-tensors", w8a8="dynamic"), "compressed-tensors"),
    "ct-w8a8-static": (dict(fmt="compressed-tensors", w8a8="static"), "compressed-tensors"),
}
NEEDS_COMPRESSED_TENSORS = {name for name, (args, _) in CHECKPOINTS.items() if args["fmt"] == "compressed-tensors"}


def _variant_params(names):
    mark = pytest.mark.skipif(
        importlib.util.find_spec("compressed_tensors") is None, reason="needs compressed-tensors"
    )
    return [pytest.param(name, marks=mark) if name in NEEDS_COMPRESSED_TENSORS else name for name in names]


@pytest.fixture(scope="module")
def checkpoint_dirs(llama_dir, tmp_path_factory):
    """Each checkpoint, written on first use."""
    root = tmp_path_factory.mktemp("int_checkpoints")
    written: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in written:
            written[name] = write_int.write_int_checkpoint(llama_dir, root / name, **CHECKPOINTS[name][0])
        return written[name]

    return get


@pytest.fixture(scope="module")
def engines(checkpoint_dirs):
    built: dict[str, LLM] = {}

    def get(name: str) -> LLM:
        if name not in built:
            built[name] = LLM(model=str(checkpoint_dirs(name)), enforce_eager=True, max_model_len=128, max_logprobs=-1)
        return built[name]

    return get


# ---- the oracle: each format dequantized as it is published ------------------------------


def _tensors(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(checkpoint_dir / "model.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def _unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] int32 -> [R, C * 32 / bits], value i of a word in bits i * bits (little end first)."""
    values = [(words >> shift) & (2**bits - 1) for shift in range(0, 32, bits)]
    return torch.stack(values, dim=-1).reshape(words.shape[0], -1)


def gptq_dequantized(tensors: dict, config: dict) -> dict[str, torch.Tensor]:
    """GPTQ: w[k, n] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n], zeros stored minus one in 'gptq'."""
    bits, weights = config["bits"], {}
    offset = 1 if config.get("checkpoint_format", "gptq") == "gptq" else 0
    for name in [n for n in tensors if n.endswith(".qweight")]:
        prefix = name.removesuffix("qweight")
        q = _unpack_words(tensors[name].t(), bits).t()  # [K, N]
        zeros = _unpack_words(tensors[prefix + "qzeros"], bits) + offset  # [groups, N]
        g_idx = tensors[prefix + "g_idx"].long()
        weight = (q - zeros[g_idx]).float() * tensors[prefix + "scales"].float()[g_idx]
        weights[prefix + "weight"] = weight.t()
    return weights


def awq_dequantized(tensors: dict, config: dict) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM, unpacked by compressed-tensors' AutoAWQ converter (the library's code)."""
    from compressed_tensors.entrypoints.convert.converters import AutoAWQConverter

    group, weights = config["group_size"], {}
    for name in [n for n in tensors if n.endswith(".qweight")]:
        prefix = name.removesuffix("qweight")
        q, zeros = AutoAWQConverter.unpack_awq(tensors[name], tensors[prefix + "qzeros"], 4)
        q, zeros = AutoAWQConverter.reverse_awq_order(q, zeros, 4)
        q, zeros = q.int() & 0xF, zeros.int() & 0xF  # [K, N], [groups, N]
        g = torch.arange(q.shape[0]) // group
        weights[prefix + "weight"] = ((q - zeros[g]).float() * tensors[prefix + "scales"].float()[g]).t()
    return weights


def compressed_tensors_dequantized(tensors: dict, config: dict) -> dict[str, torch.Tensor]:
    """compressed-tensors' own decompressor for the checkpoint's format."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    group = config["config_groups"]["group_0"]
    scheme = QuantizationScheme.model_validate(group)
    compressor = BaseCompressor.get_value_from_registry(group["format"])
    suffix = ".weight_packed" if group["format"] == "pack-quantized" else ".weight_scale"
    weights = {}
    for name in [n for n in tensors if n.endswith(suffix)]:
        prefix = name.removesuffix(suffix) + "."
        state = {n.removeprefix(prefix): t for n, t in tensors.items() if n.startswith(prefix) and n != prefix + "bias"}
        weights[prefix + "weight"] = compressor.decompress(state, scheme)["weight"].float()
    return weights


def dequantized_checkpoint(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    config = json.loads((checkpoint_dir / "config.json").read_text())["quantization_config"]
    dequantize = {"gptq": gptq_dequantized, "awq": awq_dequantized}.get(
        config["quant_method"], compressed_tensors_dequantized
    )
    return dequantize(_tensors(checkpoint_dir), config)


def hf_greedy_with(source_dir: Path, weights: dict, tmp_path: Path) -> list[list[int]]:
    """HF fp32 greedy tokens of PROMPTS with ``weights`` written into a copy of the full-precision checkpoint."""
    from safetensors.torch import save_file

    from tests.tiny_models import build_tokenizer

    reference = tmp_path / "dequantized"
    shutil.copytree(source_dir, reference)
    tensors = _tensors(source_dir)
    tensors.update(weights)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(reference / "model.safetensors"))
    tokenizer = build_tokenizer()
    return [hf_greedy(reference, tokenizer(prompt)["input_ids"], NEW_TOKENS) for prompt in PROMPTS]


# ---- checkpoints -----------------------------------------------------------------------


@pytest.mark.parametrize("variant", _variant_params(CHECKPOINTS))
def test_greedy_tokens_equal_hf_running_the_dequantized_checkpoint(variant, engines, checkpoint_dirs, llama_dir, tmp_path):
    llm = engines(variant)
    assert llm.llm_engine_config.model.quantization == CHECKPOINTS[variant][1]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    weights = dequantized_checkpoint(checkpoint_dirs(variant))
    assert len(weights) == 14  # q, k, v, o, gate, up, down in two layers
    assert ours == hf_greedy_with(llama_dir, weights, tmp_path)
    prompt_ids, logprobs = engine_logprobs(llm)
    assert (logprobs - hf_logprobs(llama_dir, prompt_ids, weights)).abs().max().item() < DEQUANTIZED_TOLERANCE


@pytest.mark.parametrize("variant", _variant_params(["gptq-int4-g32", "ct-w4a16-g64-asym", "ct-w8a8-static"]))
def test_linear_layers_stay_packed_and_lm_head_full_precision(variant, engines):
    model = engines(variant).llm_engine.runner.model
    layers = [m for m in model.modules() if isinstance(m, (IntWeightLinear, Int8Linear))]
    assert len(layers) == 8  # q/k/v, o, gate/up, down in each of two layers
    for layer in layers:
        if isinstance(layer, IntWeightLinear):
            assert layer.qweight.dtype == torch.int32
            assert layer.qweight.numel() * 32 == layer.out_features * layer.in_features * layer.bits
        else:
            assert layer.weight.dtype == torch.int8
    assert not isinstance(model.lm_head, (IntWeightLinear, Int8Linear)) and model.lm_head.weight.dtype == torch.float32


def test_fused_shards_keep_their_own_scales_and_zero_points(engines, checkpoint_dirs):
    tensors = _tensors(checkpoint_dirs("gptq-int4-g64-asym-v2"))
    qkv = engines("gptq-int4-g64-asym-v2").llm_engine.runner.model.model.layers[0].self_attn.qkv_proj
    shard_scales = [tensors[f"model.layers.0.self_attn.{s}_proj.scales"] for s in "qkv"]
    assert torch.equal(qkv.scales, torch.cat(shard_scales, dim=1))
    shard_zeros = [_unpack_words(tensors[f"model.layers.0.self_attn.{s}_proj.qzeros"], 4) for s in "qkv"]
    assert torch.equal(qkv.zeros, torch.cat(shard_zeros, dim=1).to(qkv.zeros.dtype))


def test_piecewise_compile_keeps_each_int_linear_whole_and_equals_eager(checkpoint_dirs, engines):
    # Inductor left out: a cold compile costs ~40 s here; capture and split are what meet the op.
    compilation = {"level": 3, "use_inductor": False}
    compiled = LLM(model=str(checkpoint_dirs("gptq-int4-g32")), max_model_len=128, compilation_config=compilation)
    report = compiled.compile_report()
    assert report.dynamo_compiles == 1
    assert sum(ops.get("fxllm.int_weight_linear", 0) for ops in report.piece_ops) == 8
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    eager = engines("gptq-int4-g32").generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in compiled.generate(PROMPTS, params, use_tqdm=False)] == [
        o.outputs[0].token_ids for o in eager
    ]


# ---- tensor parallelism -----------------------------------------------------------------


def _prompt_logprobs(llm: LLM) -> torch.Tensor:
    return engine_logprobs(llm)[1]


@pytest.mark.parametrize("variant", _variant_params(["gptq-int4-g32", "ct-w4a16-g32"]))
def test_two_ranks_split_packed_weights_scales_and_zeros_and_give_the_single_device_logits(variant, engines,
                                                                                          checkpoint_dirs):
    """Both sides dequantize the same packed weights with the same scales: only the order of the
    partial sums differs. Each rank's slice of o_proj (32 inputs) and down_proj (64) is whole
    32-wide groups."""
    llm = LLM(model=str(checkpoint_dirs(variant)), enforce_eager=True, max_model_len=128, tensor_parallel_size=2,
              max_logprobs=-1)
    assert llm.compile_report().passes["tensor_parallel"] == 2 * 2 + 1  # o and down per layer, the embedding
    torch.testing.assert_close(_prompt_logprobs(llm), _prompt_logprobs(engines(variant)), rtol=0, atol=1e-4)


def test_groups_a_rank_would_cut_are_a_clear_error(checkpoint_dirs):
    # Each rank's o_proj has 32 of the 64 inputs: half of a 64-wide group.
    with pytest.raises((ValueError, RuntimeError), match="32 input features .* not whole 64-wide groups"):
        LLM(model=str(checkpoint_dirs("gptq-int4-g64-asym-v2")), enforce_eager=True, tensor_parallel_size=2)


def test_act_order_under_tensor_parallelism_is_a_clear_error(checkpoint_dirs):
    with pytest.raises(ValueError, match="act-order checkpoint .* not supported yet"):
        LLM(model=str(checkpoint_dirs("gptq-int8-g32-asym-act-order")), enforce_eager=True, tensor_parallel_size=2)


# ---- the writers follow the published packing -------------------------------------------


def test_gptq_words_hold_consecutive_inputs_lowest_bits_first():
    assert pack(torch.arange(8)[:, None], 4, dim=0).item() == 0x76543210
    word = pack(torch.tensor([[1], [2], [3], [200]]), 8, dim=0).item() & 0xFFFFFFFF
    assert word == (200 << 24) + (3 << 16) + (2 << 8) + 1
    # Symmetric 4-bit GPTQ zero points, stored minus one: the well-known 0x77777777.
    weight = torch.randn(16, 64)
    tensors = write_int.gptq_tensors("m", weight, 4, 32, symmetric=True, desc_act=False, v2=False)
    assert (tensors["m.qzeros"] == 0x77777777).all()
    assert torch.equal(tensors["m.g_idx"], torch.arange(64, dtype=torch.int32) // 32)


def test_awq_words_interleave_columns_as_autoawq_does():
    # Columns 0..7 with values 0..7: nibble i holds column (0, 2, 4, 6, 1, 3, 5, 7)[i].
    assert write_int.pack_awq(torch.arange(8)[None, :]).item() == 0x75316420


@pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None, reason="needs compressed-tensors")
def test_awq_writer_agrees_with_compressed_tensors_autoawq_unpacking():
    from compressed_tensors.entrypoints.convert.converters import AutoAWQConverter

    weight = torch.randn(48, 64)
    tensors = write_int.awq_tensors("m", weight, 32)
    levels, scale, zero = write_int.min_max_levels(write_int._groups(weight, 32), 4, symmetric=False)
    q, zeros = AutoAWQConverter.unpack_awq(tensors["m.qweight"], tensors["m.qzeros"], 4)
    q, zeros = AutoAWQConverter.reverse_awq_order(q, zeros, 4)
    assert torch.equal(q.int() & 0xF, levels.reshape(48, 64).t())
    assert torch.equal(zeros.int() & 0xF, zero.t())


# ---- the kernels -------------------------------------------------------------------------


def quantized_layer(out_features: int, in_features: int, bits: int, group_size: int, symmetric: bool, seed: int = 0):
    """(qweight [N, K / pack], scales [groups, N], zeros or None) of random levels."""
    generator = torch.Generator().manual_seed(seed)
    group = in_features if group_size == -1 else group_size
    groups = -(-in_features // group)
    levels = torch.randint(0, 2**bits, (in_features, out_features), generator=generator)
    scales = torch.rand(groups, out_features, generator=generator) * 0.02 + 0.001
    zeros = None if symmetric else torch.randint(0, 2**bits, (groups, out_features), generator=generator).float()
    return pack(levels, bits, dim=0).t().contiguous(), scales, zeros, group


KERNEL_CASES = [
    # (rows, out, in, bits, group_size, symmetric, dtype, bias)
    (1, 48, 128, 4, 32, True, torch.float32, True),  # GEMV, groups narrower than a K step
    (1, 40, 256, 8, -1, False, torch.bfloat16, False),  # GEMV, one scale per row, zero points
    (5, 48, 256, 4, 128, False, torch.float32, True),  # a 16-row dot tile, one group per K step
    (33, 40, 128, 8, 32, True, torch.bfloat16, True),  # several row tiles, groups narrower than the step
]


@pytest.mark.parametrize("rows, out_features, in_features, bits, group_size, symmetric, dtype, with_bias", KERNEL_CASES)
def test_triton_int_kernels_equal_the_dequantize_reference(
    rows, out_features, in_features, bits, group_size, symmetric, dtype, with_bias
):
    qweight, scales, zeros, group = quantized_layer(out_features, in_features, bits, group_size, symmetric)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype) if with_bias else None
    counters = torch.zeros(counters_needed(out_features), dtype=torch.int32)
    out = int_triton.int_weight_gemm(x, qweight, scales, zeros, bias, counters, bits, group)
    weight = dequantize_packed(qweight.t(), scales, zeros, bits, group, torch.float32)
    reference = torch.nn.functional.linear(x.float(), weight, None if bias is None else bias.float())
    assert out.dtype == dtype
    tolerance = 1e-4 if dtype == torch.float32 else BF16_RELATIVE_ERROR * reference.abs().max().item()
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=tolerance)


@pytest.mark.parametrize("rows", [1, 7])
def test_split_k_partial_sums_are_added_by_the_last_slice_and_counters_reset(rows, monkeypatch):
    monkeypatch.setattr(int_triton, "_sm_count", lambda device: 64)  # many SMs: K splits
    out_features, in_features, bits = 32, 512, 4
    qweight, scales, zeros, group = quantized_layer(out_features, in_features, bits, 64, symmetric=False)
    splits, _ = int_triton.split_count(2, in_features, 128, 64)
    assert splits > 1
    x = torch.randn(rows, in_features)
    bias = torch.randn(out_features)
    counters = torch.zeros(counters_needed(out_features), dtype=torch.int32)
    reference = torch.nn.functional.linear(x, dequantize_packed(qweight.t(), scales, zeros, bits, group, x.dtype), bias)
    for _ in range(2):  # a second call finds the counters reset
        out = int_triton.int_weight_gemm(x, qweight, scales, zeros, bias, counters, bits, group)
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-4)
        assert not counters.any()


@pytest.mark.parametrize("static", [False, True], ids=["per-token", "static"])
def test_w8a8_int_mm_equals_int8_emulation(static):
    generator = torch.Generator().manual_seed(2)
    weight = torch.randint(-127, 128, (48, 64), generator=generator, dtype=torch.int8)
    weight_scale = torch.rand(48, 1, generator=generator) * 0.01
    x = torch.randn(20, 64, generator=generator)
    bias = torch.randn(48, generator=generator)
    if static:
        input_scale = x.abs().amax().reshape(1) / 127
        x_int8, x_scale = (x / input_scale).round().clamp(-128, 127), input_scale
    else:
        input_scale = None
        x_int8, x_scale = quantize_int8_per_token(x)
    emulated = (x_int8.float() * x_scale) @ (weight.float() * weight_scale).t() + bias
    out = int8_gemm(x, weight, weight_scale, bias, input_scale)
    torch.testing.assert_close(out, emulated, rtol=1e-4, atol=1e-4)


# ---- errors ------------------------------------------------------------------------------


def _scheme(config: dict):
    return resolve_quantization(None, SimpleNamespace(quantization_config=config))


GPTQ = dict(write_int.gptq_config(4, 128, True, False, False))
MALFORMED = {
    "3-bit gptq": ({**GPTQ, "bits": 3}, "GPTQ with 3-bit weights; 4 or 8 bits are"),
    "group 96": ({**GPTQ, "group_size": 96}, "GPTQ group_size 96; supported: -1"),
    "marlin format": ({**GPTQ, "checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
    "quantized lm_head": ({**GPTQ, "lm_head": True}, "quantized lm_head"),
    "dynamic override": ({**GPTQ, "dynamic": {r"+:.*down": {"bits": 8}}}, "per-module override"),
    "awq gemv": ({**write_int.awq_config(128), "version": "gemv"}, "AWQ version 'gemv'"),
    "awq 8-bit": ({**write_int.awq_config(128), "bits": 8}, "AWQ with 8-bit weights"),
    "unknown method": ({"quant_method": "bitsandbytes"}, "quant_method='bitsandbytes' is not supported"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_unsupported_integer_options_are_errors_that_list_what_is_supported(case):
    config, message = MALFORMED[case]
    with pytest.raises(ValueError, match=message) as error:
        _scheme(config)
    assert "GPTQ (quant_method 'gptq'" in str(error.value) and "AWQ" in str(error.value)


@pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None, reason="needs compressed-tensors")
def test_unsupported_compressed_tensors_int_options_are_errors(checkpoint_dirs):
    config = json.loads((checkpoint_dirs("ct-w4a16-g32") / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    for change, message in [
        (dict(strategy="tensor"), "strategy 'tensor'; 'group' or 'channel' is"),
        (dict(num_bits=2), "2-bit weights"),
        (dict(actorder="dynamic"), "actorder 'dynamic'"),
    ]:
        edited = json.loads(json.dumps(config))
        edited["config_groups"]["group_0"]["weights"] = {**weights, **change}
        with pytest.raises(ValueError, match=message):
            _scheme(edited)


def test_quantization_argument_must_match_an_integer_checkpoint(llama_dir, checkpoint_dirs):
    with pytest.raises(ValueError, match="quantization='gptq' needs a checkpoint saved in that format"):
        LLM(model=str(llama_dir), quantization="gptq", enforce_eager=True)
    with pytest.raises(ValueError, match="does not match the checkpoint, which is quantized with 'awq'"):
        LLM(model=str(checkpoint_dirs("awq-g32")), quantization="gptq", enforce_eager=True)


def test_ignore_lists_match_as_each_tool_matches_them():
    awq = _scheme({**write_int.awq_config(128), "modules_to_not_convert": ["down_proj"]})
    assert not awq.quantizes("model.layers.0.mlp.down_proj") and awq.quantizes("model.layers.0.mlp.up_proj")
    gptq = _scheme({**GPTQ, "dynamic": {r"-:.*\.1\.mlp": {}}, "modules_in_block_to_quantize": [["self_attn.q_proj"],
                                                                                              ["mlp.up_proj"]]})
    assert gptq.quantizes("model.layers.0.mlp.up_proj") and not gptq.quantizes("model.layers.1.mlp.up_proj")
    assert not gptq.quantizes("model.layers.0.self_attn.k_proj")


def test_an_unquantized_int_tensor_for_a_full_precision_layer_is_an_error(checkpoint_dirs, tmp_path):
    broken = tmp_path / "ignored"
    shutil.copytree(checkpoint_dirs("gptq-int4-g32"), broken)
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["dynamic"] = {r"-:.*down_proj": {}}
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"down_proj\.(g_idx|qweight)' has no matching parameter"):
        LLM(model=str(broken), enforce_eager=True)
