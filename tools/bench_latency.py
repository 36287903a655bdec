"""Workload L (BENCHMARKS.md): batch-1 decode latency on random weights of a named shape.

128-token prompt, --new-tokens (default 256) greedy tokens with EOS ignored, batch 1.
Reports end-to-end tok/s of ``generate``, decode tok/s (the time after the first token),
and the bandwidth achieved: the bytes a decode step reads (every linear weight, the
lm_head, and the KV cache at the mean context; not the embedding table, of which a step
reads one row) times decode tok/s, against the 3.0 TB/s the H100 copies at.

    python tools/bench_latency.py --shape llama-3.2-1b        # GPU
    python tools/bench_latency.py --shape tiny --new-tokens 16 --enforce-eager   # CPU smoke run
    python tools/bench_latency.py --cudagraph-modes NONE FULL_AND_PIECEWISE --profile
    python tools/bench_latency.py --shape llama-3-8b --quantization none fp8
    python tools/bench_latency.py --shape llama-3-8b --quantization none w4a16   # GPTQ INT4, random packed weights
    python tools/bench_latency.py --shape llama-3-8b --tensor-parallel-sizes 1 2 --profile
    python tools/bench_latency.py --shape qwen3-0.6b --pass-configs default off
    python tools/bench_latency.py --async-scheduling on off

One row per combination of the listed modes, quantizations, tensor-parallel sizes,
pass configs and async-scheduling settings, all in one run. ``--profile`` adds where a
decode step's time goes: the device time of its kernels (torch profiler, rank 0)
against the step's wall time, the rest being host overhead the GPU waits on; and,
under tensor parallelism, the time of the all-reduce kernels in it. Under tensor parallelism the bound is per card: each
reads 1/N of the weights and KV cache.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

sys.path.insert(0, str(Path(__file__).parent))
import random_model  # noqa: E402  (tools/ is not a package)
from kernel_table import kernel_ms, print_kernels, top_kernels  # noqa: E402

if TYPE_CHECKING:
    from fxllm import LLM, SamplingParams

PROMPT_TOKENS = 128
DEFAULT_NEW_TOKENS = 256
H100_BYTES_PER_S = 3.0e12  # device-to-device copy on the H100 of BENCHMARKS.md
WARMUP_TOKENS = 4
PROFILED_STEPS = 32
PROMPT_ID_LIMIT = 10_000  # prompt ids below every shape's vocabulary
SHAPES = tuple(random_model.SHAPES)
# --pass-configs names; anything else is read as a JSON PassConfig.
NAMED_PASS_CONFIGS = {"default": None, "off": {"enable_noop": False, "enable_fusion": False}}
# Bytes a linear weight takes per quantization (scales aside).
LINEAR_BYTES = {"fp8": 1, "w4a16": 0.5}
# --quantization names that load a pre-quantized checkpoint (random packed weights) rather than
# quantizing the bf16 one: name -> the method the checkpoint says.
PREQUANTIZED = {"w4a16": "gptq"}
ASYNC_SCHEDULING = {"auto": None, "on": True, "off": False}
# All-reduce kernels, named lower-cased without underscores: NCCL's and the one-shot kernel.
ALL_REDUCE_KERNEL = "allreduce"


@dataclass(frozen=True)
class Variant:
    cudagraph_mode: str | None
    quantization: str | None
    tensor_parallel_size: int
    pass_config: str  # a NAMED_PASS_CONFIGS key or JSON
    async_scheduling: str = "auto"  # an ASYNC_SCHEDULING key

    def pass_config_dict(self) -> dict | None:
        if self.pass_config in NAMED_PASS_CONFIGS:
            return NAMED_PASS_CONFIGS[self.pass_config]
        return json.loads(self.pass_config)


def bytes_per_decode_step(
    config: dict, context_tokens: float, element_bytes: int, linear_bytes: float | None = None
) -> dict[str, float]:
    """Bytes one decode step reads: linear weights (``linear_bytes`` each: FP8 1, INT4 0.5), lm_head
    and the KV cache of ``context_tokens``."""
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_width = config["num_attention_heads"] * head_dim
    kv_width = config["num_key_value_heads"] * head_dim
    layers = config["num_hidden_layers"]
    attention = hidden * (q_width + 2 * kv_width) + q_width * hidden  # qkv and o projections
    mlp = 3 * hidden * config["intermediate_size"]  # gate, up, down
    linear = layers * (attention + mlp) * (linear_bytes or element_bytes)
    lm_head = config["vocab_size"] * hidden * element_bytes  # read in full even when tied
    kv = layers * 2 * kv_width * context_tokens * element_bytes
    return {"linear": linear, "lm_head": lm_head, "kv": kv, "total": linear + lm_head + kv}


def timed_generate(llm: LLM, prompt: dict, params: SamplingParams) -> float:
    start = time.perf_counter()
    llm.generate(prompt, params, use_tqdm=False)  # returns host-side tokens, so the device is done
    return time.perf_counter() - start


def device_ms_per_step(llm: LLM, prompt: dict, decode_steps: int) -> tuple[float, float, dict[str, float]]:
    """Kernel time, all-reduce kernel time, and each kernel's time per decode step, from the
    torch profiler (prefill included, then removed by profiling a 1-token run too)."""
    from torch.profiler import ProfilerActivity, profile

    from fxllm import SamplingParams

    def profiled_ms(tokens: int) -> dict[str, float]:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True), use_tqdm=False)
        return kernel_ms(prof, on_gpu=True)

    long, short = profiled_ms(decode_steps + 1), profiled_ms(1)
    per_kernel = {name: (ms - short.get(name, 0.0)) / decode_steps for name, ms in long.items()}
    all_reduce = sum(ms for name, ms in per_kernel.items() if ALL_REDUCE_KERNEL in name.lower().replace("_", ""))
    return sum(per_kernel.values()), all_reduce, per_kernel


def run(args: argparse.Namespace, model_dirs: dict[str, Path], variant: Variant) -> dict:
    from fxllm import LLM, SamplingParams

    compilation: dict = {"level": args.level}
    if variant.cudagraph_mode is not None:
        compilation["cudagraph_mode"] = variant.cudagraph_mode
    if variant.pass_config_dict() is not None:
        compilation["pass_config"] = variant.pass_config_dict()
    model_dir = model_dirs.get(variant.quantization, model_dirs[None])
    quantization = PREQUANTIZED.get(variant.quantization, variant.quantization)
    # No prefix caching: every repeat must compute the prompt again, like the first.
    llm = LLM(
        model=str(model_dir), max_model_len=PROMPT_TOKENS + args.new_tokens, device=args.device,
        enforce_eager=args.enforce_eager, compilation_config=compilation, enable_prefix_caching=False,
        quantization=quantization, tensor_parallel_size=variant.tensor_parallel_size,
        async_scheduling=ASYNC_SCHEDULING[variant.async_scheduling],
    )
    rng = random.Random(0)
    id_limit = min(PROMPT_ID_LIMIT, llm.llm_engine_config.model.hf_config.vocab_size)
    prompt = {"prompt_token_ids": [rng.randrange(id_limit) for _ in range(PROMPT_TOKENS)]}

    def params(tokens: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)

    timed_generate(llm, prompt, params(WARMUP_TOKENS))
    first_token_s = statistics.median(timed_generate(llm, prompt, params(1)) for _ in range(args.repeats))
    total_s = statistics.median(timed_generate(llm, prompt, params(args.new_tokens)) for _ in range(args.repeats))
    decode_tok_s = (args.new_tokens - 1) / (total_s - first_token_s)

    config = json.loads((model_dir / "config.json").read_text())
    element_bytes = llm.llm_engine_config.model.dtype.itemsize
    # Decode steps see contexts of PROMPT_TOKENS + 1 ... PROMPT_TOKENS + new_tokens - 1 tokens.
    linear_bytes = LINEAR_BYTES.get(variant.quantization)
    step_bytes = bytes_per_decode_step(config, PROMPT_TOKENS + args.new_tokens / 2, element_bytes, linear_bytes)
    cards = variant.tensor_parallel_size
    bandwidth = step_bytes["total"] / cards * decode_tok_s  # per card
    on_gpu = llm.llm_engine_config.device.type == "cuda"
    step_ms = 1e3 / decode_tok_s
    device_ms, all_reduce_ms, per_kernel = (
        device_ms_per_step(llm, prompt, PROFILED_STEPS) if args.profile and on_gpu else (None, None, {})
    )
    row = {
        "shape": args.shape,
        "cudagraph_mode": "NONE" if args.enforce_eager else (variant.cudagraph_mode or "default"),
        "quantization": variant.quantization or "none",
        "tensor_parallel_size": cards,
        "pass_config": variant.pass_config,
        "async_scheduling": llm.llm_engine.async_scheduling,
        "weight_gib": round(llm.compile_report().weight_bytes / 2**30, 3),  # rank 0's share
        "step_ms": round(step_ms, 3),
        "device_ms_per_step": None if device_ms is None else round(device_ms, 3),
        "all_reduce_ms_per_step": None if all_reduce_ms is None or cards == 1 else round(all_reduce_ms, 3),
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "dtype": str(llm.llm_engine_config.model.dtype).removeprefix("torch."),
        "level": 0 if args.enforce_eager else args.level,
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": args.new_tokens,
        "first_token_ms": round(first_token_s * 1e3, 2),
        "tok_s": round(args.new_tokens / total_s, 1),
        "decode_tok_s": round(decode_tok_s, 1),
        "bytes_per_step": {part: int(value) for part, value in step_bytes.items()},
        "bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "fraction_of_bound": round(bandwidth / H100_BYTES_PER_S, 3) if on_gpu else None,
        "bound_tok_s": round(H100_BYTES_PER_S * cards / step_bytes["total"], 1) if on_gpu else None,
        # The kernels that take the most device time in a decode step: name -> ms per step.
        "top_kernels_ms_per_step": top_kernels(per_kernel, args.top_kernels),
    }
    del llm
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()  # the next mode's engine sizes its KV cache from free memory
    return row


def print_table(rows: list[dict]) -> None:
    print(f"{'shape':<12} {'graphs':<18} {'quant':<5} {'TP':>2} {'passes':<8} {'async':<5} {'weights GiB':>11} {'tok/s':>7} "
          f"{'decode tok/s':>12} {'ms/step':>8} {'device ms':>9} {'all-reduce ms':>13} {'GB/step':>8}  bound")
    for row in rows:
        bound = "n/a (CPU)" if row["fraction_of_bound"] is None else f"{row['fraction_of_bound']:.0%} of 3.0 TB/s"
        device = "" if row["device_ms_per_step"] is None else row["device_ms_per_step"]
        all_reduce = "" if row["all_reduce_ms_per_step"] is None else row["all_reduce_ms_per_step"]
        print(f"{row['shape']:<12} {row['cudagraph_mode']:<18} {row['quantization']:<5} "
              f"{row['tensor_parallel_size']:>2} {row['pass_config'][:8]:<8} {str(row['async_scheduling']):<5} "
              f"{row['weight_gib']:>11} {row['tok_s']:>7} "
              f"{row['decode_tok_s']:>12} {row['step_ms']:>8} {device:>9} {all_reduce:>13} "
              f"{row['bytes_per_step']['total'] / 1e9:>8.4g}  {bound}")


def print_top_kernels(rows: list[dict]) -> None:
    for row in rows:
        if row["top_kernels_ms_per_step"]:
            title = (f"{row['shape']} {row['quantization']} TP={row['tensor_parallel_size']} "
                     f"async={row['async_scheduling']}: top kernels, ms per decode step")
            print_kernels(title, row["top_kernels_ms_per_step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="llama-3.2-1b", help="random weights of this shape")
    parser.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS, help="tokens generated after the prompt")
    parser.add_argument("--level", type=int, choices=(0, 1, 2, 3), default=3, help="compilation level")
    parser.add_argument("--enforce-eager", action="store_true", help="no compilation, no CUDA graphs")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median counts")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cudagraph-modes", nargs="+", default=[None], help="one row per mode (default: the engine's)")
    parser.add_argument("--quantization", nargs="+", choices=("none", "fp8", "w4a16"), default=["none"],
                        help="one row per quantization (fp8: dynamic FP8 at load; w4a16: a GPTQ INT4 checkpoint "
                             "of random packed weights, group 128)")
    parser.add_argument("--tensor-parallel-sizes", type=int, nargs="+", default=[1], help="one row per size")
    parser.add_argument("--pass-configs", nargs="+", default=["default"],
                        help="one row per pass config: default, off, or a JSON PassConfig")
    parser.add_argument("--async-scheduling", nargs="+", choices=tuple(ASYNC_SCHEDULING), default=["auto"],
                        help="one row per setting (auto: on for CUDA)")
    parser.add_argument("--profile", action="store_true", help="also measure device time per decode step (GPU)")
    parser.add_argument("--top-kernels", type=int, default=0, metavar="N",
                        help="with --profile, list the N kernels that take the most time in a decode step")
    parser.add_argument("--json", default="bench_latency.json", help="where to write the results")
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error(f"--new-tokens must be >= 2 (one prefill token and at least one decode step), got {args.new_tokens}")
    for passes in args.pass_configs:
        if passes not in NAMED_PASS_CONFIGS:
            try:
                json.loads(passes)
            except json.JSONDecodeError as error:
                parser.error(f"--pass-configs takes {', '.join(NAMED_PASS_CONFIGS)} or JSON, got {passes!r}: {error}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    with tempfile.TemporaryDirectory() as scratch:
        model_dirs = {None: random_model.write_random_model(args.shape, Path(scratch) / args.shape)}
        if "w4a16" in args.quantization:
            model_dirs["w4a16"] = random_model.write_random_int4_model(args.shape, Path(scratch) / f"{args.shape}-w4a16")
        variants = [
            Variant(mode, None if quantization == "none" else quantization, size, passes, overlap)
            for mode, quantization, size, passes, overlap in itertools.product(
                args.cudagraph_modes, args.quantization, args.tensor_parallel_sizes, args.pass_configs,
                args.async_scheduling,
            )
        ]
        rows = [run(args, model_dirs, variant) for variant in variants]
    print_table(rows)
    print_top_kernels(rows)
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
