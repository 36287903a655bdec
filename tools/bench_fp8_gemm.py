"""FP8 GEMM paths against bf16, per step size, on the linear layers of a named shape (GPU).

For each layer (fused qkv, o, fused gate/up, down) and each row count M, the time of:
bf16 ``F.linear``; WEIGHT_ONLY (the Triton kernels that dequantize FP8 weights in
registers, as the engine picks them; at M=1 also the GEMV kernel); W8A8 (per-token
activation quantization + ``torch._scaled_mm``). Each is replayed from a CUDA graph, so
launch overhead does not hide the kernels. The last lines give, per M, a decoder
layer's four GEMMs summed, and the largest M for which WEIGHT_ONLY beats W8A8: the
value ``WEIGHT_ONLY_MAX_TOKENS`` should take on this card.

    python tools/bench_fp8_gemm.py --shape llama-3-8b
    python tools/bench_fp8_gemm.py --shape llama-3-8b --sweep-gemv

``--sweep-gemv`` times the GEMV kernel's launch tiles instead, per layer, with weights
streaming from HBM as in a decode step: each timed graph cycles through more copies of
the weight than L2 holds (one layer's weights alone would stay in L2 and flatter wide
tiles less). It lists each layer's fastest tiles and the tiles fastest over the whole
layer: the candidates for ``DEFAULT_GEMV_TILE``.
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

DEFAULT_ROWS = (1, 4, 16, 32, 64, 128, 256)
REPLAYS_PER_GRAPH = 20  # calls captured into one graph, so one replay times many kernels
TIMED_REPLAYS = 10
WEIGHT_STD = 0.02


def layer_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """[out, in] of the fused linear layers of one decoder layer."""
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q = config["num_attention_heads"] * head_dim
    kv = config["num_key_value_heads"] * head_dim
    intermediate = config["intermediate_size"]
    return {"qkv": (q + 2 * kv, hidden), "o": (hidden, q), "gate_up": (2 * intermediate, hidden), "down": (hidden, intermediate)}


def graph_us(fn) -> float:
    """Mean µs of one ``fn()``, replayed from a CUDA graph of REPLAYS_PER_GRAPH calls."""
    return calls_us(lambda _: fn(), [None] * REPLAYS_PER_GRAPH)


def calls_us(fn, args: list) -> float:
    """Mean µs of one ``fn(arg)``, replayed from a CUDA graph that calls it once per arg."""
    fn(args[0])  # compiles (and autotunes) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for arg in args:
            fn(arg)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(TIMED_REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (TIMED_REPLAYS * len(args))


STREAM_BYTES = 400 << 20  # weight copies cycled per timed graph: several times the H100's 50 MB L2
SWEEP_TILES = [
    (block_n, block_k, warps, stages)
    for block_n in (2, 4, 8, 16)
    for block_k in (512, 1024, 2048)
    for warps in (4, 8)
    for stages in (1, 3)
    if block_n * block_k <= 16384  # float32 registers per thread stay moderate
]
SWEEP_SHOWN = 5


def sweep_gemv(shape: str) -> dict:
    from fxllm.models.quantization.fp8_quant import quantize_per_channel
    from fxllm.models.quantization.fp8_triton import DEFAULT_GEMV_TILE, GemvTile, _fp8_gemv

    times: dict[tuple, dict[str, float]] = {}
    default = {}
    for layer, (out_features, in_features) in layer_shapes(random_model.SHAPES[shape]).items():
        copies = max(2, STREAM_BYTES // (out_features * in_features))
        weights, scale = [], None
        for _ in range(copies):
            weight, scale = quantize_per_channel(torch.randn(out_features, in_features, device="cuda") * WEIGHT_STD)
            weights.append(weight)
        x = torch.randn(1, in_features, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(1, out_features, device="cuda", dtype=torch.bfloat16)
        for tile in [*SWEEP_TILES, None]:
            chosen = DEFAULT_GEMV_TILE if tile is None else GemvTile(*tile)
            # One call per weight copy: the graph streams them all from HBM.
            us = calls_us(lambda weight: _fp8_gemv(x, weight, scale, None, out, 1, in_features, chosen), weights)
            if tile is None:
                default[layer] = us
            else:
                times.setdefault(tile, {})[layer] = us
        fastest = sorted(times, key=lambda t: times[t][layer])[:SWEEP_SHOWN]
        gb_s = out_features * in_features / 1e3
        print(f"{layer:<8} default {default[layer]:.2f} µs ({gb_s / default[layer]:.0f} GB/s); fastest: "
              + ", ".join(f"{t} {times[t][layer]:.2f}" for t in fastest))
        del weights
    ranked = sorted(times, key=lambda t: sum(times[t].values()))
    print(f"\nthe layer's GEMVs summed: default {DEFAULT_GEMV_TILE} {sum(default.values()):.2f} µs; "
          f"fastest (block_n, block_k, warps, stages):")
    for tile in ranked[:SWEEP_SHOWN]:
        print(f"  {tile} {sum(times[tile].values()):.2f} µs")
    return {"default": default, "tiles": [{"tile": list(t), "us": times[t]} for t in ranked]}


def main() -> None:
    from fxllm.models.quantization.fp8_gemm import w8a8_gemm
    from fxllm.models.quantization.fp8_quant import quantize_per_channel
    from fxllm.models.quantization.fp8_triton import fp8_weight_only_gemm

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(random_model.SHAPES), default="llama-3-8b")
    parser.add_argument("--rows", type=int, nargs="+", default=list(DEFAULT_ROWS), help="step sizes M")
    parser.add_argument("--sweep-gemv", action="store_true", help="time the GEMV kernel's tiles instead (see above)")
    parser.add_argument("--json", default="bench_fp8_gemm.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU with FP8 (sm89 or newer)")
    torch.manual_seed(0)
    if args.sweep_gemv:
        print(f"{torch.cuda.get_device_name()}, shape {args.shape}, FP8 GEMV µs per call, weights streaming from HBM")
        result = sweep_gemv(args.shape)
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), **result}, indent=2) + "\n")
        return
    device = torch.device("cuda")
    rows = []
    for layer, (out_features, in_features) in layer_shapes(random_model.SHAPES[args.shape]).items():
        weight = torch.randn(out_features, in_features, device=device) * WEIGHT_STD
        weight_bf16 = weight.bfloat16()
        weight_fp8, scale = quantize_per_channel(weight)
        del weight
        for m in args.rows:
            x = torch.randn(m, in_features, device=device, dtype=torch.bfloat16)
            rows.append({
                "layer": layer, "out": out_features, "in": in_features, "m": m,
                "bf16_us": graph_us(lambda: F.linear(x, weight_bf16)),
                "weight_only_us": graph_us(lambda: fp8_weight_only_gemm(x, weight_fp8, scale, None, 1, in_features)),
                "w8a8_us": graph_us(lambda: w8a8_gemm(x, weight_fp8, scale, None, None)),
            })
            if m == 1:  # the GEMV kernel beside the default path, to set GEMV_MAX_ROWS
                rows[-1]["gemv_us"] = graph_us(
                    lambda: fp8_weight_only_gemm(x, weight_fp8, scale, None, 1, in_features, gemv=True)
                )
    print(f"{torch.cuda.get_device_name()}, shape {args.shape}, µs per GEMM (CUDA-graph replay)")
    print(f"{'layer':<8} {'M':>5} {'bf16':>8} {'w-only':>8} {'w8a8':>8}  {'fp8 GB/s (w-only)':>17}  GEMV kernel (M=1)")
    for row in rows:
        gb_s = row["out"] * row["in"] / (row["weight_only_us"] * 1e3)
        gemv = f"{row['gemv_us']:>8.1f}" if "gemv_us" in row else ""
        print(f"{row['layer']:<8} {row['m']:>5} {row['bf16_us']:>8.1f} {row['weight_only_us']:>8.1f} "
              f"{row['w8a8_us']:>8.1f}  {gb_s:>17.0f}  {gemv}")
    print(f"\n{'M':>5} {'layer bf16':>11} {'w-only':>8} {'w8a8':>8}  (µs, the four GEMMs of a decoder layer)")
    crossover, still_winning = 0, True
    for m in sorted(args.rows):
        total = {path: sum(r[f"{path}_us"] for r in rows if r["m"] == m) for path in ("bf16", "weight_only", "w8a8")}
        print(f"{m:>5} {total['bf16']:>11.1f} {total['weight_only']:>8.1f} {total['w8a8']:>8.1f}")
        still_winning = still_winning and total["weight_only"] <= total["w8a8"]
        crossover = m if still_winning else crossover
    print(f"largest M up to which WEIGHT_ONLY beats W8A8 at every measured size: {crossover}")
    Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
