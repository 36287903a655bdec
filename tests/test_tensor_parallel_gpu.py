"""Tensor parallelism on two GPUs over NCCL (skipped with fewer): parity with one GPU.

Both engines run compiled with the default CUDA graphs, so decode steps replay FULL
graphs whose all-reduces and logits gather are captured inside them. fp32 gives the
single-GPU greedy tokens; bf16 (partial sums rounded per rank) follows the
near-tie rule: at the first differing token each side's token is in the other's top-5.
"""

from __future__ import annotations

import gc

import pytest
import torch

from fxllm import LLM, SamplingParams
from tests.near_ties import TOP_K, assert_diverge_only_between_near_ties

WORLD_SIZE = 2
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < WORLD_SIZE, reason=f"needs {WORLD_SIZE} GPUs"),
]

NEW_TOKENS = 12
PROMPTS = [
    "Once upon a time there was a tiny model that learned to count: one two three",
    "The capital of France is",
    "Hello",
]


def _generate(model_dir, dtype: str, tensor_parallel_size: int) -> list:
    llm = LLM(
        model=str(model_dir), device="cuda", dtype=dtype, max_model_len=256, gpu_memory_utilization=0.3,
        tensor_parallel_size=tensor_parallel_size,
    )
    runner = llm.llm_engine.runner
    full_replays = []
    replay_full = runner.full_graph.forward

    def counting_replay(*inputs):
        full_replays.append(inputs[0].shape[0])
        return replay_full(*inputs)

    runner.full_graph.forward = counting_replay
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP_K)
    outputs = [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    assert full_replays, "decode steps did not replay FULL CUDA graphs"
    if tensor_parallel_size > 1:
        assert llm.compile_report().passes.get("tensor_parallel", 0) > 0
        # Small all-reduces take the one-shot kernel over peer memory (NCCL for larger ones).
        assert llm.compile_report().one_shot_all_reduce_bytes > 0
    del llm, runner
    gc.collect()
    torch.cuda.empty_cache()
    return outputs


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_two_gpus_give_the_single_gpu_tokens_in_fp32(arch, tiny_model_dirs):
    single = _generate(tiny_model_dirs[arch], "float32", 1)
    split = _generate(tiny_model_dirs[arch], "float32", WORLD_SIZE)
    assert [o.token_ids for o in split] == [o.token_ids for o in single]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_two_gpus_in_bf16_diverge_from_one_only_between_near_ties(arch, tiny_model_dirs):
    single = _generate(tiny_model_dirs[arch], "bfloat16", 1)
    split = _generate(tiny_model_dirs[arch], "bfloat16", WORLD_SIZE)
    assert_diverge_only_between_near_ties(split, single)
