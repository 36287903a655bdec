"""Mixture-of-experts models and the ``fxllm::fused_moe`` op behind their expert layers.

Greedy tokens equal HF transformers' (fp32, CPU, one prompt at a time) for each MoE
architecture, eager and compiled, with the KV cache too small for every request at once
(preemption) and prompts cut into chunks; the op's torch path equals a per-token reference.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

from fxllm import LLM, SamplingParams
from fxllm.models.moe.layer import SparseMoeBlock
from fxllm.models.moe.torch_experts import torch_fused_moe
from tests.tiny_models import VOCAB_SIZE, hf_greedy, save_config_checkpoint

_COMMON = dict(
    vocab_size=VOCAB_SIZE, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)
CONFIGS = {
    # Six experts, two per token, always renormalized.
    "mixtral": lambda: MixtralConfig(
        **_COMMON, intermediate_size=32, num_hidden_layers=2, num_local_experts=6, num_experts_per_tok=2,
        sliding_window=None, architectures=["MixtralForCausalLM"],
    ),
    # A shared expert behind its sigmoid gate, q/k/v biases, no renormalization, layer 1 dense
    # (mlp_only_layers) with its own width.
    "qwen2_moe": lambda: Qwen2MoeConfig(
        **_COMMON, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_hidden_layers=3, num_experts=8, num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[1],
        architectures=["Qwen2MoeForCausalLM"],
    ),
    # Every second layer sparse (decoder_sparse_step), per-head q/k norms, head_dim != hidden / heads.
    "qwen3_moe": lambda: Qwen3MoeConfig(
        **_COMMON, head_dim=32, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=2, architectures=["Qwen3MoeForCausalLM"],
    ),
    # q/k norms over whole projections, q/k/v clipped, four experts of eight per token.
    "olmoe": lambda: OlmoeConfig(
        **_COMMON, intermediate_size=32, num_hidden_layers=2, num_experts=8, num_experts_per_tok=4,
        norm_topk_prob=False, clip_qkv=2.0, architectures=["OlmoeForCausalLM"],
    ),
}
# Layers whose MLP is a mixture of experts.
SPARSE_LAYERS = {"mixtral": [0, 1], "qwen2_moe": [0, 2], "qwen3_moe": [1, 3], "olmoe": [0, 1]}

PROMPTS = [
    "The capital of France is",
    "Hello",
    "Once upon a time there was a tiny model that learned to count: one two three",
    "How are you today? I am fine, thank you. The quick brown fox jumps over the lazy dog again and again",
]
NEW_TOKENS = 12
MAX_MODEL_LEN = 80
# 5 blocks of 16 tokens hold the longest request, not all four: requests are preempted.
KV_PRESSURE = dict(num_gpu_blocks_override=5, max_num_batched_tokens=16, max_num_seqs=4)


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe_models")
    return {name: save_config_checkpoint(make(), root / name, seed) for seed, (name, make) in enumerate(CONFIGS.items())}


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("moe_compile_cache"))


@pytest.mark.parametrize("arch", CONFIGS)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_greedy_matches_hf_under_kv_pressure_and_chunked_prefill(arch, compiled, moe_dirs, compile_cache):
    model_dir = moe_dirs[arch]
    mode = {"compilation_config": {"cache_dir": compile_cache}} if compiled else {"enforce_eager": True}
    llm = LLM(model=str(model_dir), max_model_len=MAX_MODEL_LEN, **KV_PRESSURE, **mode)
    model = llm.llm_engine.runner.model
    sparse = [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, SparseMoeBlock)]
    assert sparse == SPARSE_LAYERS[arch]
    if compiled:
        report = llm.compile_report()
        assert report.splitting_ops == ["fxllm.attention"]  # the experts stay inside compiled pieces
        assert sum(ops.get("fxllm.fused_moe", 0) for ops in report.piece_ops) == len(sparse)
    tokenizer = llm.get_tokenizer()
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == hf_greedy(model_dir, tokenizer.encode(prompt), NEW_TOKENS)


# ---- the op ---------------------------------------------------------------------------------------


def random_moe_inputs(num_tokens: int, hidden: int, intermediate: int, num_experts: int, dtype=torch.float32, seed=0):
    """(hidden [T, H], router logits [T, E], w13 [E, 2I, H], w2 [E, H, I]) at sizes whose outputs stay O(1)."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    return (
        normal(num_tokens, hidden),
        normal(num_tokens, num_experts, scale=2.0),
        normal(num_experts, 2 * intermediate, hidden, scale=hidden**-0.5),
        normal(num_experts, hidden, intermediate, scale=intermediate**-0.5),
    )


def per_token_reference(hidden, router_logits, w13, w2, top_k, renormalize) -> torch.Tensor:
    """Token by token, expert by expert, in float64: the definition the op implements."""
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    probabilities = torch.softmax(router_logits.double(), dim=-1)
    for token in range(hidden.shape[0]):
        weights, experts = probabilities[token].topk(top_k)
        if renormalize:
            weights = weights / weights.sum()
        x = hidden[token].double()
        for weight, expert in zip(weights, experts):
            gate, up = (w13[expert].double() @ x).chunk(2)
            out[token] += weight * (w2[expert].double() @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("num_tokens, num_experts, top_k", [(1, 4, 1), (7, 8, 2), (33, 6, 3), (20, 16, 8)])
@pytest.mark.parametrize("renormalize", [False, True])
def test_torch_path_equals_the_per_token_reference(num_tokens, num_experts, top_k, renormalize):
    inputs = random_moe_inputs(num_tokens, hidden=32, intermediate=24, num_experts=num_experts)
    out = torch.ops.fxllm.fused_moe(*inputs, top_k, renormalize)
    assert out.shape == (num_tokens, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), per_token_reference(*inputs, top_k, renormalize), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch_fused_moe(*inputs, top_k, renormalize), out, rtol=0, atol=0)


def test_a_top_k_beyond_the_expert_count_is_a_clear_error():
    with pytest.raises(ValueError, match="num_experts_per_tok=9 must be between 1 and the number of experts \\(8\\)"):
        SparseMoeBlock(hidden_size=16, num_experts=8, intermediate_size=8, top_k=9, renormalize=False)
