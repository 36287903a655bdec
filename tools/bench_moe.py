"""Mixture of experts on random weights in the Qwen3-30B-A3B shape: the fused_moe kernel, batch-1
decode and workload T (GPU; ``--shape tiny-moe --device cpu`` for a smoke run).

    python tools/bench_moe.py kernel          # (a) the Triton op against the torch path, per step size T
    python tools/bench_moe.py decode          # (b) batch-1 decode tok/s against the bytes-per-step bound
    python tools/bench_moe.py throughput      # (c) workload T's requests (tools/bench_throughput.py)
    python tools/bench_moe.py kernel decode throughput --model-dir /data/qwen3-30b-a3b
    python tools/bench_moe.py kernel --sweep-tiles --rows 1 16 256 4096
    python tools/bench_moe.py kernel decode throughput --quantization fp8   # FP8 experts and linears
    python tools/bench_moe.py kernel decode throughput --shape tiny-moe --device cpu --enforce-eager \\
        --rows 1 4 --new-tokens 8 --num-requests 4 --input-len 8 32 --output-len 4 16   # CPU smoke run

(a) For each T: µs per call of the op's Triton path, replayed from a CUDA graph as a decode step
replays it (the graph cycles through WEIGHT_COPIES copies of one layer's experts, so weights
stream from HBM rather than L2), and of its torch path (eagerly: it syncs with the host); the
tile the op picks, the experts the step touches and the GB/s of their weights the Triton path
reads. ``--sweep-tiles`` times SWEEP_TILES at each T instead: the candidates for the tiles of
fxllm/models/moe/triton_experts.py. On a CPU only the torch path is timed.

(b) As tools/bench_latency.py (128-token prompt, greedy, EOS ignored): decode tok/s, and the
bound: the bytes one decode step reads (attention projections, routers, the top-k experts of
every sparse layer and any dense or shared MLP, lm_head, and the KV cache at the mean context;
not the embedding table, of which a step reads one row) against this device's copy bandwidth,
measured here. ``--profile`` adds the kernels that take the most device time per step.
``--quantization fp8`` quantizes the experts and linear layers at load (one byte per weight;
routers, lm_head and the KV cache stay bf16), in (a) as in (b) and (c).

(c) Workload T (256 requests, prompts of 100-1024 random ids, 100-1024 output tokens; see
tools/bench_throughput.py, whose workload this runs).

The full shape's checkpoint takes 61 GB of disk: ``--model-dir`` writes it once and reuses it,
``--num-layers`` writes fewer layers (the bound follows).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_latency  # noqa: E402  (tools/ is not a package)
import bench_throughput  # noqa: E402
import random_model  # noqa: E402
from bench_fp8_gemm import calls_us  # noqa: E402
from kernel_table import print_kernels, top_kernels  # noqa: E402

PARTS = ("kernel", "decode", "throughput")
DEFAULT_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
WEIGHT_COPIES = 4  # one layer's experts, copied: 4.8 GB for the full shape, far beyond L2
EAGER_CALLS = 5
LOGIT_STD = 2.0  # router logits spread like a trained router's: a few experts stand out
COPY_BYTES = 1 << 30
COPY_REPEATS = 10
FP8_BYTES = 1
SWEEP_TILES = [
    (block_m, block_n, block_k, warps, stages)
    for block_m in (16, 32, 64)
    for block_n in (32, 64, 128)
    for block_k in (64, 128, 256)
    for warps in (4, 8)
    for stages in (3, 4)
    if block_n * block_k <= 16384  # weight tiles of at most 32 KB in bf16
]
TOP_SWEEP_TILES = 3


def shape_config(args: argparse.Namespace) -> dict:
    config = dict(random_model.MOE_SHAPES[args.shape])
    if args.num_layers is not None:
        config["num_hidden_layers"] = args.num_layers
    return config


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def eager_us(fn, device: torch.device) -> float:
    fn()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(EAGER_CALLS):
        fn()
    _synchronize(device)
    return (time.perf_counter() - start) * 1e6 / EAGER_CALLS


# ---- (a) the kernel ------------------------------------------------------------------------------


def expert_weights(config: dict, device: torch.device, dtype: torch.dtype, copies: int, fp8: bool) -> list[tuple]:
    """``copies`` random (w13 [E, 2I, H], w2 [E, H, I]) of one layer, or with ``fp8`` (w13, w2,
    w13_scale, w2_scale) quantized per row as Fp8FusedMoE quantizes them."""
    from fxllm.models.quantization.fp8_quant import quantize_per_channel

    hidden, width, experts = config["hidden_size"], config["moe_intermediate_size"], config["num_experts"]
    generator = torch.Generator(device=device).manual_seed(0)

    def weight(*shape: int, fan_in: int) -> torch.Tensor:
        return (torch.randn(*shape, device=device, generator=generator) * fan_in**-0.5).to(dtype)

    def quantized(stacked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, scales = zip(*(quantize_per_channel(expert) for expert in stacked))
        return torch.stack(weights), torch.stack(scales).squeeze(-1)

    layers = []
    for _ in range(copies):
        w13, w2 = weight(experts, 2 * width, hidden, fan_in=hidden), weight(experts, hidden, width, fan_in=width)
        if fp8:
            (w13, w13_scale), (w2, w2_scale) = quantized(w13), quantized(w2)
            layers.append((w13, w2, w13_scale, w2_scale))
        else:
            layers.append((w13, w2))
    return layers


def kernel_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    from fxllm.models.moe.routing import select_experts
    from fxllm.models.moe.torch_experts import torch_fused_moe
    from fxllm.models.moe.triton_experts import ExpertTile, expert_tile, triton_fused_moe

    config = shape_config(args)
    hidden_size, width, experts = config["hidden_size"], config["moe_intermediate_size"], config["num_experts"]
    top_k, renormalize = config["num_experts_per_tok"], config["norm_topk_prob"]
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    fp8 = args.quantization == "fp8"
    copies = expert_weights(config, device, dtype, WEIGHT_COPIES if on_gpu else 1, fp8)
    expert_bytes = 3 * hidden_size * width * (FP8_BYTES if fp8 else dtype.itemsize)
    rows = []
    for num_tokens in args.rows:
        generator = torch.Generator(device=device).manual_seed(num_tokens)
        hidden = torch.randn(num_tokens, hidden_size, device=device, generator=generator).to(dtype)
        logits = (torch.randn(num_tokens, experts, device=device, generator=generator) * LOGIT_STD).to(dtype)
        touched = select_experts(logits, top_k, renormalize)[1].unique().numel()
        w13, w2, *scales = copies[0]
        row = {
            "tokens": num_tokens,
            "experts_touched": touched,
            "torch_us": round(eager_us(lambda: torch_fused_moe(hidden, logits, w13, w2, top_k, renormalize, *scales), device), 1),
        }
        if on_gpu:
            def triton_us(tile: ExpertTile | None) -> float:
                def call(layer: tuple) -> torch.Tensor:
                    w13, w2, *scales = layer
                    return triton_fused_moe(hidden, logits, w13, w2, top_k, renormalize, *scales, tile=tile)

                return calls_us(call, copies)

            tile = expert_tile(num_tokens * top_k, experts)
            row["tile"] = [tile.block_m, tile.block_n, tile.block_k, tile.num_warps, tile.num_stages]
            row["triton_us"] = round(triton_us(None), 1)
            row["speedup"] = round(row["torch_us"] / row["triton_us"], 2)
            row["expert_gb_s"] = round(touched * expert_bytes / row["triton_us"] / 1e3, 1)
            if args.sweep_tiles:
                timed = []
                for candidate in SWEEP_TILES:
                    us = tile_us(triton_us, ExpertTile(*candidate))
                    if us is not None:
                        timed.append((us, candidate))
                timed.sort()
                row["fastest_tiles"] = [{"tile": list(candidate), "us": round(us, 1)} for us, candidate in timed[:TOP_SWEEP_TILES]]
        rows.append(row)
    return rows


def tile_us(triton_us, tile) -> float | None:
    """``triton_us(tile)``, or None where the tile needs more shared memory than the GPU has."""
    from triton.runtime.errors import OutOfResources

    try:
        return triton_us(tile)
    except OutOfResources:
        return None


def print_kernel_rows(rows: list[dict]) -> None:
    print(f"{'T':>6} {'experts':>7} {'tile (m n k warps stages)':>26} {'Triton µs':>10} {'torch µs':>10} "
          f"{'speedup':>8} {'expert GB/s':>11}")
    for row in rows:
        tile = " ".join(map(str, row.get("tile", ["n/a"])))
        print(f"{row['tokens']:>6} {row['experts_touched']:>7} {tile:>26} {row.get('triton_us', ''):>10} "
              f"{row['torch_us']:>10} {row.get('speedup', ''):>8} {row.get('expert_gb_s', ''):>11}")
        for fastest in row.get("fastest_tiles", []):
            print(f"{'':>15} {' '.join(map(str, fastest['tile'])):>26} {fastest['us']:>10}")


# ---- (b) batch-1 decode --------------------------------------------------------------------------


def bytes_per_decode_step(config: dict, context_tokens: float, element_bytes: int, weight_bytes: int) -> dict[str, float]:
    """Bytes one batch-1 decode step reads: every layer's attention projections, its router and
    top-k experts (sparse layers) or its dense MLP, shared experts, lm_head and the KV cache of
    ``context_tokens``. Projection and expert weights take ``weight_bytes`` each (FP8: 1)."""
    from fxllm.models.moe_decoder import is_sparse_layer

    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_width = config["num_attention_heads"] * head_dim
    kv_width = config["num_key_value_heads"] * head_dim
    layers = config["num_hidden_layers"]
    attention = layers * (hidden * (q_width + 2 * kv_width) + q_width * hidden)
    sparse = sum(is_sparse_layer(SimpleNamespace(**config), index) for index in range(layers))
    routers = sparse * config["num_experts"] * hidden
    experts = sparse * config["num_experts_per_tok"] * 3 * hidden * config["moe_intermediate_size"]
    shared = sparse * 3 * hidden * config.get("shared_expert_intermediate_size", 0)
    dense = (layers - sparse) * 3 * hidden * config["intermediate_size"]
    parts = {
        "attention": attention * weight_bytes,
        "routers": routers * element_bytes,
        "active_experts": experts * weight_bytes,
        "shared_and_dense_mlps": (shared + dense) * weight_bytes,
        "lm_head": config["vocab_size"] * hidden * element_bytes,
        "kv": layers * 2 * kv_width * context_tokens * element_bytes,
    }
    return {**parts, "total": sum(parts.values())}


def copy_bytes_per_s(device: torch.device) -> float:
    """Bytes a device-to-device copy moves per second (each byte read once, written once)."""
    source = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(COPY_REPEATS):
        target.copy_(source)
    _synchronize(device)
    return 2 * COPY_BYTES * COPY_REPEATS / (time.perf_counter() - start)


def decode_row(args: argparse.Namespace, model_dir: Path) -> dict:
    from fxllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), max_model_len=bench_latency.PROMPT_TOKENS + args.new_tokens, device=args.device,
              enforce_eager=args.enforce_eager, enable_prefix_caching=False, quantization=quantization(args))
    rng = random.Random(0)
    id_limit = min(bench_latency.PROMPT_ID_LIMIT, llm.llm_engine_config.model.hf_config.vocab_size)
    prompt = {"prompt_token_ids": [rng.randrange(id_limit) for _ in range(bench_latency.PROMPT_TOKENS)]}

    def params(tokens: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)

    bench_latency.timed_generate(llm, prompt, params(bench_latency.WARMUP_TOKENS))
    first_s = statistics.median(bench_latency.timed_generate(llm, prompt, params(1)) for _ in range(args.repeats))
    total_s = statistics.median(bench_latency.timed_generate(llm, prompt, params(args.new_tokens)) for _ in range(args.repeats))
    decode_tok_s = (args.new_tokens - 1) / (total_s - first_s)
    device = llm.llm_engine_config.device
    element_bytes = llm.llm_engine_config.model.dtype.itemsize
    weight_bytes = FP8_BYTES if args.quantization == "fp8" else element_bytes
    context = bench_latency.PROMPT_TOKENS + args.new_tokens / 2
    step_bytes = bytes_per_decode_step(shape_config(args), context, element_bytes, weight_bytes)
    copy_rate = copy_bytes_per_s(device)
    row = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(llm.llm_engine_config.model.dtype).removeprefix("torch."),
        "quantization": args.quantization,
        "layers": shape_config(args)["num_hidden_layers"],
        "weight_gib": round(llm.compile_report().weight_bytes / 2**30, 2),
        "first_token_ms": round(first_s * 1e3, 2),
        "decode_tok_s": round(decode_tok_s, 1),
        "step_ms": round(1e3 / decode_tok_s, 3),
        "bytes_per_step": {part: int(value) for part, value in step_bytes.items()},
        "copy_gb_s": round(copy_rate / 1e9, 1),
        "bound_tok_s": round(copy_rate / step_bytes["total"], 1),
        "fraction_of_bound": round(decode_tok_s * step_bytes["total"] / copy_rate, 3),
    }
    if args.profile and device.type == "cuda":
        device_ms, _, per_kernel = bench_latency.device_ms_per_step(llm, prompt, bench_latency.PROFILED_STEPS)
        row["device_ms_per_step"] = round(device_ms, 3)
        row["top_kernels_ms_per_step"] = top_kernels(per_kernel, args.top_kernels)
    _release(llm)
    return row


def print_decode_row(row: dict) -> None:
    print(f"\nbatch-1 decode, {row['layers']} layers, {row['dtype']} ({row['quantization']}) on {row['device']}: "
          f"{row['decode_tok_s']} tok/s "
          f"({row['step_ms']} ms/step, first token {row['first_token_ms']} ms)")
    print(f"bound: {row['bytes_per_step']['total'] / 1e9:.4g} GB/step at {row['copy_gb_s']} GB/s copy = "
          f"{row['bound_tok_s']} tok/s; reached {row['fraction_of_bound']:.0%}")
    for part, value in row["bytes_per_step"].items():
        if part != "total":
            print(f"  {part:<28} {value / 1e9:>8.4g} GB")
    if "top_kernels_ms_per_step" in row:
        print_kernels(f"device {row['device_ms_per_step']} ms per decode step; top kernels", row["top_kernels_ms_per_step"])


# ---- (c) workload T ------------------------------------------------------------------------------


def throughput_row(args: argparse.Namespace, model_dir: Path) -> dict:
    from fxllm import LLM, SamplingParams

    workload = bench_throughput.make_workload(args.num_requests, tuple(args.input_len), tuple(args.output_len))
    llm = LLM(model=str(model_dir), max_model_len=args.max_model_len, device=args.device,
              enforce_eager=args.enforce_eager, enable_prefix_caching=False, quantization=quantization(args))
    llm.generate({"prompt_token_ids": bench_throughput.WARMUP_PROMPT},
                 SamplingParams(max_tokens=bench_throughput.WARMUP_TOKENS, ignore_eos=True), use_tqdm=False)
    row = bench_throughput.bench_fxllm(llm, workload)
    row["preemptions"] = llm.llm_engine.scheduler.num_preemptions
    _release(llm)
    return row


def print_throughput_row(row: dict) -> None:
    print(f"\nworkload T: {row['requests']} requests, {row['prompt_tokens']} prompt + {row['output_tokens']} output "
          f"tokens in {row['seconds']} s: {row['output_tok_s']} output tok/s, {row['total_tok_s']} total tok/s "
          f"({row['preemptions']} preemptions)")


def quantization(args: argparse.Namespace) -> str | None:
    return None if args.quantization == "none" else args.quantization


def _release(llm) -> None:
    """Free an engine: the next one sizes its KV cache from free memory."""
    on_gpu = llm.llm_engine_config.device.type == "cuda"
    del llm
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()


def model_dir_for(args: argparse.Namespace, scratch: str) -> Path:
    """The checkpoint: ``--model-dir`` if it holds one of this shape, else written there (or in scratch)."""
    directory = Path(args.model_dir) if args.model_dir else Path(scratch) / args.shape
    config_file = directory / "config.json"
    if config_file.exists():
        written = json.loads(config_file.read_text())
        if all(written.get(key) == value for key, value in shape_config(args).items()):
            return directory
        raise ValueError(f"{directory} holds a checkpoint of another shape: pass another --model-dir")
    print(f"writing random {args.shape} weights to {directory} ...", flush=True)
    return random_model.write_random_model(args.shape, directory, num_layers=args.num_layers)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="+", choices=PARTS, help="what to measure")
    parser.add_argument("--shape", choices=sorted(random_model.MOE_SHAPES), default="qwen3-30b-a3b")
    parser.add_argument("--num-layers", type=int, default=None, help="fewer layers than the shape's (less disk)")
    parser.add_argument("--model-dir", default=None, help="where the checkpoint is kept between runs (default: a temp dir)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--enforce-eager", action="store_true", help="no compilation, no CUDA graphs (decode, throughput)")
    parser.add_argument("--quantization", choices=("none", "fp8"), default="none",
                        help="fp8: experts and linear layers quantized at load")
    parser.add_argument("--rows", type=int, nargs="+", default=list(DEFAULT_ROWS), help="kernel: step sizes T")
    parser.add_argument("--sweep-tiles", action="store_true", help="kernel: time SWEEP_TILES at each T (GPU)")
    parser.add_argument("--new-tokens", type=int, default=bench_latency.DEFAULT_NEW_TOKENS, help="decode: tokens after the prompt")
    parser.add_argument("--repeats", type=int, default=3, help="decode: timed runs; the median counts")
    parser.add_argument("--profile", action="store_true", help="decode: also the device time per step and its kernels (GPU)")
    parser.add_argument("--top-kernels", type=int, default=15, metavar="N", help="decode: with --profile, list N kernels")
    parser.add_argument("--num-requests", type=int, default=bench_throughput.NUM_REQUESTS, help="throughput: requests")
    parser.add_argument("--input-len", type=int, nargs=2, default=list(bench_throughput.INPUT_LEN), metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=list(bench_throughput.OUTPUT_LEN), metavar=("MIN", "MAX"))
    parser.add_argument("--max-model-len", type=int, default=bench_throughput.MAX_MODEL_LEN, help="throughput")
    parser.add_argument("--json", default="bench_moe.json", help="where to write the results")
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error(f"--new-tokens must be >= 2 (one prefill token and at least one decode step), got {args.new_tokens}")
    if args.num_layers is not None and args.num_layers < 1:
        parser.error(f"--num-layers must be >= 1, got {args.num_layers}")
    if min(args.rows) < 1:
        parser.error(f"--rows must all be >= 1, got {args.rows}")
    if args.input_len[1] + args.output_len[1] > args.max_model_len:
        parser.error(f"the longest prompt + completion ({args.input_len[1] + args.output_len[1]}) exceeds "
                     f"--max-model-len {args.max_model_len}: shorten --input-len/--output-len")
    return args


def main() -> None:
    from fxllm.config import resolve_device

    args = parse_args()
    result: dict = {"shape": args.shape}
    if "kernel" in args.parts:
        result["kernel"] = kernel_rows(args, resolve_device(args.device))
        print_kernel_rows(result["kernel"])
    if "decode" in args.parts or "throughput" in args.parts:
        with tempfile.TemporaryDirectory() as scratch:
            model_dir = model_dir_for(args, scratch)
            if "decode" in args.parts:
                result["decode"] = decode_row(args, model_dir)
                print_decode_row(result["decode"])
            if "throughput" in args.parts:
                result["throughput"] = throughput_row(args, model_dir)
                print_throughput_row(result["throughput"])
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
