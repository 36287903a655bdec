"""The Triton attention kernels and backend against the torch reference backend.

Without CUDA the kernels run under Triton's interpreter on small CPU tensors; the
``gpu`` tests repeat the checks at real shapes on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

# Without CUDA, tests/conftest.py has switched Triton to its interpreter.
from fxllm.attention import triton_kernels
from fxllm.attention.layer import AttentionSpec
from fxllm.attention.torch_backend import TorchAttentionBackend, write_kv_cache
from fxllm.attention.triton_backend import TritonAttentionBackend
from fxllm.forward_context import AttentionMetadata

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOLERANCE = 1e-5
BF16_RELATIVE_ERROR = 1e-2


@dataclass
class Step:
    """One engine step: a paged cache holding each request's prefix, and this step's tokens."""

    spec: AttentionSpec
    query: torch.Tensor  # [T, num_heads, head_dim]
    key: torch.Tensor  # [T, num_kv_heads, head_dim]
    value: torch.Tensor  # [T, num_kv_heads, head_dim]
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_dim], prefixes written
    metadata: AttentionMetadata
    num_real_tokens: int  # tokens past this are padding (slot -1, in no request)


def make_step(
    cached_lens: list[int],
    query_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    num_padding_tokens: int = 0,
    sliding_window: int | None = None,
    seed: int = 0,
) -> Step:
    """Requests with ``cached_lens[i]`` keys already in the cache and ``query_lens[i]`` new
    tokens; blocks are scattered at random and every unused slot holds NaN."""
    generator = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(cached_lens, query_lens)]
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(max(blocks_per_seq), 1)
    num_blocks = sum(blocks_per_seq) + 3  # a few never used: must never be read
    permutation = torch.randperm(num_blocks, generator=generator).tolist()
    tables, next_block = [], 0
    for count in blocks_per_seq:
        row = permutation[next_block : next_block + count]
        next_block += count
        tables.append(row + [0] * (max_blocks - count))  # 0 pads the table, as the runner does
    kv_cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)

    def slot(request: int, position: int) -> int:
        return tables[request][position // block_size] * block_size + position % block_size

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    for i, cached in enumerate(cached_lens):  # the prefix computed by earlier steps
        if cached:
            slots = torch.tensor([slot(i, p) for p in range(cached)])
            keys, values = randn(cached, num_kv_heads, head_dim), randn(cached, num_kv_heads, head_dim)
            write_kv_cache(kv_cache, keys, values, slots)
    slots, starts = [], [0]
    for i, (cached, new) in enumerate(zip(cached_lens, query_lens)):
        slots += [slot(i, p) for p in range(cached, cached + new)]
        starts.append(starts[-1] + new)
    slots += [-1] * num_padding_tokens
    num_tokens = len(slots)
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        seq_lens_cpu=seq_lens,
        query_start_loc_cpu=starts,
    )
    spec = AttentionSpec("layer", num_heads, num_kv_heads, head_dim, head_dim**-0.5, sliding_window)
    return Step(
        spec=spec,
        query=randn(num_tokens, num_heads, head_dim).to(DEVICE),
        key=randn(num_tokens, num_kv_heads, head_dim).to(DEVICE),
        value=randn(num_tokens, num_kv_heads, head_dim).to(DEVICE),
        kv_cache=kv_cache.to(DEVICE),
        metadata=metadata,
        num_real_tokens=starts[-1],
    )


def reference(step: Step) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, kv_cache after the step) from the torch backend, computed in fp32."""
    kv_cache = step.kv_cache.float().clone()
    out = torch.zeros(step.query.shape, dtype=torch.float32, device=step.query.device)
    query, key, value = step.query.float(), step.key.float(), step.value.float()
    TorchAttentionBackend().forward(step.spec, query, key, value, out, kv_cache, step.metadata)
    return out, kv_cache


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected).norm() / expected.norm()).item()


def assert_matches(got: torch.Tensor, expected: torch.Tensor) -> None:
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=FP32_TOLERANCE, atol=FP32_TOLERANCE)
    else:  # bf16 and fp16 (whose smaller error bf16's bound covers)
        assert relative_error(got, expected) <= BF16_RELATIVE_ERROR


def run_backend(step: Step) -> tuple[torch.Tensor, torch.Tensor]:
    kv_cache = step.kv_cache.clone()
    out = torch.zeros_like(step.query)
    TritonAttentionBackend().forward(step.spec, step.query, step.key, step.value, out, kv_cache, step.metadata)
    return out, kv_cache


def check_backend(step: Step) -> None:
    out, kv_cache = run_backend(step)
    expected_out, expected_cache = reference(step)
    real = step.num_real_tokens
    assert_matches(out[:real], expected_out[:real])
    # The cache holds exactly the reference's writes: padding slots wrote nothing.
    torch.testing.assert_close(kv_cache.float(), expected_cache, rtol=0, atol=0, equal_nan=True)


DTYPES = [torch.float32, torch.bfloat16]
# (num_heads, num_kv_heads): GQA ratios 1, 2, 4 and an odd 3.
HEAD_LAYOUTS = [(2, 2), (4, 2), (8, 2), (3, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kv_cache_write_fills_slots_and_skips_padding(dtype):
    step = make_step([5, 0], [3, 9], 4, 2, 16, block_size=4, dtype=dtype, num_padding_tokens=3)
    kv_cache = step.kv_cache.clone()
    expected = step.kv_cache.clone()
    triton_kernels.write_kv_cache(step.key, step.value, kv_cache[0], kv_cache[1], step.metadata.slot_mapping)
    write_kv_cache(expected, step.key, step.value, step.metadata.slot_mapping)
    torch.testing.assert_close(kv_cache, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_heads, num_kv_heads", HEAD_LAYOUTS)
def test_mixed_batch_of_prefill_chunks_on_cached_prefixes_and_decodes(num_heads, num_kv_heads, dtype):
    """A fresh prompt longer than one query tile, a chunk on a cached prefix, decodes;
    contexts crossing block and KV-tile boundaries; a request with no tokens; padding."""
    step = make_step(
        cached_lens=[0, 61, 100, 7, 0],
        query_lens=[70, 20, 1, 1, 0],
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=16,
        block_size=4,
        dtype=dtype,
        num_padding_tokens=2,
    )
    check_backend(step)


@pytest.mark.parametrize("head_dim", [8, 24, 64])
def test_unified_kernel_masks_head_dims_that_are_not_a_tile(head_dim):
    check_backend(make_step([9, 0], [6, 11], 4, 2, head_dim, block_size=8, dtype=torch.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_heads, num_kv_heads", HEAD_LAYOUTS)
def test_decode_batch_takes_the_split_path_and_matches(num_heads, num_kv_heads, dtype):
    # T == B: every request has one token; contexts from one key to several tiles.
    step = make_step([0, 4, 69, 130], [1, 1, 1, 1], num_heads, num_kv_heads, 16, block_size=4, dtype=dtype)
    check_backend(step)


@pytest.mark.parametrize("query_lens", [[1, 1, 1], [25, 1, 3]], ids=["decode", "mixed"])
def test_fp16_matches(query_lens):
    check_backend(make_step([0, 17, 50], query_lens, 4, 2, 32, block_size=8, dtype=torch.float16))


@pytest.mark.parametrize("write", ["separate", "in_kernel"])
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_split_decode_merges_any_number_of_splits(num_splits, write):
    """More splits than a short context has tiles leaves idle programs the reduce skips;
    whichever split holds the new token caches it when the kernel writes the K/V."""
    step = make_step([0, 31, 200], [1, 1, 1], 4, 2, 16, block_size=16, dtype=torch.float32)
    kv_cache = step.kv_cache.clone()
    key_cache, value_cache = kv_cache[0], kv_cache[1]
    metadata = step.metadata
    new_kv = None
    if write == "separate":
        triton_kernels.write_kv_cache(step.key, step.value, key_cache, value_cache, metadata.slot_mapping)
    else:
        new_kv = (step.key, step.value, metadata.slot_mapping)
    scratch = triton_kernels.empty_decode_scratch(3, 4, 16, num_splits, DEVICE)
    out = torch.zeros_like(step.query)
    triton_kernels.split_decode_attention(
        step.query, key_cache, value_cache, out, metadata.block_tables, metadata.seq_lens,
        metadata.query_start_loc, step.spec.scale, None, *scratch, new_kv=new_kv,
    )  # fmt: skip
    expected_out, expected_cache = reference(step)
    assert_matches(out, expected_out)
    torch.testing.assert_close(kv_cache, expected_cache, rtol=0, atol=0, equal_nan=True)


def test_a_decode_step_caches_its_keys_inside_the_attention_kernel(monkeypatch):
    """Decode steps launch no separate KV-write kernel, and a padding request (slot -1)
    writes nothing."""

    def no_write(*args):
        raise AssertionError("a decode step launched the separate KV-write kernel")

    monkeypatch.setattr(triton_kernels, "write_kv_cache", no_write)
    step = make_step([0, 4, 69, 130], [1, 1, 1, 1], 4, 2, 16, block_size=4, dtype=torch.bfloat16)
    step.metadata.slot_mapping[2] = -1  # request 2 as a padded graph row: its slot keeps its NaN
    out, kv_cache = run_backend(step)
    expected_out, expected_cache = reference(step)
    torch.testing.assert_close(kv_cache.float(), expected_cache, rtol=0, atol=0, equal_nan=True)
    others = [0, 1, 3]  # request 2 attends to its unwritten slot (NaN), here as in the reference
    assert_matches(out[others], expected_out[others])


@pytest.mark.parametrize("window", [1, 5, 40])
def test_sliding_window_hides_keys_older_than_the_window(window):
    prefill = make_step([0, 70], [45, 9], 4, 2, 16, block_size=4, dtype=torch.float32, sliding_window=window)
    check_backend(prefill)
    decode = make_step([3, 70, 101], [1, 1, 1], 4, 2, 16, block_size=4, dtype=torch.float32, sliding_window=window)
    check_backend(decode)


def test_decode_splits_come_from_shapes_and_stay_within_bounds():
    device = torch.device("cpu")
    wide = triton_kernels.decode_num_splits(1, 1, max_blocks_per_seq=4096, block_size=16, device=device)
    assert 1 < wide <= triton_kernels.MAX_DECODE_SPLITS
    # A context of at most one tile is never split.
    assert triton_kernels.decode_num_splits(1, 1, max_blocks_per_seq=2, block_size=16, device=device) == 1
    # A batch that alone fills the device is not split.
    assert triton_kernels.decode_num_splits(256, 8, max_blocks_per_seq=512, block_size=16, device=device) == 1


def test_head_dim_beyond_the_supported_range_is_rejected():
    with pytest.raises(ValueError, match="head_dim"):
        triton_kernels.padded_head_dim(triton_kernels.MAX_HEAD_DIM * 2)


# ---------------------------------------------------------------------------------------
# Real shapes on the GPU
# ---------------------------------------------------------------------------------------

GPU_HEADS, GPU_KV_HEADS, GPU_HEAD_DIM, GPU_BLOCK = 32, 8, 128, 16
GPU_BATCH, GPU_MAX_CONTEXT = 32, 4096


def _random_lengths(count: int, low: int, high: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (count,), generator=generator).tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("sliding_window", [None, 1024])
def test_gpu_bf16_decode_batch_at_real_shapes(sliding_window):
    contexts = _random_lengths(GPU_BATCH, 1, GPU_MAX_CONTEXT, seed=1)
    contexts[0] = GPU_MAX_CONTEXT
    step = make_step(
        [c - 1 for c in contexts], [1] * GPU_BATCH, GPU_HEADS, GPU_KV_HEADS, GPU_HEAD_DIM, GPU_BLOCK,
        torch.bfloat16, sliding_window=sliding_window,
    )  # fmt: skip
    check_backend(step)


@pytest.mark.gpu
def test_gpu_bf16_mixed_batch_at_real_shapes():
    # Four prefill chunks of 512 on cached prefixes, the rest decodes.
    cached = _random_lengths(GPU_BATCH, 0, GPU_MAX_CONTEXT - 512, seed=2)
    query_lens = [512] * 4 + [1] * (GPU_BATCH - 4)
    step = make_step(
        cached, query_lens, GPU_HEADS, GPU_KV_HEADS, GPU_HEAD_DIM, GPU_BLOCK, torch.bfloat16, num_padding_tokens=5
    )
    check_backend(step)


@pytest.mark.gpu
@pytest.mark.parametrize("query_lens", [[1] * 8, [300, 1, 77, 1]], ids=["decode", "mixed"])
def test_gpu_fp32_matches_tightly(query_lens):
    cached = _random_lengths(len(query_lens), 0, 1500, seed=3)
    check_backend(make_step(cached, query_lens, GPU_HEADS, GPU_KV_HEADS, GPU_HEAD_DIM, GPU_BLOCK, torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 256, 80])
@pytest.mark.parametrize("query_lens", [[1] * 6, [200, 1, 33, 1, 1, 1]], ids=["decode", "mixed"])
def test_gpu_every_head_dim_and_dtype_compiles_and_matches(query_lens, head_dim, dtype):
    cached = _random_lengths(len(query_lens), 0, 1000, seed=6)
    check_backend(make_step(cached, query_lens, 8, 2, head_dim, GPU_BLOCK, dtype))


@pytest.mark.gpu
def test_gpu_decode_replays_in_a_cuda_graph_with_new_metadata():
    """Captured once, replayed after the metadata tensors are refilled in place: the
    kernels read everything per step from the device."""
    shape = (GPU_HEADS, GPU_KV_HEADS, GPU_HEAD_DIM, GPU_BLOCK, torch.bfloat16)
    first = make_step([100] * 4, [1] * 4, *shape, seed=4)
    second = make_step([3, 700, 64, 1999], [1] * 4, *shape, seed=5)
    backend = TritonAttentionBackend()
    # Static buffers sized for the larger second step (the first one's block ids fit in
    # its cache); the first step's tables are padded to the second's width.
    kv_cache = torch.zeros_like(second.kv_cache)
    width = second.metadata.block_tables.shape[1]
    metadata = AttentionMetadata(
        slot_mapping=first.metadata.slot_mapping.clone(),
        block_tables=F.pad(first.metadata.block_tables, (0, width - first.metadata.block_tables.shape[1])),
        seq_lens=first.metadata.seq_lens.clone(),
        query_start_loc=first.metadata.query_start_loc.clone(),
        seq_lens_cpu=[],  # the backend never reads the host lists
        query_start_loc_cpu=[],
    )
    query, key, value = first.query.clone(), first.key.clone(), first.value.clone()
    out = torch.zeros_like(query)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # warm up (compiles the kernels) off the capture
        backend.forward(first.spec, query, key, value, out, kv_cache, metadata)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        backend.forward(first.spec, query, key, value, out, kv_cache, metadata)
    kv_cache.copy_(second.kv_cache)
    for name in ("slot_mapping", "block_tables", "seq_lens", "query_start_loc"):
        getattr(metadata, name).copy_(getattr(second.metadata, name))
    query.copy_(second.query)
    key.copy_(second.key)
    value.copy_(second.value)
    graph.replay()
    torch.cuda.synchronize()
    assert relative_error(out, reference(second)[0]) <= BF16_RELATIVE_ERROR


@pytest.mark.parametrize("arch", ["llama", "qwen2_vl"])
def test_start_up_runs_one_step_shaped_like_prompt_chunks(arch, tiny_model_dirs, tmp_path, monkeypatch):
    """With a backend that compiles on first use (Triton), the engine's start-up ends with a
    warm-up step of prompt-shaped requests (on token embeddings for a vision-language
    model) that writes no KV; the engine then serves as before. On a CPU the kernels run
    under the interpreter."""
    import fxllm.runtime.runner as runner_module
    from fxllm import LLM, SamplingParams
    from fxllm.runtime.runner import WARM_UP_REQUESTS, WARM_UP_TOKENS_PER_REQUEST
    from tests.tiny_vl_models import save_tiny_vl_model

    model_dir = tiny_model_dirs[arch] if arch in tiny_model_dirs else save_tiny_vl_model(arch, tmp_path / arch)
    monkeypatch.setattr(runner_module, "select_attention_backend", lambda device: TritonAttentionBackend())
    launched, real_unified = [], triton_kernels.unified_attention

    def unified_attention(query, *args, **kwargs):
        launched.append(query.shape[0])
        return real_unified(query, *args, **kwargs)

    monkeypatch.setattr(triton_kernels, "unified_attention", unified_attention)
    llm = LLM(model=str(model_dir), enforce_eager=True, max_model_len=64, dtype="float32")
    num_layers = len(llm.llm_engine.runner.layers)
    assert launched == [WARM_UP_REQUESTS * WARM_UP_TOKENS_PER_REQUEST] * num_layers
    (output,) = llm.generate({"prompt_token_ids": [5, 6, 7, 8]}, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert len(output.outputs[0].token_ids) == 2
