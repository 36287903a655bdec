"""CUDA graphs on a GPU (skipped without one): every mode gives the tokens of NONE."""

from __future__ import annotations

import gc

import pytest
import torch

from fxllm import LLM, SamplingParams

pytestmark = pytest.mark.gpu

CAPTURE_SIZES = [1, 2, 4, 8, 16]
# Decode batches on the list (1, 4), off it (3, 5) and above the largest size (24);
# max_num_batched_tokens=16 makes prefills mixed steps of at most 16 tokens.
BATCH_SIZES = [1, 3, 4, 5, 24]
NEW_TOKENS = 8
MODES = ["PIECEWISE", "FULL", "FULL_AND_PIECEWISE"]


def _prompts(count: int) -> list[dict]:
    return [{"prompt_token_ids": [(11 * i + 5 * j) % 200 + 3 for j in range(3 + i % 7)]} for i in range(count)]


def _greedy_tokens(model_dir, mode: str) -> list[list[list[int]]]:
    llm = LLM(
        model=str(model_dir),
        device="cuda",
        dtype="float32",
        max_model_len=128,
        max_num_seqs=32,
        max_num_batched_tokens=16,
        gpu_memory_utilization=0.3,
        compilation_config={"cudagraph_mode": mode, "cudagraph_capture_sizes": CAPTURE_SIZES},
    )
    runner = llm.llm_engine.runner
    pieces = runner.compiled.cudagraph_pieces()
    for wrapper in [*pieces, runner.full_graph]:
        wrapper.check_addresses = True  # a replay with moved inputs raises instead of reading stale memory
    if mode != "NONE":
        assert llm.compile_report().cudagraph_sizes, "no graphs were captured"
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    tokens = [[o.outputs[0].token_ids for o in llm.generate(_prompts(n), params, use_tqdm=False)] for n in BATCH_SIZES]
    if "FULL" in mode:
        assert runner.full_graph.graphs, "FULL graphs were captured but never replayable"
    if "PIECEWISE" in mode:
        assert pieces and all(piece.graphs for piece in pieces)
    del llm, runner, pieces
    gc.collect()
    torch.cuda.empty_cache()
    return tokens


@pytest.fixture(scope="module")
def reference_tokens(tiny_model_dirs):
    return {arch: _greedy_tokens(tiny_model_dirs[arch], "NONE") for arch in ("llama", "qwen3")}


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("mode", MODES)
def test_cudagraph_modes_give_the_tokens_of_none_in_fp32(arch, mode, tiny_model_dirs, reference_tokens):
    assert _greedy_tokens(tiny_model_dirs[arch], mode) == reference_tokens[arch]


def test_full_graphs_at_level_0_give_the_tokens_of_eager(llama_dir):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    results = []
    for mode in ("NONE", "FULL"):
        llm = LLM(
            model=str(llama_dir), device="cuda", dtype="float32", max_model_len=128, gpu_memory_utilization=0.3,
            compilation_config={"level": 0, "cudagraph_mode": mode, "cudagraph_capture_sizes": CAPTURE_SIZES},
        )
        results.append([o.outputs[0].token_ids for o in llm.generate(_prompts(5), params, use_tqdm=False)])
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    assert results[0] == results[1]
