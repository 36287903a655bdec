"""INT4 / INT8 weight-only GEMMs against bf16, per step size, on the linear layers of a named shape (GPU).

For each layer (fused qkv, o, fused gate/up, down) and each row count M: bf16 ``F.linear``
and fxllm's Triton kernel as the engine picks it (GEMV at M=1, split-K dot tiles up to 16
rows, tiled GEMM above), on random packed weights (GPTQ-style symmetric, ``--group-size``).
Each is replayed from a CUDA graph, so launch overhead does not hide the kernels. The last
lines sum a decoder layer's four GEMMs per M: the decode speed-up to expect from the GEMMs.

    python tools/bench_int_gemm.py --shape llama-3-8b
    python tools/bench_int_gemm.py --shape llama-3-8b --bits 8 --group-size -1
    python tools/bench_int_gemm.py --shape llama-3-8b --sweep-gemv

``--sweep-gemv`` times the GEMV kernel's launch tiles instead (M=1), with weights streaming
from HBM as in a decode step (each timed graph cycles through more weight copies than L2
holds): the candidates for ``DEFAULT_GEMV_TILE``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import random_model  # noqa: E402  (tools/ is not a package)
from bench_fp8_gemm import calls_us, graph_us, layer_shapes  # noqa: E402

DEFAULT_ROWS = (1, 4, 16, 32, 64, 128, 256)
STREAM_BYTES = 400 << 20  # weight bytes cycled per timed graph: several times an H200's L2
SWEEP_TILES = [
    (block_n, block_k, warps, stages)
    for block_n in (2, 4, 8, 16)
    for block_k in (256, 512, 1024, 2048)
    for warps in (4, 8)
    for stages in (2, 3)
]
SWEEP_SHOWN = 5


def random_layer(out_features: int, in_features: int, bits: int, group_size: int):
    """Random packed weights [N, K / pack], float16 scales [groups, N] (symmetric: no zeros)."""
    group = in_features if group_size == -1 else group_size
    per_word = 32 // bits
    qweight = torch.randint(-2**31, 2**31 - 1, (out_features, in_features // per_word), dtype=torch.int32, device="cuda")
    scales = (torch.rand(-(-in_features // group), out_features, device="cuda") * 0.002).half()
    return qweight, scales, group


def sweep_gemv(shape: str, bits: int, group_size: int) -> dict:
    from fxllm.models.quantization.int_gemm import counters_needed
    from fxllm.models.quantization.int_triton import DEFAULT_GEMV_TILE, GemvTile, int_weight_gemm

    times: dict[tuple, dict[str, float]] = {}
    default = {}
    for layer, (out_features, in_features) in layer_shapes(random_model.SHAPES[shape]).items():
        copies = max(2, STREAM_BYTES // (out_features * in_features * bits // 8))
        layers = [random_layer(out_features, in_features, bits, group_size) for _ in range(copies)]
        x = torch.randn(1, in_features, device="cuda", dtype=torch.bfloat16)
        counters = torch.zeros(counters_needed(out_features), dtype=torch.int32, device="cuda")
        for tile in [*SWEEP_TILES, None]:
            chosen = DEFAULT_GEMV_TILE if tile is None else GemvTile(*tile)

            def call(weights, chosen=chosen):
                qweight, scales, group = weights
                int_weight_gemm(x, qweight, scales, None, None, counters, bits, group, gemv=True, gemv_tile=chosen)

            us = calls_us(call, layers)
            if tile is None:
                default[layer] = us
            else:
                times.setdefault(tile, {})[layer] = us
        fastest = sorted(times, key=lambda t: times[t][layer])[:SWEEP_SHOWN]
        gb_s = out_features * in_features * bits / 8 / 1e3
        print(f"{layer:<8} default {default[layer]:.2f} µs ({gb_s / default[layer]:.0f} GB/s); fastest: "
              + ", ".join(f"{t} {times[t][layer]:.2f}" for t in fastest))
        del layers
    ranked = sorted(times, key=lambda t: sum(times[t].values()))
    print(f"\nthe layer's GEMVs summed: default {DEFAULT_GEMV_TILE} {sum(default.values()):.2f} µs; "
          f"fastest (block_n, block_k, warps, stages):")
    for tile in ranked[:SWEEP_SHOWN]:
        print(f"  {tile} {sum(times[tile].values()):.2f} µs")
    return {"default": default, "tiles": [{"tile": list(t), "us": times[t]} for t in ranked]}


def main() -> None:
    from fxllm.models.quantization.int_gemm import counters_needed
    from fxllm.models.quantization.int_triton import int_weight_gemm

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(random_model.SHAPES), default="llama-3-8b")
    parser.add_argument("--rows", type=int, nargs="+", default=list(DEFAULT_ROWS), help="step sizes M")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4)
    parser.add_argument("--group-size", type=int, default=128, help="-1: one scale per output channel")
    parser.add_argument("--sweep-gemv", action="store_true", help="time the GEMV kernel's tiles instead (see above)")
    parser.add_argument("--json", default="bench_int_gemm.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU")
    torch.manual_seed(0)
    device_name = torch.cuda.get_device_name()
    if args.sweep_gemv:
        print(f"{device_name}, shape {args.shape}, INT{args.bits} g{args.group_size} GEMV µs per call, streaming")
        result = sweep_gemv(args.shape, args.bits, args.group_size)
        Path(args.json).write_text(json.dumps({"device": device_name, **result}, indent=2) + "\n")
        return
    rows = []
    for layer, (out_features, in_features) in layer_shapes(random_model.SHAPES[args.shape]).items():
        weight_bf16 = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * 0.02
        qweight, scales, group = random_layer(out_features, in_features, args.bits, args.group_size)
        counters = torch.zeros(counters_needed(out_features), dtype=torch.int32, device="cuda")
        for m in args.rows:
            x = torch.randn(m, in_features, device="cuda", dtype=torch.bfloat16)
            rows.append({
                "layer": layer, "out": out_features, "in": in_features, "m": m,
                "bf16_us": graph_us(lambda: F.linear(x, weight_bf16)),
                "int_us": graph_us(lambda: int_weight_gemm(x, qweight, scales, None, None, counters, args.bits, group)),
            })
    print(f"{device_name}, shape {args.shape}, INT{args.bits} group {args.group_size}, µs per GEMM (CUDA-graph replay)")
    print(f"{'layer':<8} {'M':>5} {'bf16':>8} {'int':>8} {'speed-up':>8}  {'weight GB/s (int)':>17}")
    for row in rows:
        gb_s = row["out"] * row["in"] * args.bits / 8 / (row["int_us"] * 1e3)
        print(f"{row['layer']:<8} {row['m']:>5} {row['bf16_us']:>8.1f} {row['int_us']:>8.1f} "
              f"{row['bf16_us'] / row['int_us']:>8.2f}  {gb_s:>17.0f}")
    print(f"\n{'M':>5} {'layer bf16':>11} {'int':>8} {'speed-up':>8}  (µs, the four GEMMs of a decoder layer)")
    for m in sorted(args.rows):
        bf16 = sum(r["bf16_us"] for r in rows if r["m"] == m)
        quantized = sum(r["int_us"] for r in rows if r["m"] == m)
        print(f"{m:>5} {bf16:>11.1f} {quantized:>8.1f} {bf16 / quantized:>8.2f}")
    Path(args.json).write_text(json.dumps({"device": device_name, "bits": args.bits, "group_size": args.group_size,
                                           "rows": rows}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
