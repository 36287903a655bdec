"""The FX passes: each on a small captured graph (op counts, numerics), the fused op's
Triton kernel against its torch reference, and whole engines with passes on and off.

Graphs come from Dynamo, as in the engine, so the passes see the same node forms and
fake-tensor metadata. Engines are shared per module; only one runs Inductor (the one
with the fused op in its pieces), the others run their pieces eagerly, since there
the numerics of the passes, not Inductor, are the point.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from typing import Any, Callable

import pytest
import torch
from torch import fx, nn

# Without CUDA, tests/conftest.py has switched Triton to its interpreter.
from fxllm import LLM, SamplingParams
from fxllm.compiler.cache import engine_cache_key
from fxllm.compiler.split import op_name
from fxllm.config import CompilationConfig, PassConfig
from fxllm.models.layers import RMSNorm, RotaryEmbedding, apply_rotary
from fxllm.models.llama import LlamaAttentionBlock
from fxllm.passes.manager import PassManager
from fxllm.passes.noop import NoOpElimination
from fxllm.passes.qk_norm_rope import QKNormRopeFusion
from fxllm.passes.qk_norm_rope_op import norm_rope_reference
from fxllm.passes.qk_norm_rope_triton import qk_norm_rope_triton
from fxllm.passes import rms_norm_fusion
from fxllm.passes.rms_norm_fusion import RMSNormFusion
from fxllm.passes.rms_norm_op import rms_norm_reference
from fxllm.passes.rms_norm_triton import rms_norm_triton
from tests.tiny_models import CONFIGS, randomize_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_TOKENS = 7
MAX_MODEL_LEN = 256
BF16_RELATIVE_ERROR = 1e-2
PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPT_LENGTHS = [5, 17, 40]
ALL_OFF = {"enable_fusion": False, "enable_noop": False}
ALL_ON = {"enable_qk_norm_rope_fusion": True, "enable_rms_norm_fusion": True}
FUSED_OP = "fxllm.qk_norm_rope"
NORM_OP, ADD_NORM_OP = "fxllm.rms_norm", "fxllm.add_rms_norm"
# A fixed KV cache, so that engines of one process need not share out a GPU's memory.
NUM_KV_BLOCKS = 64


# ---- helpers ----------------------------------------------------------------------------


def _capture(function: Callable[..., Any], *inputs: torch.Tensor) -> tuple[fx.GraphModule, list[Any]]:
    """The Dynamo graph of ``function`` with dim 0 (T) of every input dynamic, as the engine captures."""
    captured = []

    def record(graph_module: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        captured.append((graph_module, list(example_inputs)))
        return graph_module.forward

    for tensor in inputs:  # dim 0 is T for every input here
        torch._dynamo.decorators.mark_unbacked(tensor, 0)
    torch.compile(function, backend=record, fullgraph=True, dynamic=False)(*inputs)
    assert len(captured) == 1
    return captured[0]


def _run(graph_module: fx.GraphModule, example_inputs: list[Any]) -> list[torch.Tensor]:
    """Run a captured graph on its example inputs (SymInt inputs are T)."""
    args = [NUM_TOKENS if isinstance(value, torch.SymInt) else value for value in example_inputs]
    with torch.no_grad():
        return list(graph_module(*args))


def _ops(graph_module: fx.GraphModule) -> Counter:
    return Counter(op_name(n) for n in graph_module.graph.nodes if n.op in ("call_function", "call_method"))


def _apply(graph_pass: Callable[[fx.Graph], int], graph_module: fx.GraphModule) -> int:
    matches = graph_pass(graph_module.graph)
    graph_module.graph.lint()
    graph_module.recompile()
    return matches


# ---- no-op elimination ------------------------------------------------------------------


def _with_noops(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    same = x.float().to(torch.float32) * 1.0  # 3 no-ops
    same = 1 * same.view(-1, 8).reshape(-1, 8).contiguous()  # 4 no-ops
    changed = same[:, :4].contiguous().to(torch.float64) * 2.0  # a copy, a cast, a real multiply
    return same.view(-1, 2, 4), changed


def test_noop_elimination_drops_only_ops_that_change_nothing():
    graph_module, inputs = _capture(_with_noops, torch.randn(NUM_TOKENS, 8))
    expected = _run(graph_module, inputs)
    before = _ops(graph_module)

    assert _apply(NoOpElimination(), graph_module) == 7
    after = _ops(graph_module)
    assert "Tensor.float" not in after and "Tensor.reshape" not in after
    assert after["Tensor.to"] == 1 and after["Tensor.contiguous"] == 1  # the float64 cast, the slice's copy
    assert after["mul"] == 1 and before["mul"] == 3
    assert after["Tensor.view"] == 1  # [T, 8] -> [T, 2, 4] is a real view
    for got, want in zip(_run(graph_module, inputs), expected, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_noop_elimination_keeps_a_multiplication_by_one_whose_result_is_written_in_place():
    def scaled_then_written(x: torch.Tensor) -> torch.Tensor:
        y = x * 1.0
        y.add_(1.0)  # with y = x this would write into the input
        return y

    graph_module, inputs = _capture(scaled_then_written, torch.randn(NUM_TOKENS, 8))
    assert _apply(NoOpElimination(), graph_module) == 0


# ---- Q/K-norm + RoPE fusion ---------------------------------------------------------------


class Qwen3QueryKey(nn.Module):
    """Qwen3's attention block (models/llama.py) up to the attention op: normalized, rotated q and k."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        config = CONFIGS["qwen3"]()
        block = LlamaAttentionBlock(config, None)
        self.qkv_proj, self.q_norm, self.k_norm = block.qkv_proj, block.q_norm, block.k_norm
        self.sizes = [block.q_size, block.kv_size, block.kv_size]
        self.heads = (block.num_heads, block.num_kv_heads, block.head_dim)
        self.rotary = RotaryEmbedding(config, block.head_dim, MAX_MODEL_LEN)
        randomize_(self, seed=0)
        self.to(dtype)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num_heads, num_kv_heads, head_dim = self.heads
        rotary = self.rotary(positions, hidden.dtype)
        query, key, _ = self.qkv_proj(hidden).split(self.sizes, dim=-1)
        query = self.q_norm(query.view(-1, num_heads, head_dim))
        key = self.k_norm(key.view(-1, num_kv_heads, head_dim))
        return apply_rotary(query, rotary).flatten(1), apply_rotary(key, rotary).flatten(1)


@pytest.mark.parametrize("noop_first", [True, False], ids=["after_noop", "alone"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_qk_norm_rope_fusion_makes_one_op_of_both_norms_and_rotations(dtype, noop_first):
    module = Qwen3QueryKey(dtype)
    hidden = torch.randn(NUM_TOKENS, module.qkv_proj.in_features, dtype=dtype)
    positions = torch.randint(0, MAX_MODEL_LEN, (NUM_TOKENS,))
    graph_module, inputs = _capture(module, hidden, positions)
    expected = _run(graph_module, inputs)
    if noop_first:
        _apply(NoOpElimination(), graph_module)
    before = _ops(graph_module)
    assert before["rsqrt"] == 2 and before["cat"] == 2

    assert _apply(QKNormRopeFusion(), graph_module) == 1
    after = _ops(graph_module)
    assert after[FUSED_OP] == 1
    assert after["rsqrt"] == after["cat"] == after["Tensor.pow"] == after["Tensor.mean"] == 0
    for got, want in zip(_run(graph_module, inputs), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_qk_norm_rope_fusion_leaves_a_rotation_without_a_norm_alone():
    module = Qwen3QueryKey(torch.float32)
    module.q_norm = module.k_norm = nn.Identity()  # Llama: RoPE straight on the projections
    hidden = torch.randn(NUM_TOKENS, module.qkv_proj.in_features)
    graph_module, _ = _capture(module, hidden, torch.arange(NUM_TOKENS))
    assert _apply(QKNormRopeFusion(), graph_module) == 0
    assert FUSED_OP not in _ops(graph_module)


@pytest.mark.parametrize("head_dim", [32, 24], ids=["pow2", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_qk_norm_rope_triton_kernel_equals_the_torch_reference(dtype, head_dim):
    num_tokens, num_heads, num_kv_heads, eps = 5, 4, 2, 1e-6
    generator = torch.Generator().manual_seed(0)

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype=dtype, device=DEVICE)

    # Query and key as the model has them: strided views into one fused QKV output.
    qkv = random(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim)
    query = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    key = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    query_weight, key_weight = 1 + 0.1 * random(head_dim), 1 + 0.1 * random(head_dim)
    angles = random(num_tokens, head_dim // 2).float()
    cos, sin = (table(angles).repeat(1, 2).unsqueeze(1).to(dtype) for table in (torch.cos, torch.sin))

    query_out, key_out = qk_norm_rope_triton(query, key, query_weight, key_weight, cos, sin, eps)
    for got, x, weight in ((query_out, query, query_weight), (key_out, key, key_weight)):
        assert got.is_contiguous() and got.shape == x.shape and got.dtype == dtype
        want = norm_rope_reference(x, weight, cos, sin, eps)
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            error = (got.float() - want.float()).norm() / want.float().norm()
            assert error < BF16_RELATIVE_ERROR


# ---- RMSNorm fusion --------------------------------------------------------------------------


class ResidualNorms(nn.Module):
    """A decoder layer's residual stream (models/llama.py): a norm of the input, a branch
    added back (times Granite's residual multiplier, 1.0 here), a norm of the sum."""

    def __init__(self, dtype: torch.dtype, hidden: int = 48):
        super().__init__()
        self.input_norm, self.post_norm = RMSNorm(hidden, 1e-6), RMSNorm(hidden, 1e-5)
        self.branch = nn.Linear(hidden, hidden)
        randomize_(self, seed=0)
        self.to(dtype)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = hidden + self.branch(self.input_norm(hidden)) * 1.0
        return self.post_norm(hidden), hidden * 2.0  # the sum is used beyond the norm, as the residual


@pytest.mark.parametrize("noop_first", [True, False], ids=["after_noop", "alone"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm_fusion_makes_one_op_of_each_norm_and_the_add_before_it(dtype, noop_first):
    module = ResidualNorms(dtype)
    graph_module, inputs = _capture(module, torch.randn(NUM_TOKENS, 48, dtype=dtype))
    expected = _run(graph_module, inputs)
    if noop_first:
        _apply(NoOpElimination(), graph_module)
    assert _ops(graph_module)["rsqrt"] == 2

    assert _apply(RMSNormFusion(device_types=("cpu",)), graph_module) == 2
    after = _ops(graph_module)
    assert after[NORM_OP] == 1 and after[ADD_NORM_OP] == 1
    assert after["rsqrt"] == after["Tensor.pow"] == after["Tensor.mean"] == after["add"] == 0
    for got, want in zip(_run(graph_module, inputs), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_rms_norm_fusion_runs_only_on_the_devices_it_has_a_kernel_for():
    graph_module, _ = _capture(ResidualNorms(torch.float32), torch.randn(NUM_TOKENS, 48))
    assert RMSNormFusion().device_types == ("cuda",)
    assert _apply(RMSNormFusion(), graph_module) == 0  # a CPU graph
    assert NORM_OP not in _ops(graph_module)


@pytest.mark.parametrize("residual", [True, False], ids=["add", "norm_only"])
@pytest.mark.parametrize("hidden", [64, 48], ids=["pow2", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm_triton_kernel_equals_the_torch_reference(dtype, hidden, residual):
    num_tokens, eps = 5, 1e-6
    generator = torch.Generator().manual_seed(0)

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype=dtype, device=DEVICE)

    x = random(num_tokens, 2 * hidden)[:, :hidden]  # rows with a stride of their own
    branch = random(num_tokens, hidden) if residual else None
    weight = 1 + 0.1 * random(hidden)
    normed, summed = rms_norm_triton(x, branch, weight, eps)
    source = x + branch if residual else x
    assert (summed is not None) == residual
    if residual:  # rounded to the dtype (the interpreter's bf16 rounding may differ by one unit)
        torch.testing.assert_close(summed, source, rtol=0 if dtype == torch.float32 else None, atol=0 if dtype == torch.float32 else None)
    want = rms_norm_reference(source, weight, eps)
    assert normed.is_contiguous() and normed.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(normed, want, rtol=1e-5, atol=1e-5)
    else:
        error = (normed.float() - want.float()).norm() / want.float().norm()
        assert error < BF16_RELATIVE_ERROR


# ---- pass config and cache key ----------------------------------------------------------------


def test_pass_config_comes_from_a_dict_and_rejects_unknown_switches():
    config = CompilationConfig.from_user({"pass_config": {"enable_noop": False}})
    assert config.pass_config == PassConfig(enable_noop=False, enable_fusion=True, enable_qk_norm_rope_fusion=True)
    with pytest.raises(ValueError, match="unknown pass_config field"):
        CompilationConfig.from_user({"pass_config": {"enable_nop": False}})
    with pytest.raises(ValueError, match="must be True or False"):
        PassConfig(enable_fusion="no")


@pytest.mark.parametrize(
    "switches, passes",
    [
        ({}, ["noop_elimination", "qk_norm_rope_fusion", "rms_norm_fusion"]),
        (ALL_ON, ["noop_elimination", "qk_norm_rope_fusion", "rms_norm_fusion"]),
        ({"enable_rms_norm_fusion": False}, ["noop_elimination", "qk_norm_rope_fusion"]),
        ({"enable_qk_norm_rope_fusion": False}, ["noop_elimination", "rms_norm_fusion"]),
        ({"enable_fusion": False, **ALL_ON}, ["noop_elimination"]),
        (ALL_OFF, []),
    ],
)
def test_pass_switches_choose_the_passes(switches, passes):
    assert [p.name for p in PassManager(PassConfig(**switches)).passes] == passes


# ---- whole engines ------------------------------------------------------------------------------


def _engine(model_dir, **compilation: Any) -> LLM:
    return LLM(
        model=str(model_dir),
        max_model_len=MAX_MODEL_LEN,
        num_gpu_blocks_override=NUM_KV_BLOCKS,
        compilation_config={"level": 3, **compilation},
    )


def _greedy_tokens(llm: LLM) -> list[list[int]]:
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 300) for _ in range(n)]} for n in PROMPT_LENGTHS]
    return [output.outputs[0].token_ids for output in llm.generate(prompts, PARAMS, use_tqdm=False)]


def _every_fusion_here(model_dir, **compilation: Any) -> LLM:
    """An engine with every pass on, the CUDA-only RMSNorm fusion on this device too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rms_norm_fusion, "FUSED_DEVICE_TYPES", ("cpu", "cuda"))
        return _engine(model_dir, pass_config=ALL_ON, **compilation)


def _norms_of(arch: str) -> int:
    """RMSNorms of [T, hidden] rows: two per layer and the final one."""
    return 2 * CONFIGS[arch]().num_hidden_layers + 1


@pytest.fixture(scope="module")
def qwen3_fused(tiny_model_dirs, tmp_path_factory) -> LLM:
    """Every pass on, pieces compiled by Inductor: the fused ops inside compiled pieces."""
    return _every_fusion_here(tiny_model_dirs["qwen3"], cache_dir=str(tmp_path_factory.mktemp("compile_cache")))


@pytest.fixture(scope="module")
def qwen3_unfused(tiny_model_dirs) -> LLM:
    return _engine(tiny_model_dirs["qwen3"], use_inductor=False, pass_config=ALL_OFF)


def test_qwen3_tokens_equal_with_and_without_passes(qwen3_fused, qwen3_unfused):
    assert _greedy_tokens(qwen3_fused) == _greedy_tokens(qwen3_unfused)


def test_llama_tokens_equal_with_and_without_passes(tiny_model_dirs):
    with_passes = _every_fusion_here(tiny_model_dirs["llama"], use_inductor=False)
    without = _engine(tiny_model_dirs["llama"], use_inductor=False, pass_config=ALL_OFF)
    assert _greedy_tokens(with_passes) == _greedy_tokens(without)
    report = with_passes.compile_report()
    assert report.passes["qk_norm_rope_fusion"] == 0 and report.passes["noop_elimination"] > 0
    assert report.passes["rms_norm_fusion"] == _norms_of("llama")
    assert without.compile_report().passes == {}


def test_compile_report_shows_one_qk_norm_rope_fusion_per_qwen3_layer(qwen3_fused, qwen3_unfused):
    num_layers = CONFIGS["qwen3"]().num_hidden_layers
    report = qwen3_fused.compile_report()
    assert report.passes["qk_norm_rope_fusion"] == num_layers
    assert report.passes["noop_elimination"] > 0
    assert report.passes["rms_norm_fusion"] == _norms_of("qwen3")
    assert sum(ops.get(FUSED_OP, 0) for ops in report.piece_ops) == num_layers
    assert sum(ops.get(ADD_NORM_OP, 0) + ops.get(NORM_OP, 0) for ops in report.piece_ops) == _norms_of("qwen3")
    assert report.inductor_compiles > 0
    assert qwen3_unfused.compile_report().passes == {}


def test_cache_key_changes_with_every_pass_switch(qwen3_fused, monkeypatch):
    config = qwen3_fused.llm_engine_config
    switches = [
        {}, {"enable_noop": False}, {"enable_fusion": False}, {"enable_rms_norm_fusion": False},
        {"enable_qk_norm_rope_fusion": False},
    ]
    keys = set()
    for switch in switches:
        pass_config = PassConfig(**switch)
        engine = replace(config, compilation=replace(config.compilation, pass_config=pass_config))
        keys.add(engine_cache_key(engine, PassManager(pass_config).uuid()))
    assert len(keys) == len(switches)
    assert PassManager(PassConfig()).uuid() == PassManager(PassConfig()).uuid()  # stable
    monkeypatch.setattr(rms_norm_fusion, "FUSED_DEVICE_TYPES", ("cpu", "cuda"))  # as the engine was built
    fused_uuid = PassManager(config.compilation.pass_config).uuid()
    assert qwen3_fused.compile_report().cache_dir.endswith(engine_cache_key(config, fused_uuid))
