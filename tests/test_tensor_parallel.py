"""Tensor parallelism as a graph pass, on CPU with gloo: two ranks compute one rank's logits.

Each rank builds its model from the TP-local config, reads only its weight slices,
and runs the captured graph (eagerly, as at level 0) after the TP pass inserted
the all-reduces; the gathered logits must equal the single-device model's.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoConfig

from fxllm import LLM, SamplingParams
from fxllm.compiler.capture import DirectCall, capture
from fxllm.models.loader import build_model as _build_model
from fxllm.models.registry import resolve_architecture
from fxllm.models.weights import safetensors_files
from fxllm.parallel.sharding import iterate_sharded_safetensors
from fxllm.parallel.tp_config import tp_layout, tp_local_config
from fxllm.passes import rms_norm_fusion
from fxllm.parallel.collectives import gather_logits
from fxllm.passes.tensor_parallel import TensorParallelPass, placeholder_parameter_names
from fxllm.models.interface import attention_layers
from fxllm.attention.torch_backend import TorchAttentionBackend
from fxllm.forward_context import AttentionMetadata, ForwardContext, set_forward_context
from tests.test_fp8 import FULL_PRECISION_TOLERANCE, centered_distance, write_fp8
from tests.tiny_models import CONFIGS, VOCAB_SIZE, gemma3_text_config, save_config_checkpoint, save_random_checkpoint

PROMPT = [5, 17, 42, 99, 3, 250, 7, 11, 64, 128, 31]
BLOCK_SIZE = 16
MAX_POSITIONS = 64
WORLD_SIZE = 2
# fp32 partial sums added in another order: logits agree to rounding.
LOGIT_TOLERANCE = 1e-4
# A rank that fails at start-up is reported within seconds, far below the collective timeout.
STARTUP_FAILURE_SECONDS = 60


def tp_forward(model_dir: Path, rank: int, world_size: int) -> tuple[torch.Tensor, int]:
    """(logits of every prompt position [T, vocab], TP pass matches) on this rank."""
    config = AutoConfig.from_pretrained(model_dir)
    layout = tp_layout(config, rank, world_size)
    local_config = tp_local_config(config, layout)
    _, model_class = resolve_architecture(local_config.architectures, str(model_dir))
    torch.manual_seed(0)
    model = model_class(local_config, MAX_POSITIONS)
    model.load_weights(iterate_sharded_safetensors(safetensors_files(model_dir), layout))
    model.eval().requires_grad_(False)
    specs = attention_layers(model)
    backend = TorchAttentionBackend()
    num_tokens = len(PROMPT)
    input_ids, positions = torch.tensor(PROMPT), torch.arange(num_tokens)
    with torch.inference_mode():
        with set_forward_context(ForwardContext(None, {}, specs, backend)):
            captured = capture(model, torch.zeros_like(input_ids), positions.clone())  # ids valid on every shard
        tp_pass = TensorParallelPass(layout, placeholder_parameter_names(captured.graph_module.graph, captured.example_inputs, model))
        matches = tp_pass(captured.graph_module.graph) if world_size > 1 else 0
        captured.graph_module.recompile()
        blocks = -(-num_tokens // BLOCK_SIZE)
        kv_caches = {
            name: torch.zeros(2, blocks, BLOCK_SIZE, spec.num_kv_heads, spec.head_dim) for name, spec in specs.items()
        }
        metadata = AttentionMetadata(
            slot_mapping=torch.arange(num_tokens),
            block_tables=torch.arange(blocks, dtype=torch.int32)[None],
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32),
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32),
            seq_lens_cpu=[num_tokens],
            query_start_loc_cpu=[0, num_tokens],
        )
        with set_forward_context(ForwardContext(metadata, kv_caches, specs, backend)):
            hidden = DirectCall(captured, captured.graph_module)(input_ids, positions)
        return gather_logits(model.compute_logits(hidden), layout), matches


def _rank_main(rank: int, world_size: int, model_dirs: list[str], rendezvous: str) -> None:
    """One rank: every model in turn (one process pair for all, as spawning costs seconds)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        for model_dir in map(Path, model_dirs):
            logits, matches = tp_forward(model_dir, rank, world_size)
            torch.save(logits, model_dir / f"logits{rank}.pt")
            (model_dir / f"matches{rank}.json").write_text(json.dumps(matches))
    finally:
        dist.destroy_process_group()


def _gqa_one_kv_head():
    config = CONFIGS["llama"]()
    config.num_key_value_heads = 1  # fewer KV heads than ranks: replicated, as vLLM does
    return config


def _gpt2():
    from transformers import GPT2Config

    # Conv1D weights stored [in, out], q/k/v fused in c_attn, biases on every projection
    # (c_proj's is row-parallel: added once), LayerNorm, learned positions, tied lm_head.
    return GPT2Config(
        vocab_size=VOCAB_SIZE, n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS,
        architectures=["GPT2LMHeadModel"],
    )


def _opt():
    from transformers import OPTConfig

    # Separate q/k/v fused at load, biases on every projection (out_proj's and fc2's
    # row-parallel), ReLU MLP named fc1/fc2, learned positions, a word-embedding
    # projection (replicated), tied lm_head.
    return OPTConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, word_embed_proj_dim=32, ffn_dim=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_POSITIONS, architectures=["OPTForCausalLM"],
    )


MODELS = {
    "llama": lambda: CONFIGS["llama"](),
    "qwen2": lambda: CONFIGS["qwen2"](),  # q/k/v biases: column-parallel
    "qwen3": lambda: CONFIGS["qwen3"](),  # per-head q/k norms: replicated
    "gqa_replicated_kv": _gqa_one_kv_head,
    "gpt2": _gpt2,
    # Scaled embeddings after the vocab-parallel lookup, soft-capped logit shards, sliding layers.
    "gemma3": gemma3_text_config,
    "opt": _opt,
}


@pytest.fixture(scope="module")
def tensor_parallel_runs(tmp_path_factory) -> dict[str, Path]:
    """Each model's checkpoint directory, holding what both ranks computed."""
    root = tmp_path_factory.mktemp("tensor_parallel")
    model_dirs = {name: save_config_checkpoint(make(), root / name) for name, make in MODELS.items()}
    mp.start_processes(
        _rank_main, args=(WORLD_SIZE, [str(d) for d in model_dirs.values()], str(root / "rendezvous")),
        nprocs=WORLD_SIZE, join=True, start_method="spawn",
    )
    return model_dirs


@pytest.mark.parametrize("name", MODELS)
def test_two_ranks_give_the_single_device_logits(name, tensor_parallel_runs):
    model_dir = tensor_parallel_runs[name]
    reference, no_matches = tp_forward(model_dir, rank=0, world_size=1)
    assert no_matches == 0
    num_layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    assert json.loads((model_dir / "matches0.json").read_text()) == 2 * num_layers + 1  # o/down per layer, embedding
    for rank in range(WORLD_SIZE):  # every rank gathers the full vocabulary
        logits = torch.load(model_dir / f"logits{rank}.pt")
        assert logits.shape == reference.shape
        torch.testing.assert_close(logits, reference, rtol=0, atol=LOGIT_TOLERANCE)
        assert torch.equal(logits.argmax(-1), reference.argmax(-1))


def test_a_head_count_the_ranks_cannot_divide_is_a_clear_error():
    config = CONFIGS["llama"]()
    with pytest.raises(ValueError, match="tensor_parallel_size=3 cannot split this model: num_attention_heads=4"):
        tp_layout(config, rank=0, world_size=3)


def test_the_last_vocab_shard_is_padded_and_sliced_off():
    config = CONFIGS["llama"]()
    config.vocab_size = 101
    layout = tp_layout(config, rank=1, world_size=2)
    assert layout.local_vocab == 51 and layout.vocab_start == 51
    assert tp_local_config(config, layout).vocab_size == 51


# ---- the engine: LLM(tensor_parallel_size=2) on CPU ---------------------------------------------

ENGINE_PROMPTS = [{"prompt_token_ids": PROMPT[: 3 + 2 * i]} for i in range(4)]
GREEDY = dict(temperature=0.0, max_tokens=6, ignore_eos=True)


def _tokens(llm: LLM, **params) -> list:
    outputs = llm.generate(ENGINE_PROMPTS, SamplingParams(**GREEDY, **params), use_tqdm=False)
    return [(o.outputs[0].token_ids, o.prompt_logprobs and [sorted(p) for p in o.prompt_logprobs[1:]]) for o in outputs]


@pytest.mark.parametrize("name", MODELS)
def test_an_engine_of_two_ranks_generates_the_single_device_tokens(name, tensor_parallel_runs):
    model_dir = tensor_parallel_runs[name]
    single = LLM(model=str(model_dir), enforce_eager=True, max_model_len=MAX_POSITIONS)
    expected = _tokens(single, prompt_logprobs=2)
    del single
    parallel = LLM(model=str(model_dir), enforce_eager=True, max_model_len=MAX_POSITIONS, tensor_parallel_size=2)
    assert parallel.compile_report().passes["tensor_parallel"] > 0
    assert _tokens(parallel, prompt_logprobs=2) == expected  # one logits gather serves samples and prompt logprobs
    pids = parallel.llm_engine.executor.worker_pids
    del parallel
    gc.collect()
    assert not any(_alive(pid) for pid in pids)


def test_async_scheduling_under_two_ranks_gives_the_single_device_tokens(tensor_parallel_runs):
    """Each step is launched before the last one's tokens reach rank 0's host: every rank takes
    its pending input tokens from the sampled ids rank 0 broadcast on the device."""
    model_dir = tensor_parallel_runs["qwen2"]
    single = LLM(model=str(model_dir), enforce_eager=True, max_model_len=MAX_POSITIONS)
    prompts = ENGINE_PROMPTS * 2
    # Outputs from rank 1's vocab shard: only rank 1 embeds them, so a rank that missed the
    # broadcast ids would embed zeros there.
    vocab = CONFIGS["qwen2"]().vocab_size
    upper = dict(temperature=0.0, max_tokens=6, allowed_token_ids=list(range(vocab - vocab // 4, vocab)))
    probe = single.generate(prompts, SamplingParams(**upper, ignore_eos=True), use_tqdm=False)
    stop_on = [o.outputs[0].token_ids[2] for o in probe]
    params = [
        SamplingParams(**upper, ignore_eos=True) if i % 2 else SamplingParams(**upper, stop_token_ids=[stop])
        for i, stop in enumerate(stop_on)
    ]
    expected = [o.outputs[0].token_ids for o in single.generate(prompts, params, use_tqdm=False)]
    del single
    parallel = LLM(model=str(model_dir), enforce_eager=True, max_model_len=MAX_POSITIONS, tensor_parallel_size=2,
                   async_scheduling=True)
    assert parallel.llm_engine.async_scheduling
    assert [o.outputs[0].token_ids for o in parallel.generate(prompts, params, use_tqdm=False)] == expected
    assert any(len(tokens) < upper["max_tokens"] for tokens in expected)  # some stopped with a step in flight


def test_a_compiled_engine_of_two_ranks_generates_the_single_device_tokens(tensor_parallel_runs, monkeypatch):
    model_dir = tensor_parallel_runs["qwen3"]
    # The CUDA-only RMSNorm fusion on here too: the all-reduces must land between the
    # row-parallel GEMMs and the fused add + norm.
    monkeypatch.setattr(rms_norm_fusion, "FUSED_DEVICE_TYPES", ("cpu", "cuda"))
    # Compiled in this process first: forked workers must not inherit Inductor's dead thread pool.
    expected = _tokens(LLM(model=str(model_dir), max_model_len=MAX_POSITIONS))
    parallel = LLM(model=str(model_dir), max_model_len=MAX_POSITIONS, tensor_parallel_size=2)
    report = parallel.compile_report()
    assert report.level == 3 and report.passes["tensor_parallel"] == 2 * CONFIGS["qwen3"]().num_hidden_layers + 1
    assert report.passes["rms_norm_fusion"] == 2 * CONFIGS["qwen3"]().num_hidden_layers + 1
    assert _tokens(parallel) == expected


def _fail_on_rank_1(self, step, pending_ids):
    if self.tp_layout.rank == 1:
        raise RuntimeError("rank 1 lost its device")


def test_a_worker_error_during_a_step_surfaces_with_its_rank(tensor_parallel_runs, monkeypatch):
    from fxllm.runtime.runner import ModelRunner

    monkeypatch.setattr(ModelRunner, "execute_received", _fail_on_rank_1)  # forked workers inherit it
    llm = LLM(model=str(tensor_parallel_runs["llama"]), enforce_eager=True, max_model_len=MAX_POSITIONS,
              tensor_parallel_size=2)
    with pytest.raises(RuntimeError, match="(?s)worker rank 1 failed.*rank 1 lost its device"):
        _tokens(llm)
    pids = llm.llm_engine.executor.worker_pids
    del llm
    gc.collect()
    assert not any(_alive(pid) for pid in pids)


def _fail_to_load_on_rank_1(model_config, device, tp_layout=None):
    if tp_layout is not None and tp_layout.rank == 1:
        raise RuntimeError("rank 1 ran out of memory loading its shard")
    return _build_model(model_config, device, tp_layout)


def test_a_worker_failing_at_start_up_stops_the_engine_with_its_rank(tensor_parallel_runs, monkeypatch):
    """Rank 0 meets the workers after each start-up phase: it raises there, not at a timeout."""
    import fxllm.runtime.runner as runner_module

    monkeypatch.setattr(runner_module, "build_model", _fail_to_load_on_rank_1)  # forked workers inherit it
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="(?s)worker rank 1 failed.*rank 1 ran out of memory"):
        LLM(model=str(tensor_parallel_runs["llama"]), enforce_eager=True, max_model_len=MAX_POSITIONS,
            tensor_parallel_size=2)
    assert time.perf_counter() - start < STARTUP_FAILURE_SECONDS
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("fxllm-tp-")]
    assert not dist.is_initialized()  # the same process can start another engine


def test_an_architecture_without_a_sharding_plan_is_a_clear_error(tmp_path):
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=MAX_POSITIONS, architectures=["BertModel"],
    )
    model_dir = save_random_checkpoint(BertModel(config), tmp_path / "bert")
    with pytest.raises(ValueError, match="tensor parallelism supports .*OPTForCausalLM.* not BertModel"):
        LLM(model=str(model_dir), enforce_eager=True, tensor_parallel_size=2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def test_sharded_state_round_trip_reads_one_file_per_rank(tensor_parallel_runs, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "tools"))
    from save_sharded_state import save_sharded_state

    model_dir = tensor_parallel_runs["qwen2"]
    expected = _tokens(LLM(model=str(model_dir), enforce_eager=True, max_model_len=MAX_POSITIONS))
    sharded = tmp_path / "sharded"
    save_sharded_state(str(model_dir), sharded, tensor_parallel_size=2, device="cpu")
    assert sorted(p.name for p in sharded.glob("*.safetensors")) == [
        "model-rank-0-part-0.safetensors", "model-rank-1-part-0.safetensors"
    ]
    assert (sharded / "config.json").exists() and (sharded / "tokenizer.json").exists()
    llm = LLM(model=str(sharded), load_format="sharded_state", tensor_parallel_size=2, enforce_eager=True,
              max_model_len=MAX_POSITIONS)
    assert _tokens(llm) == expected
    del llm
    with pytest.raises(ValueError, match="sharded for tensor_parallel_size=2"):
        LLM(model=str(sharded), load_format="sharded_state", enforce_eager=True, max_model_len=MAX_POSITIONS)


def test_an_unknown_load_format_is_a_clear_error():
    with pytest.raises(ValueError, match="load_format must be one of auto, safetensors, sharded_state, dummy, got 'pt'"):
        LLM(model="unused", load_format="pt")


def _prompt_logprobs(llm: LLM) -> torch.Tensor:
    output = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=1, prompt_logprobs=-1),
                          use_tqdm=False)[0]
    return torch.tensor([[entry[token].logprob for token in range(VOCAB_SIZE)] for entry in output.prompt_logprobs[1:]])


def test_dynamic_fp8_under_tensor_parallelism_reduces_its_row_parallel_outputs(tensor_parallel_runs):
    """Each rank quantizes its own shard at load; the pass reduces fxllm::fp8_linear outputs too.
    Per-row scales over a rank's half of the inputs differ from one device's, so the check is
    the FP8 tolerance of test_fp8.py against full precision, not equality with one device."""
    model_dir = tensor_parallel_runs["llama"]
    reference = _prompt_logprobs(LLM(model=str(model_dir), enforce_eager=True, max_model_len=MAX_POSITIONS,
                                     max_logprobs=-1))
    llm = LLM(model=str(model_dir), enforce_eager=True, max_model_len=MAX_POSITIONS, quantization="fp8",
              tensor_parallel_size=2, max_logprobs=-1)
    assert llm.compile_report().passes["tensor_parallel"] == 2 * CONFIGS["llama"]().num_hidden_layers + 1
    assert centered_distance(_prompt_logprobs(llm), reference) < FULL_PRECISION_TOLERANCE


# Scales of every layout: a block grid, one per output channel, one per tensor (with static inputs).
PRE_QUANTIZED = {
    "blocks_16x16": dict(fmt="fp8", block=(16, 16)),
    "per_channel": dict(fmt="compressed-tensors", strategy="channel"),
    "per_tensor_static": dict(fmt="compressed-tensors", strategy="tensor", activations="static"),
}


@pytest.mark.parametrize("variant", PRE_QUANTIZED)
def test_pre_quantized_fp8_checkpoints_split_their_scales_with_their_weights(variant, tensor_parallel_runs, tmp_path):
    """Both sides dequantize the same FP8 weights with the same scales: only the order of the
    partial sums differs, so the logits agree to rounding."""
    model_dir = write_fp8.write_fp8_checkpoint(tensor_parallel_runs["llama"], tmp_path / variant, **PRE_QUANTIZED[variant])
    single = _prompt_logprobs(LLM(model=str(model_dir), enforce_eager=True, max_model_len=MAX_POSITIONS,
                                  max_logprobs=-1))
    llm = LLM(model=str(model_dir), enforce_eager=True, max_model_len=MAX_POSITIONS, tensor_parallel_size=2,
              max_logprobs=-1)
    torch.testing.assert_close(_prompt_logprobs(llm), single, rtol=0, atol=LOGIT_TOLERANCE)


def test_scale_blocks_a_rank_would_cut_are_a_clear_error(tensor_parallel_runs, tmp_path):
    # Each rank's KV head is 16 rows of k_proj: half of a 32-row scale block.
    model_dir = write_fp8.write_fp8_checkpoint(tensor_parallel_runs["llama"], tmp_path / "fp8", "fp8", block=(32, 32))
    with pytest.raises((ValueError, RuntimeError), match="16 output features .* not whole 32-wide FP8 scale blocks"):
        LLM(model=str(model_dir), enforce_eager=True, max_model_len=MAX_POSITIONS, tensor_parallel_size=2)


def test_stopping_releases_rank_0_cuda_graphs_before_destroying_the_process_group():
    """Destroying an NCCL group waits forever while a captured CUDA graph still holds its
    collectives (as `del llm` did on two GPUs), so rank 0 releases its graphs first."""
    from fxllm.runtime.executor import multiproc

    calls = []

    class Runner:
        @staticmethod
        def release_cudagraphs():
            calls.append("graphs released")

    class StepSync:
        @staticmethod
        def send_stop():
            calls.append("workers told to stop")

    class Workers:
        @staticmethod
        def shutdown():
            calls.append("process group destroyed")

    multiproc._shut_down(Runner, Workers, StepSync)
    assert calls == ["workers told to stop", "graphs released", "process group destroyed"]
