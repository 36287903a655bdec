"""Scheduling and caching change no token: prefix caching, chunked prefill, small batches, preemption."""

from __future__ import annotations

import pytest

from fxllm import LLM, SamplingParams

SHARED = "The capital of France is Paris. The quick brown fox jumps over the lazy dog. "
PROMPTS = [
    SHARED + "Hello",
    SHARED + "Once upon a time",
    "Compilers turn graphs into fast kernels",
    SHARED + "How are you today?",
    "one two three",
    SHARED + SHARED + "four five",
]
MAX_TOKENS = 20
PARAMS = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
MAX_MODEL_LEN = 128


def _generate(model_dir, **engine_args):
    llm = LLM(model=str(model_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, **engine_args)
    outputs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    engine = llm.llm_engine
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks, "blocks leaked after the call"
    return [o.outputs[0].token_ids for o in outputs], engine


@pytest.fixture(scope="module")
def reference(llama_dir):
    tokens, _ = _generate(llama_dir, enable_prefix_caching=False)
    assert all(len(t) == MAX_TOKENS for t in tokens)
    return tokens


def test_prefix_cache_hit_changes_no_token(llama_dir, reference):
    llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN)
    first = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
    hits_after_first = llm.llm_engine.kv_cache.prefix_hits
    second = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
    assert first == reference
    assert second == reference
    assert llm.llm_engine.kv_cache.prefix_hits > hits_after_first


def test_chunked_prefill_with_tiny_budget_changes_no_token(llama_dir, reference):
    tokens, _ = _generate(llama_dir, max_num_batched_tokens=8, max_num_seqs=4)
    assert tokens == reference


def test_two_sequences_at_a_time_changes_no_token(llama_dir, reference):
    tokens, _ = _generate(llama_dir, max_num_seqs=2)
    assert tokens == reference


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_kv_pressure_preempts_and_changes_no_token(llama_dir, reference, prefix_caching):
    # 8 blocks of 16 = one max-length request; six requests of ~40-90 tokens cannot all fit.
    tokens, engine = _generate(llama_dir, num_gpu_blocks_override=8, enable_prefix_caching=prefix_caching)
    assert engine.scheduler.num_preemptions > 0
    assert tokens == reference


def test_every_request_gets_exactly_max_tokens_with_ignore_eos(llama_dir):
    llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN)
    lengths = [1, 5, 17, 33]
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=n, ignore_eos=True) for i, n in enumerate(lengths)]
    outputs = llm.generate(PROMPTS[:4], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == lengths
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)


def test_outputs_come_back_in_input_order(llama_dir, reference):
    llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, max_num_seqs=1)
    reordered = list(reversed(PROMPTS))
    outputs = llm.generate(reordered, PARAMS, use_tqdm=False)
    assert [o.prompt for o in outputs] == reordered
    assert [o.outputs[0].token_ids for o in outputs] == list(reversed(reference))


def test_step_block_tables_follow_appends_and_replaced_block_lists():
    """StepInputs mirrors each request's block ids incrementally; a preempted request gets a
    new list (new blocks), which the mirror must not mistake for the old one."""
    from types import SimpleNamespace

    import torch

    from fxllm.forward_context import GraphDispatch
    from fxllm.config import CUDAGraphMode
    from fxllm.runtime.step_inputs import StepInputs

    inputs = StepInputs(8, max_num_requests=2, max_blocks_per_seq=4, block_size=2, device=torch.device("cpu"))
    request = SimpleNamespace(num_computed_tokens=2, all_token_ids=[5, 6, 7], block_ids=[4, 9])
    step = [SimpleNamespace(request=request, num_new_tokens=1, samples=True)]
    dispatch = GraphDispatch(CUDAGraphMode.NONE, 1, 1)

    def table() -> list[int]:
        prepared = inputs.prepare(step, dispatch)
        return prepared.metadata.block_tables[0, : prepared.max_blocks].tolist()

    assert table() == [4, 9]
    request.block_ids.append(3)  # the KV manager appends as the context grows
    request.num_computed_tokens, request.all_token_ids = 4, [5, 6, 7, 8, 1]
    assert table() == [4, 9, 3]
    request.block_ids = [7, 2, 8]  # preempted and re-allocated: same length, other blocks
    assert table() == [7, 2, 8]


def test_step_block_tables_follow_requests_that_change_rows():
    """A table row is rewritten when another request takes it (one ahead finished), and
    keeps up when its request's list grows."""
    from types import SimpleNamespace

    import torch

    from fxllm.forward_context import GraphDispatch
    from fxllm.config import CUDAGraphMode
    from fxllm.runtime.step_inputs import StepInputs

    inputs = StepInputs(8, max_num_requests=2, max_blocks_per_seq=4, block_size=2, device=torch.device("cpu"))
    first = SimpleNamespace(num_computed_tokens=2, all_token_ids=[5, 6, 7], block_ids=[4, 9])
    second = SimpleNamespace(num_computed_tokens=1, all_token_ids=[3, 2], block_ids=[6])

    def tables(*requests) -> list[list[int]]:
        step = [SimpleNamespace(request=r, num_new_tokens=1, samples=True) for r in requests]
        prepared = inputs.prepare(step, GraphDispatch(CUDAGraphMode.NONE, len(step), len(step)))
        lengths = [len(r.block_ids) for r in requests]
        return [prepared.metadata.block_tables[row, :n].tolist() for row, n in enumerate(lengths)]

    assert tables(first, second) == [[4, 9], [6]]
    assert tables(second) == [[6]]  # the first finished: the second moved to row 0
    second.block_ids.append(1)
    second.num_computed_tokens, second.all_token_ids = 2, [3, 2, 8]
    assert tables(second, first) == [[6, 1], [4, 9]]
    assert tables(first, second) == [[4, 9], [6, 1]]
