"""Mixture-of-experts models and the ``fxllm::fused_moe`` op behind their expert layers.

Greedy tokens equal HF transformers' (fp32, CPU, one prompt at a time) for each MoE
architecture, eager and compiled, with the KV cache too small for every request at once
(preemption) and prompts cut into chunks. The op's torch path equals a per-token reference;
its Triton path (sort by expert, grouped GEMMs) equals the torch path under the interpreter
and compiles for sm_90; GPU tests run it at real sizes, in CUDA graphs and in engines. Two
gloo ranks give the single-device logits; FP8 experts stay within FP8 noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

from fxllm import LLM, SamplingParams
from fxllm.models.registry import MODEL_REGISTRY
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


def test_a_checkpoint_with_more_experts_than_the_config_is_a_clear_error(moe_dirs):
    with pytest.raises(ValueError, match="experts.4.w1.weight. is of expert 4, but the config has 4 experts"):
        LLM(model=str(moe_dirs["mixtral"]), enforce_eager=True, max_model_len=MAX_MODEL_LEN,
            hf_overrides={"num_local_experts": 4})


def test_a_checkpoint_missing_an_expert_is_a_clear_error(moe_dirs, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "missing_expert"
    shutil.copytree(moe_dirs["qwen3_moe"], model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(ValueError, match="checkpoint is missing weights for: model.layers.1.mlp.experts.w13"):
        LLM(model=str(model_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN)


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


# ---- the Triton path (under TRITON_INTERPRET=1 without CUDA) --------------------------------------


@pytest.mark.parametrize(
    "num_tokens, num_experts, top_k, block_tokens",
    [(1, 4, 1, None), (7, 8, 2, 2), (33, 6, 3, 4), (20, 16, 8, None), (50, 128, 8, 8)],
)
def test_sorting_groups_every_entry_once_by_expert_in_blocks(num_tokens, num_experts, top_k, block_tokens):
    """Several routing chunks where block_tokens is small: each chunk's entries land after the
    earlier chunks' entries of the same expert."""
    from fxllm.models.moe.routing import select_experts
    from fxllm.models.moe.triton_routing import max_sorted_blocks, sort_by_expert

    block_m = 16
    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(num_tokens)) * 2
    sort = sort_by_expert(logits, top_k, True, block_m, block_tokens)
    weights, expert_ids = select_experts(logits, top_k, True)
    assert torch.equal(sort.expert_ids.long(), expert_ids)
    torch.testing.assert_close(sort.weights, weights)
    num_entries = num_tokens * top_k
    num_rows = int(sort.num_rows)
    assert num_rows % block_m == 0 and sort.max_blocks == max_sorted_blocks(num_entries, num_experts, block_m)
    assert num_rows <= sort.max_blocks * block_m
    rows = sort.sorted_entries[:num_rows]
    assert sorted(rows[rows < num_entries].tolist()) == list(range(num_entries))
    for block in range(num_rows // block_m):
        entries = rows[block * block_m : (block + 1) * block_m]
        entries = entries[entries < num_entries]
        assert entries.numel() > 0  # no block of padding alone
        assert (expert_ids.flatten()[entries.long()] == sort.block_experts[block]).all()
        assert (entries.diff() > 0).all()  # in entry order within an expert


@pytest.mark.parametrize(
    "num_tokens, hidden, intermediate, num_experts, top_k",
    [(1, 32, 24, 4, 1), (7, 64, 48, 8, 2), (33, 48, 40, 6, 3), (20, 64, 32, 16, 8)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_equals_the_torch_path(num_tokens, hidden, intermediate, num_experts, top_k, dtype):
    from fxllm.models.moe.triton_experts import triton_fused_moe

    inputs = random_moe_inputs(num_tokens, hidden, intermediate, num_experts, dtype=dtype)
    for renormalize in (False, True):
        out = triton_fused_moe(*inputs, top_k, renormalize)
        assert out.shape == (num_tokens, hidden) and out.dtype == dtype
        reference = torch_fused_moe(*inputs, top_k, renormalize)
        if dtype == torch.float32:
            torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
        else:  # the kernel rounds to bf16 once per projection, the torch path once per op
            torch.testing.assert_close(out.float(), reference.float(), rtol=2e-2, atol=2e-2)


def compile_kernels_for(capability: int) -> None:
    """Compile every MoE kernel for a CUDA GPU of ``capability`` (90: Hopper), no GPU needed, at the
    constants the op launches them with (each tile in bf16; the small one also in fp32 and with
    FP8 experts, whose loads differ); pointers and strides 16-divisible, as Triton specializes
    them at launch. Run without TRITON_INTERPRET."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fxllm.models.moe import triton_experts, triton_routing

    def compile_kernel(kernel, types: dict, constants: dict, tile=None) -> None:
        signature = {name: "constexpr" if name in constants else types.get(name, "i32") for name in kernel.arg_names}
        aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                   if name not in constants and (name.endswith("_ptr") or name.startswith("stride"))}
        options = {} if tile is None else {"num_warps": tile.num_warps, "num_stages": tile.num_stages}
        triton.compile(ASTSource(kernel, signature, constants, aligned), target=GPUTarget("cuda", capability, 32), options=options)

    int_pointers = {name: "*i32" for name in ("ids_ptr", "chunk_counts_ptr", "chunk_offsets_ptr", "sorted_entries_ptr",
                                              "block_experts_ptr", "num_rows_ptr")}
    for num_experts, top_k in ((128, 8), (6, 2)):
        experts_pad = triton.next_power_of_2(num_experts)
        block_tokens = triton_routing.routing_block_tokens(num_experts, top_k)
        compile_kernel(triton_routing._route_kernel, {**int_pointers, "logits_ptr": "*bf16", "weights_ptr": "*fp32"}, dict(
            NUM_EXPERTS=num_experts, TOP_K=top_k, RENORMALIZE=True, BLOCK_TOKENS=block_tokens, EXPERTS_PAD=experts_pad,
            TOP_K_PAD=triton.next_power_of_2(top_k)))
        compile_kernel(triton_routing._scatter_kernel, int_pointers, dict(
            ENTRIES_PER_CHUNK=block_tokens * top_k, ENTRIES_PAD=triton.next_power_of_2(block_tokens * top_k),
            EXPERTS_PAD=experts_pad))
    for tile in (triton_experts.SMALL_TILE, triton_experts.MEDIUM_TILE, triton_experts.LARGE_TILE):
        compile_kernel(triton_routing._plan_kernel, int_pointers, dict(
            EXPERTS_PAD=128, BLOCK_M=tile.block_m, CHUNKS_PER_ITERATION=triton_routing.PLAN_CHUNKS_PER_ITERATION,
            BLOCKS_PER_ITERATION=triton_routing.PLAN_BLOCKS_PER_ITERATION))
        variants = [("bf16", "bf16", "tf32")]
        if tile == triton_experts.SMALL_TILE:
            variants += [("fp32", "fp32", "ieee"), ("bf16", "fp8e4nv", "tf32")]
        for dtype, weight_dtype, precision in variants:
            constants = dict(HIDDEN=2048, INTERMEDIATE=768, HAS_SCALES=weight_dtype == "fp8e4nv", DOT_PRECISION=precision,
                             DOT_IN_FP32=False, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k)
            pointers = {**int_pointers, "weights_ptr": "*fp32", "w13_scale_ptr": "*fp32", "w2_scale_ptr": "*fp32"}
            pointers |= {name: f"*{dtype}" for name in ("hidden_ptr", "act_ptr", "partial_ptr")}
            pointers |= {name: f"*{weight_dtype}" for name in ("w13_ptr", "w2_ptr")}
            compile_kernel(triton_experts._gate_up_kernel, pointers, dict(constants, TOP_K=8), tile)
            compile_kernel(triton_experts._down_kernel, pointers, constants, tile)


def test_the_kernels_compile_for_a_hopper_gpu():
    """The interpreter runs kernels without compiling them: compile each for sm_90, in a process
    without TRITON_INTERPRET, to catch what only the compiler rejects."""
    import os
    import subprocess
    import sys

    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    repository = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", "from tests.test_moe import compile_kernels_for; compile_kernels_for(90)"],
        cwd=repository, env=environment, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]


# ---- on a GPU ---------------------------------------------------------------------------------------

# Qwen3-30B-A3B's experts: 128 of hidden 2048 and width 768.
GPU_HIDDEN, GPU_INTERMEDIATE, GPU_EXPERTS = 2048, 768, 128
# bf16 rounds each projection's output: the error relative to float32 stays near its precision.
BF16_RELATIVE_ERROR = 1e-2


@pytest.fixture(scope="module")
def gpu_expert_weights() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(GPU_EXPERTS, 2 * GPU_INTERMEDIATE, GPU_HIDDEN, device="cuda", generator=generator) * GPU_HIDDEN**-0.5
    w2 = torch.randn(GPU_EXPERTS, GPU_HIDDEN, GPU_INTERMEDIATE, device="cuda", generator=generator) * GPU_INTERMEDIATE**-0.5
    return w13.bfloat16(), w2.bfloat16()


def _gpu_step(num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(num_tokens, GPU_HIDDEN, device="cuda", generator=generator).bfloat16()
    logits = (torch.randn(num_tokens, GPU_EXPERTS, device="cuda", generator=generator) * 2).bfloat16()
    return hidden, logits


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 3, 64, 257, 4096])
@pytest.mark.parametrize("top_k", [1, 2, 8])
def test_triton_kernel_on_gpu_matches_float32_in_bf16(num_tokens, top_k, gpu_expert_weights):
    from fxllm.models.moe.triton_experts import triton_fused_moe

    w13, w2 = gpu_expert_weights
    hidden, logits = _gpu_step(num_tokens, seed=num_tokens)
    out = triton_fused_moe(hidden, logits, w13, w2, top_k, renormalize=True)
    reference = torch_fused_moe(hidden.float(), logits.float(), w13.float(), w2.float(), top_k, renormalize=True)
    assert out.dtype == torch.bfloat16 and out.shape == hidden.shape
    assert ((out.float() - reference).norm() / reference.norm()).item() < BF16_RELATIVE_ERROR


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 64, 4096])
def test_triton_kernel_with_fp8_experts_on_gpu_matches_float32(num_tokens, gpu_expert_weights):
    from fxllm.models.moe.triton_experts import triton_fused_moe

    w13_fp8, w2_fp8, w13_scale, w2_scale = quantize_experts(*gpu_expert_weights)
    hidden, logits = _gpu_step(num_tokens, seed=num_tokens)
    out = triton_fused_moe(hidden, logits, w13_fp8, w2_fp8, 8, True, w13_scale, w2_scale)
    reference = torch_fused_moe(hidden.float(), logits.float(), _dequantized(w13_fp8, w13_scale, torch.float32),
                                _dequantized(w2_fp8, w2_scale, torch.float32), 8, True)
    assert ((out.float() - reference).norm() / reference.norm()).item() < BF16_RELATIVE_ERROR


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 8, 256])
def test_the_op_replays_in_a_cuda_graph_for_new_tokens_and_routing(num_tokens, gpu_expert_weights):
    """Captured once, the op routes and sorts each replay's tokens on the device: a graph holds it."""
    w13, w2 = gpu_expert_weights
    hidden, logits = _gpu_step(num_tokens, seed=1)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # compile the kernels before capturing
        torch.ops.fxllm.fused_moe(hidden, logits, w13, w2, 8, True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_out = torch.ops.fxllm.fused_moe(hidden, logits, w13, w2, 8, True)
    new_hidden, new_logits = _gpu_step(num_tokens, seed=2)
    hidden.copy_(new_hidden)
    logits.copy_(new_logits)
    graph.replay()
    torch.testing.assert_close(captured_out, torch.ops.fxllm.fused_moe(new_hidden, new_logits, w13, w2, 8, True), rtol=0, atol=0)


def _compiled_variants(kernel) -> int:
    """Binaries Triton holds for a jitted kernel, over every device."""
    return sum(len(caches[0]) for caches in kernel.device_caches.values())


@pytest.mark.gpu
def test_step_sizes_of_one_tile_compile_each_kernel_once(gpu_expert_weights):
    from fxllm.models.moe import triton_experts, triton_routing

    w13, w2 = gpu_expert_weights
    kernels = [triton_experts._gate_up_kernel, triton_experts._down_kernel, triton_routing._route_kernel,
               triton_routing._plan_kernel, triton_routing._scatter_kernel]
    torch.ops.fxllm.fused_moe(*_gpu_step(1, seed=0), w13, w2, 8, True)
    variants = [_compiled_variants(kernel) for kernel in kernels]
    for num_tokens in (2, 3, 16, 17, 32):  # every one a SMALL_TILE step with 128 experts, top-8
        assert triton_experts.expert_tile(num_tokens * 8, GPU_EXPERTS) == triton_experts.SMALL_TILE
        torch.ops.fxllm.fused_moe(*_gpu_step(num_tokens, seed=0), w13, w2, 8, True)
    assert [_compiled_variants(kernel) for kernel in kernels] == variants


@pytest.mark.gpu
@pytest.mark.parametrize("arch", CONFIGS)
def test_fp32_greedy_on_gpu_with_cuda_graphs_matches_hf_on_cpu(arch, moe_dirs):
    """Decode steps replay FULL CUDA graphs that hold the Triton experts; prompt chunks replay pieces."""
    model_dir = moe_dirs[arch]
    llm = LLM(model=str(model_dir), device="cuda", dtype="float32", max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=16)
    assert llm.compile_report().cudagraph_sizes
    tokenizer = llm.get_tokenizer()
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == hf_greedy(model_dir, tokenizer.encode(prompt), NEW_TOKENS)


# ---- tensor parallelism (two ranks on CPU, gloo) -----------------------------------------------------

TP_MODELS = ["mixtral", "qwen2_moe", "qwen3_moe"]


def _row_parallel_outputs(model_dir: Path) -> int:
    """All-reduces the TP pass inserts: o_proj per layer, down_proj per dense MLP or shared expert,
    the experts of each sparse layer, and the embedding."""
    config = AutoConfig.from_pretrained(model_dir)
    model = MODEL_REGISTRY[config.architectures[0]](config, 8)
    count = 1
    for layer in model.model.layers:
        count += 1
        mlp = layer.mlp
        count += 1 + (isinstance(mlp, SparseMoeBlock) and mlp.shared_expert is not None)
    return count


@pytest.fixture(scope="module")
def tensor_parallel_dirs(moe_dirs, tmp_path_factory) -> dict[str, Path]:
    """Each model's directory, holding the logits both ranks computed (tests/test_tensor_parallel.py)."""
    import torch.multiprocessing as mp

    from tests.test_tensor_parallel import WORLD_SIZE, _rank_main

    rendezvous = tmp_path_factory.mktemp("moe_tp") / "rendezvous"
    dirs = [str(moe_dirs[name]) for name in TP_MODELS]
    mp.start_processes(_rank_main, args=(WORLD_SIZE, dirs, str(rendezvous)), nprocs=WORLD_SIZE, join=True, start_method="spawn")
    return {name: moe_dirs[name] for name in TP_MODELS}


@pytest.mark.parametrize("arch", TP_MODELS)
def test_two_ranks_split_each_expert_and_give_the_single_device_logits(arch, tensor_parallel_dirs):
    from tests.test_tensor_parallel import LOGIT_TOLERANCE, WORLD_SIZE, tp_forward

    model_dir = tensor_parallel_dirs[arch]
    reference, _ = tp_forward(model_dir, rank=0, world_size=1)
    assert json.loads((model_dir / "matches0.json").read_text()) == _row_parallel_outputs(model_dir)
    for rank in range(WORLD_SIZE):
        logits = torch.load(model_dir / f"logits{rank}.pt")
        torch.testing.assert_close(logits, reference, rtol=0, atol=LOGIT_TOLERANCE)
        assert torch.equal(logits.argmax(-1), reference.argmax(-1))


def test_an_engine_of_two_ranks_generates_the_single_device_tokens(tensor_parallel_dirs):
    model_dir = tensor_parallel_dirs["qwen2_moe"]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(model=str(model_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN).generate(PROMPTS, params, use_tqdm=False)]
    parallel = LLM(model=str(model_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, tensor_parallel_size=2)
    assert parallel.compile_report().passes["tensor_parallel"] == _row_parallel_outputs(model_dir)
    assert [o.outputs[0].token_ids for o in parallel.generate(PROMPTS, params, use_tqdm=False)] == expected


def test_olmoe_under_tensor_parallelism_is_a_clear_error():
    from fxllm.parallel.tp_config import tp_layout

    with pytest.raises(ValueError, match="tensor parallelism supports .* not OlmoeForCausalLM"):
        tp_layout(CONFIGS["olmoe"](), rank=0, world_size=2)


def test_an_expert_width_the_ranks_cannot_divide_is_a_clear_error():
    from fxllm.parallel.tp_config import tp_layout

    config = CONFIGS["qwen2_moe"]()
    config.shared_expert_intermediate_size = 50
    with pytest.raises(ValueError, match="shared_expert_intermediate_size=50 is not divisible by it"):
        tp_layout(config, rank=0, world_size=4)


# ---- FP8 experts (quantization="fp8") -------------------------------------------------------------

FP8_PROMPT = [5, 17, 42, 99, 3, 250, 7, 11, 64, 128, 31]


def quantize_experts(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(w13, w2) in FP8 with their per-row float32 scales, as Fp8FusedMoE quantizes them."""
    from fxllm.models.quantization.fp8_quant import quantize_per_channel

    quantized = []
    for stacked in (w13, w2):
        weights, scales = zip(*(quantize_per_channel(expert) for expert in stacked))
        quantized += [torch.stack(weights), torch.stack(scales).squeeze(-1)]
    return quantized[0], quantized[2], quantized[1], quantized[3]  # w13, w2, w13_scale, w2_scale


def _dequantized(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (weight.float() * scale[..., None]).to(dtype)


@pytest.mark.parametrize("num_tokens, num_experts, top_k", [(1, 4, 1), (33, 6, 3)])
def test_torch_path_with_fp8_experts_equals_the_reference_on_their_dequantized_weights(num_tokens, num_experts, top_k):
    hidden, logits, w13, w2 = random_moe_inputs(num_tokens, hidden=32, intermediate=24, num_experts=num_experts)
    w13_fp8, w2_fp8, w13_scale, w2_scale = quantize_experts(w13, w2)
    out = torch.ops.fxllm.fused_moe(hidden, logits, w13_fp8, w2_fp8, top_k, True, w13_scale, w2_scale)
    reference = per_token_reference(hidden, logits, _dequantized(w13_fp8, w13_scale, torch.float32),
                                    _dequantized(w2_fp8, w2_scale, torch.float32), top_k, True)
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_tokens, num_experts, top_k", [(1, 4, 1), (7, 8, 2), (20, 16, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_with_fp8_experts_equals_the_torch_path(num_tokens, num_experts, top_k, dtype):
    from fxllm.models.moe.triton_experts import triton_fused_moe

    hidden, logits, w13, w2 = random_moe_inputs(num_tokens, 64, 48, num_experts)
    w13_fp8, w2_fp8, w13_scale, w2_scale = quantize_experts(w13, w2)
    hidden, logits = hidden.to(dtype), logits.to(dtype)
    out = triton_fused_moe(hidden, logits, w13_fp8, w2_fp8, top_k, False, w13_scale, w2_scale)
    reference = torch_fused_moe(hidden, logits, w13_fp8, w2_fp8, top_k, False, w13_scale, w2_scale)
    # The kernel scales each finished column; the torch path rounds each dequantized weight.
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), reference.float(), rtol=tolerance, atol=tolerance)


def _prompt_logprobs(llm: LLM) -> torch.Tensor:
    output = llm.generate({"prompt_token_ids": FP8_PROMPT}, SamplingParams(max_tokens=1, prompt_logprobs=VOCAB_SIZE),
                          use_tqdm=False)[0]
    return torch.tensor([[entry[token].logprob for token in range(VOCAB_SIZE)] for entry in output.prompt_logprobs[1:]])


@pytest.mark.parametrize("arch", CONFIGS)
def test_fp8_experts_stay_within_fp8_noise_of_full_precision(arch, moe_dirs):
    """Experts in FP8 with per-row scales; routers (and lm_head) stay in the model dtype. The
    bound is test_fp8.py's for dense layers: these random tiny models amplify weight noise."""
    from fxllm.models.quantization.fp8_linear import Fp8Linear
    from fxllm.models.quantization.fp8_moe import Fp8FusedMoE
    from tests.test_fp8 import FULL_PRECISION_TOLERANCE, centered_distance

    reference = _prompt_logprobs(LLM(model=str(moe_dirs[arch]), enforce_eager=True, max_model_len=MAX_MODEL_LEN))
    llm = LLM(model=str(moe_dirs[arch]), enforce_eager=True, max_model_len=MAX_MODEL_LEN, quantization="fp8")
    for layer in llm.llm_engine.runner.model.model.layers:
        assert isinstance(layer.self_attn.o_proj, Fp8Linear)
        if isinstance(layer.mlp, SparseMoeBlock):
            assert isinstance(layer.mlp.experts, Fp8FusedMoE) and layer.mlp.experts.w13.dtype == torch.float8_e4m3fn
            assert type(layer.mlp.gate) is torch.nn.Linear and layer.mlp.gate.weight.dtype == torch.float32
    assert centered_distance(_prompt_logprobs(llm), reference) < FULL_PRECISION_TOLERANCE


@pytest.mark.gpu
@pytest.mark.parametrize("arch", CONFIGS)
def test_fp8_experts_on_gpu_with_cuda_graphs_stay_within_fp8_noise(arch, moe_dirs):
    """FP8 expert kernels inside FULL decode graphs and piecewise prompt graphs."""
    from tests.test_fp8 import FULL_PRECISION_TOLERANCE, centered_distance

    engine = dict(model=str(moe_dirs[arch]), device="cuda", dtype="float32", max_model_len=MAX_MODEL_LEN,
                  gpu_memory_utilization=0.3)
    reference = _prompt_logprobs(LLM(**engine, enforce_eager=True))
    llm = LLM(**engine, quantization="fp8")
    assert llm.compile_report().cudagraph_sizes
    assert centered_distance(_prompt_logprobs(llm), reference) < FULL_PRECISION_TOLERANCE
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in llm.generate(PROMPTS, params, use_tqdm=False))


def test_fp8_experts_under_two_ranks_quantize_each_rank_slice(moe_dirs):
    from tests.test_fp8 import FULL_PRECISION_TOLERANCE, centered_distance

    model_dir = str(moe_dirs["qwen3_moe"])
    reference = _prompt_logprobs(LLM(model=model_dir, enforce_eager=True, max_model_len=MAX_MODEL_LEN))
    llm = LLM(model=model_dir, enforce_eager=True, max_model_len=MAX_MODEL_LEN, quantization="fp8", tensor_parallel_size=2)
    assert llm.compile_report().passes["tensor_parallel"] == _row_parallel_outputs(Path(model_dir))
    assert centered_distance(_prompt_logprobs(llm), reference) < FULL_PRECISION_TOLERANCE
