"""CUDA-graph planning and step padding, checked without a GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fxllm.forward_context import GraphDispatch
from fxllm.runtime.cudagraph_dispatch import CUDAGraphPlan, default_capture_sizes, padded_size
from fxllm.config import (
    CacheConfig,
    CompilationConfig,
    CUDAGraphMode,
    EngineConfig,
    SchedulerConfig,
)
from fxllm.attention.layer import AttentionSpec
from fxllm.attention.torch_backend import TorchAttentionBackend
from fxllm.runtime.step_inputs import PADDING_SLOT, StepInputs


def test_default_capture_sizes_follow_vllm():
    sizes = default_capture_sizes(max_num_seqs=256)
    assert sizes[:4] == (1, 2, 4, 8)
    assert sizes == (1, 2, 4, *range(8, 256, 8), *range(256, 513, 16))
    assert default_capture_sizes(max_num_seqs=64)[-1] == 128  # 2 x max_num_seqs
    assert default_capture_sizes(max_num_seqs=2) == (1, 2, 4)


def test_padded_size_is_the_next_capture_size():
    sizes = (1, 2, 4, 8, 16)
    assert [padded_size(sizes, n) for n in (1, 3, 4, 5, 16, 17)] == [1, 4, 4, 8, 16, None]


def _config(mode=None, level=3, sizes=None, device="cuda", max_num_seqs=8, max_tokens=32) -> EngineConfig:
    model = SimpleNamespace(max_model_len=64)  # only the scheduler/compilation fields are read
    compilation = CompilationConfig(level=level, cudagraph_mode=mode, cudagraph_capture_sizes=sizes)
    return EngineConfig(
        model=model,  # type: ignore[arg-type]
        cache=CacheConfig(),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_tokens),
        device=torch.device(device),
        compilation=compilation,
    )


def test_plan_defaults_to_full_and_piecewise_on_cuda_at_level_3():
    plan = CUDAGraphPlan.resolve(_config())
    assert plan.mode is CUDAGraphMode.FULL_AND_PIECEWISE
    assert plan.piecewise_sizes == (1, 2, 4, 8, 16)  # default list up to 2 x max_num_seqs
    assert plan.full_sizes == (1, 2, 4, 8)  # a decode-only step has at most max_num_seqs tokens


def test_plan_is_off_on_cpu_and_with_enforce_eager():
    assert not CUDAGraphPlan.resolve(_config(device="cpu")).enabled
    eager = _config()
    eager = EngineConfig(eager.model, eager.cache, eager.scheduler, eager.device, eager.compilation.eager())
    assert CUDAGraphPlan.resolve(eager).mode is CUDAGraphMode.NONE


def test_plan_uses_full_graphs_below_level_3_and_rejects_piecewise_there():
    assert CUDAGraphPlan.resolve(_config(level=0)).mode is CUDAGraphMode.FULL
    with pytest.raises(ValueError, match="level 3"):
        CUDAGraphPlan.resolve(_config(mode="PIECEWISE", level=2))


def test_capture_sizes_above_the_token_budget_are_dropped():
    plan = CUDAGraphPlan.resolve(_config(sizes=[1, 8, 64], max_tokens=32))
    assert plan.piecewise_sizes == (1, 8)


@pytest.mark.parametrize(
    "mode, tokens, requests, expected",
    [
        ("FULL_AND_PIECEWISE", 3, 3, GraphDispatch(CUDAGraphMode.FULL, 4, 4)),  # decode-only: padded requests
        ("FULL_AND_PIECEWISE", 8, 8, GraphDispatch(CUDAGraphMode.FULL, 8, 8)),  # on the list
        ("FULL_AND_PIECEWISE", 7, 2, GraphDispatch(CUDAGraphMode.PIECEWISE, 8, 2)),  # mixed: padded tokens
        ("FULL_AND_PIECEWISE", 20, 2, GraphDispatch(CUDAGraphMode.NONE, 20, 2)),  # above the largest size
        ("FULL", 7, 2, GraphDispatch(CUDAGraphMode.NONE, 7, 2)),  # FULL graphs serve decode-only steps
        ("PIECEWISE", 3, 3, GraphDispatch(CUDAGraphMode.PIECEWISE, 4, 4)),
        ("NONE", 3, 3, GraphDispatch(CUDAGraphMode.NONE, 3, 3)),
    ],
)
def test_dispatch_picks_mode_and_padding(mode, tokens, requests, expected):
    plan = CUDAGraphPlan.resolve(_config(mode=mode, sizes=[1, 2, 4, 8, 16]))
    assert plan.dispatch(tokens, requests) == expected


class _FakeRequest(SimpleNamespace):
    __hash__ = object.__hash__  # a dict key, as requests are


def _scheduled(computed: int, new: int, tokens: list[int], blocks: list[int], samples: bool = True):
    request = _FakeRequest(num_computed_tokens=computed, all_token_ids=tokens, block_ids=blocks)
    return SimpleNamespace(request=request, num_new_tokens=new, samples=samples)


BLOCK = 4


def _inputs() -> StepInputs:
    return StepInputs(max_num_tokens=32, max_num_requests=8, max_blocks_per_seq=4, block_size=BLOCK, device=torch.device("cpu"))


def test_mixed_step_pads_tokens_with_slot_minus_one():
    step = [
        _scheduled(0, 5, [10, 11, 12, 13, 14], [3, 1]),  # a prefill of 5 tokens in blocks 3, 1
        _scheduled(6, 1, [20] * 7, [2, 0]),  # a decode at position 6
    ]
    prepared = _inputs().prepare(step, GraphDispatch(CUDAGraphMode.PIECEWISE, 8, 2))
    assert prepared.num_tokens == 6
    assert prepared.input_ids.tolist() == [10, 11, 12, 13, 14, 20, 0, 0]
    assert prepared.positions.tolist() == [0, 1, 2, 3, 4, 6, 0, 0]
    expected_slots = [12, 13, 14, 15, 4, 0 * BLOCK + 2]
    assert prepared.metadata.slot_mapping.tolist() == expected_slots + [PADDING_SLOT] * 2
    assert prepared.metadata.query_start_loc.tolist() == [0, 5, 6]
    assert prepared.metadata.seq_lens.tolist() == [5, 7]
    assert prepared.sample_rows.tolist() == [4, 5]


def test_a_pending_input_token_is_taken_from_the_previous_steps_sampled_ids():
    """Async scheduling: the host has not seen the token a decode takes as input; the step's
    input ids get it from the device, at the request's row in the last step's samples."""
    step = [
        _scheduled(6, 1, [20] * 6, [2, 0]),  # its 7th token is in flight
        _scheduled(0, 3, [7, 8, 9], [1]),  # a prefill, all on the host
        _scheduled(3, 1, [30, 31, 32], [3]),
    ]
    inputs = _inputs()
    pending_rows = {step[0].request: 2, step[2].request: 0}
    prepared = inputs.prepare(step, GraphDispatch(CUDAGraphMode.PIECEWISE, 8, 3), pending_rows)
    assert prepared.num_pending == 2
    inputs.fill_pending(prepared, torch.tensor([55, 66, 77]))
    assert prepared.input_ids.tolist() == [77, 7, 8, 9, 55, 0, 0, 0]
    assert prepared.positions.tolist() == [6, 0, 1, 2, 3, 0, 0, 0]


def test_decode_step_pads_with_empty_requests():
    step = [_scheduled(4, 1, [1, 2, 3, 4, 5], [0, 2]), _scheduled(1, 1, [7, 8], [1]), _scheduled(2, 1, [9] * 3, [3])]
    prepared = _inputs().prepare(step, GraphDispatch(CUDAGraphMode.FULL, 4, 4))
    metadata = prepared.metadata
    assert metadata.seq_lens.tolist() == [5, 2, 3, 0]  # the empty request attends to nothing
    assert metadata.query_start_loc.tolist() == [0, 1, 2, 3, 4]  # one token per request, padding included
    assert metadata.slot_mapping.tolist() == [2 * BLOCK + 0, 1 * BLOCK + 1, 3 * BLOCK + 2, PADDING_SLOT]
    assert metadata.block_tables.shape == (4, 4)  # full width whatever the step's contexts
    assert prepared.sample_rows.tolist() == [0, 1, 2]


def test_padded_rows_change_neither_real_outputs_nor_the_kv_cache():
    """Attention over a padded decode step: real rows equal the unpadded step's, and the
    KV cache is written only at real slots."""
    torch.manual_seed(0)
    spec = AttentionSpec("layer", num_heads=4, num_kv_heads=2, head_dim=8, scale=0.3)
    step = [_scheduled(4, 1, [1] * 5, [0, 2]), _scheduled(2, 1, [1] * 3, [1])]
    cache = torch.randn(2, 4, BLOCK, 2, 8)
    padded_qkv = [torch.randn(4, heads, 8) for heads in (4, 2, 2)]
    results = []
    for dispatch in (GraphDispatch(CUDAGraphMode.NONE, 2, 2), GraphDispatch(CUDAGraphMode.FULL, 4, 4)):
        size = dispatch.num_tokens
        query, key, value = (t[:size] for t in padded_qkv)
        out = torch.zeros(size, 4, 8)
        kv_cache = cache.clone()
        metadata = _inputs().prepare(step, dispatch).metadata
        TorchAttentionBackend().forward(spec, query, key, value, out, kv_cache, metadata)
        results.append((out[:2], kv_cache))
    (unpadded_out, unpadded_cache), (padded_out, padded_cache) = results
    torch.testing.assert_close(padded_out, unpadded_out, rtol=0, atol=0)
    torch.testing.assert_close(padded_cache, unpadded_cache, rtol=0, atol=0)
