"""The engine on a CUDA device (skipped without one)."""

from __future__ import annotations

import pytest
import torch

from fxllm import LLM, SamplingParams
from tests.conftest import ARCHITECTURES
from tests.tiny_models import hf_greedy

pytestmark = pytest.mark.gpu
PROMPTS = ["The capital of France is", "Hello", "Once upon a time there was a tiny model that learned to count"]
NEW_TOKENS = 10
TOP_K = 5


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "compiled"])
def test_fp32_greedy_on_gpu_matches_hf_on_cpu(arch, tiny_model_dirs, enforce_eager):
    model_dir = tiny_model_dirs[arch]
    llm = LLM(model=str(model_dir), device="cuda", dtype="float32", max_model_len=256, enforce_eager=enforce_eager)
    tokenizer = llm.get_tokenizer()
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        ids = tokenizer.encode(prompt)
        assert output.outputs[0].token_ids == hf_greedy(model_dir, ids, NEW_TOKENS)


def test_bf16_greedy_diverges_only_between_near_ties(llama_dir):
    """bf16 on GPU (CUDA graphs on, the default) vs fp32 HF: at the first differing token,
    each side's token is in the other's top-k."""
    from transformers import AutoModelForCausalLM

    llm = LLM(model=str(llama_dir), device="cuda", dtype="bfloat16", max_model_len=256)
    assert llm.compile_report().cudagraph_sizes
    reference = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP_K)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        ids = tokenizer.encode(prompt)
        theirs = hf_greedy(llama_dir, ids, NEW_TOKENS)
        mine = output.outputs[0].token_ids
        if mine == theirs:
            continue
        first = next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
        with torch.no_grad():
            logits = reference(torch.tensor([ids + theirs[:first]])).logits[0, -1]
        assert mine[first] in logits.topk(TOP_K).indices.tolist()
        our_top = sorted(output.outputs[0].logprobs[first].items(), key=lambda kv: kv[1].rank)[:TOP_K]
        assert theirs[first] in [token for token, _ in our_top]


def test_kv_cache_fills_the_memory_left_after_profiling(llama_dir):
    small = LLM(model=str(llama_dir), device="cuda", max_model_len=256, gpu_memory_utilization=0.3, enforce_eager=True)
    blocks_small = small.llm_engine.kv_cache.num_blocks
    del small
    torch.cuda.empty_cache()
    large = LLM(model=str(llama_dir), device="cuda", max_model_len=256, gpu_memory_utilization=0.6, enforce_eager=True)
    assert large.llm_engine.kv_cache.num_blocks > blocks_small > 0
    outputs = large.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 4 for o in outputs)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_triton_backend_greedy_equals_the_torch_reference_backend(arch, tiny_model_dirs):
    from fxllm.attention.torch_backend import TorchAttentionBackend

    model_dir = tiny_model_dirs[arch]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    prompts = PROMPTS * 3  # mixed prefill and decode steps, several requests
    # Two engines share the card: each takes a third of its memory.
    engine_args = dict(device="cuda", dtype="float32", max_model_len=256, max_num_batched_tokens=24, gpu_memory_utilization=0.3)
    triton_llm = LLM(model=str(model_dir), **engine_args)
    assert triton_llm.llm_engine.runner.backend.name == "triton"
    # Without graphs: a captured graph would replay the Triton kernels whatever the backend.
    reference = LLM(model=str(model_dir), compilation_config={"cudagraph_mode": "NONE"}, **engine_args)
    reference.llm_engine.runner.backend = TorchAttentionBackend()
    ours = [o.outputs[0].token_ids for o in triton_llm.generate(prompts, params, use_tqdm=False)]
    theirs = [o.outputs[0].token_ids for o in reference.generate(prompts, params, use_tqdm=False)]
    assert ours == theirs


def _compiled_variants(kernel) -> int:
    """Binaries Triton holds for a jitted kernel, over every device."""
    return sum(len(caches[0]) for caches in kernel.device_caches.values())


def test_start_up_builds_the_attention_kernel_of_prompt_steps_once(llama_dir):
    """The warm-up step at start-up compiles the unified attention kernel; request counts of
    later steps (1, 15, 16, 32: each a case Triton could specialize on) compile nothing more."""
    from fxllm.attention.triton_kernels import _unified_attention_kernel

    llm = LLM(model=str(llama_dir), device="cuda", dtype="bfloat16", max_model_len=256, enforce_eager=True)
    after_start_up = _compiled_variants(_unified_attention_kernel)
    assert after_start_up >= 1
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    for count in (1, 15, 16, 32):
        prompts = [{"prompt_token_ids": [3 + i, 5, 7, 11, 13]} for i in range(count)]
        llm.generate(prompts, params, use_tqdm=False)
    assert _compiled_variants(_unified_attention_kernel) == after_start_up
