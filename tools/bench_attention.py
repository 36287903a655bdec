"""Decode attention on CUDA: the split (flash-decoding) Triton kernel against references.

For each batch size x context length, all requests decode one token over a paged bf16
cache (scattered blocks). Timed, each the median of triton.testing.do_bench:
- ``split``: the Triton split-decode kernel (+ its reduce), the KV write excluded;
- ``split_graph``: the same replayed from a CUDA graph (do_bench_cudagraph), as the
  engine runs decode steps: no host launch overhead, which dominates at batch 1;
- ``unified``: the Triton unified kernel on the same step (what mixed batches use);
- ``torch``: the torch reference backend (its gathers, masks and SDPA; KV write included);
- ``sdpa``: F.scaled_dot_product_attention on dense contiguous K/V (enable_gqa), the
  floor a paged kernel cannot beat by layout alone.
Bandwidth counts the bytes of K/V read plus q and out, against the H100's
3.0 TB/s measured copy bandwidth. Prints a table and writes JSON.

``--prefill-tokens P`` adds long prefills: one request of P tokens attending causally
over its own cached K/V, the unified kernel against SDPA's causal kernel on dense
K/V, in TFLOP/s (4 * heads * head_dim * P^2 / 2 flops: causal halves the square).
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

import torch
import torch.nn.functional as F

PEAK_BANDWIDTH = 3.0e12  # bytes/s: a device-to-device copy on the H100 here
MICROSECONDS_PER_MILLISECOND = 1e3


WARMUP_MATMULS = 200  # bring the GPU to its working clocks before the first timing
WARMUP_MATMUL_SIZE = 4096


def bench_ms(fn: Callable[[], None], cuda_graph: bool = False) -> float | None:
    """Median milliseconds, or None when the step does not fit in memory."""
    import triton.testing

    try:
        if cuda_graph:
            return triton.testing.do_bench_cudagraph(fn, return_mode="median")
        return triton.testing.do_bench(fn, return_mode="median")
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def warm_up() -> None:
    matrix = torch.randn(WARMUP_MATMUL_SIZE, WARMUP_MATMUL_SIZE, device="cuda", dtype=torch.bfloat16)
    for _ in range(WARMUP_MATMULS):
        matrix @ matrix
    torch.cuda.synchronize()


def run_case(batch: int, context: int, args: argparse.Namespace) -> dict:
    from fxllm.attention import triton_kernels
    from fxllm.attention.layer import AttentionSpec
    from fxllm.attention.torch_backend import TorchAttentionBackend
    from fxllm.forward_context import AttentionMetadata

    device, dtype = torch.device("cuda"), torch.bfloat16
    heads, kv_heads, head_dim, block_size = args.num_heads, args.num_kv_heads, args.head_dim, args.block_size
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    spec = AttentionSpec("layer", heads, kv_heads, head_dim, head_dim**-0.5)
    # Scattered blocks, as a long-running cache would hand them out.
    block_tables = torch.randperm(num_blocks, device=device).view(batch, blocks_per_seq).to(torch.int32)
    kv_cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, device=device, dtype=dtype)
    query = torch.randn(batch, heads, head_dim, device=device, dtype=dtype)  # [B, heads, head_dim]
    key = torch.randn(batch, kv_heads, head_dim, device=device, dtype=dtype)
    value = torch.randn(batch, kv_heads, head_dim, device=device, dtype=dtype)
    out = torch.empty_like(query)
    seq_lens = [context] * batch
    starts = list(range(batch + 1))
    positions = torch.tensor([context - 1] * batch, device=device)
    slot_mapping = block_tables.gather(1, (positions // block_size)[:, None].int()).squeeze(1).long() * block_size
    slot_mapping += positions % block_size
    metadata = AttentionMetadata(
        slot_mapping=slot_mapping,
        block_tables=block_tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens_cpu=seq_lens,
        query_start_loc_cpu=starts,
    )
    # The split count the backend would pick for this shape.
    num_splits = triton_kernels.decode_num_splits(batch, kv_heads, blocks_per_seq, block_size, device)
    scratch = triton_kernels.empty_decode_scratch(batch, heads, head_dim, num_splits, device)
    kernel_args = (
        query, kv_cache[0], kv_cache[1], out, metadata.block_tables, metadata.seq_lens, metadata.query_start_loc,
        spec.scale,
    )  # fmt: skip

    split = lambda: triton_kernels.split_decode_attention(*kernel_args, None, *scratch)  # noqa: E731
    times = {
        "split": bench_ms(split),
        "split_graph": bench_ms(split, cuda_graph=True),
        "unified": bench_ms(lambda: triton_kernels.unified_attention(*kernel_args, None)),
        "torch": bench_ms(lambda: TorchAttentionBackend().forward(spec, query, key, value, out, kv_cache, metadata)),
    }
    # Dense contiguous copies for SDPA: [B, kv_heads, context, head_dim].
    try:
        dense_keys = kv_cache[0][block_tables.long()].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()
        dense_values = kv_cache[1][block_tables.long()].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()
        sdpa_query = query.unsqueeze(2)  # [B, heads, 1, head_dim]
        times["sdpa"] = bench_ms(
            lambda: F.scaled_dot_product_attention(
                sdpa_query, dense_keys, dense_values, scale=spec.scale, enable_gqa=True
            )
        )
        del dense_keys, dense_values
    except torch.OutOfMemoryError:
        times["sdpa"] = None
    del kv_cache
    torch.cuda.empty_cache()

    element = torch.finfo(dtype).bits // 8
    kv_bytes = 2 * batch * context * kv_heads * head_dim * element
    io_bytes = 2 * batch * heads * head_dim * element  # q in, out
    total_bytes = kv_bytes + io_bytes
    row = {"batch": batch, "context": context, "num_splits": num_splits, "bytes": total_bytes}
    for name, ms in times.items():
        row[f"{name}_us"] = None if ms is None else round(ms * MICROSECONDS_PER_MILLISECOND, 2)
        row[f"{name}_bandwidth_fraction"] = None if ms is None else round(total_bytes / (ms / 1e3) / PEAK_BANDWIDTH, 3)
    return row


def run_prefill(tokens: int, args: argparse.Namespace) -> dict:
    from fxllm.attention import triton_kernels

    device, dtype = torch.device("cuda"), torch.bfloat16
    heads, kv_heads, head_dim, block_size = args.num_heads, args.num_kv_heads, args.head_dim, args.block_size
    num_blocks = -(-tokens // block_size)
    scale = head_dim**-0.5
    block_tables = torch.randperm(num_blocks, device=device).view(1, num_blocks).to(torch.int32)
    kv_cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, device=device, dtype=dtype)
    query = torch.randn(tokens, heads, head_dim, device=device, dtype=dtype)
    out = torch.empty_like(query)
    seq_lens = torch.tensor([tokens], dtype=torch.int32, device=device)
    starts = torch.tensor([0, tokens], dtype=torch.int32, device=device)
    unified_ms = bench_ms(
        lambda: triton_kernels.unified_attention(
            query, kv_cache[0], kv_cache[1], out, block_tables, seq_lens, starts, scale, None
        )
    )
    dense = [kv_cache[i][block_tables[0].long()].flatten(0, 1)[:tokens].transpose(0, 1)[None].contiguous() for i in range(2)]
    sdpa_query = query.transpose(0, 1)[None]  # [1, heads, P, head_dim]
    sdpa_ms = bench_ms(
        lambda: F.scaled_dot_product_attention(sdpa_query, *dense, is_causal=True, scale=scale, enable_gqa=True)
    )
    flops = 4 * heads * head_dim * tokens * tokens / 2
    return {
        "prefill_tokens": tokens,
        "unified_ms": unified_ms,
        "unified_tflops": None if unified_ms is None else round(flops / (unified_ms / 1e3) / 1e12, 1),
        "sdpa_ms": sdpa_ms,
        "sdpa_tflops": None if sdpa_ms is None else round(flops / (sdpa_ms / 1e3) / 1e12, 1),
    }


def print_table(rows: list[dict]) -> None:
    names = ["split", "split_graph", "unified", "torch", "sdpa"]

    def cell(value: float | None, width: int) -> str:
        return f"{'-' if value is None else value:>{width}}"

    header = f"{'batch':>5} {'context':>7} {'splits':>6} " + " ".join(f"{n + ' us':>14} {'%peak':>6}" for n in names)
    print(header)
    for row in rows:
        cells = []
        for name in names:
            fraction = row[f"{name}_bandwidth_fraction"]
            percent = None if fraction is None else round(100 * fraction, 1)
            cells.append(cell(row[f"{name}_us"], 14) + " " + cell(percent, 6))
        print(f"{row['batch']:>5} {row['context']:>7} {row['num_splits']:>6} " + " ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--prefill-tokens", type=int, nargs="*", default=[], help="also time causal prefills of these lengths")
    parser.add_argument("--json", default="bench_attention.json", help="where to write the results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention needs a CUDA device: the kernels are timed on the GPU")
    torch.manual_seed(0)
    warm_up()
    rows = [run_case(batch, context, args) for batch in args.batch_sizes for context in args.contexts]
    print_table(rows)
    prefills = [run_prefill(tokens, args) for tokens in args.prefill_tokens]
    for prefill in prefills:
        print(f"prefill {prefill['prefill_tokens']} tokens: unified {prefill['unified_tflops']} TFLOP/s, "
              f"SDPA causal {prefill['sdpa_tflops']} TFLOP/s")
    with open(args.json, "w") as handle:
        json.dump(
            {
                "device": torch.cuda.get_device_name(),
                "dtype": "bfloat16",
                "num_heads": args.num_heads,
                "num_kv_heads": args.num_kv_heads,
                "head_dim": args.head_dim,
                "block_size": args.block_size,
                "peak_bandwidth_bytes_per_s": PEAK_BANDWIDTH,
                "rows": rows,
                "prefills": prefills,
            },
            handle,
            indent=2,
        )


if __name__ == "__main__":
    main()
