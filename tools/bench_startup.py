"""Workload S: start-up time cold and warm, broken down (load, Dynamo, Inductor, CUDA-graph capture), and decode speed.

Each measurement runs in a fresh process. "cold" starts with empty fxllm, Inductor
and Triton caches; "warm" is a second process over the same caches. Level 0 is the
eager baseline; ``--hf-compile`` adds a whole-model ``torch.compile`` of the HF
model (first call = prefill of the prompt) as the comparator.

    python tools/bench_startup.py                         # default model, CPU
    python tools/bench_startup.py --shape llama-3.2-1b    # random weights, GPU if present

"other" is the start-up less load, compile, the memory profile (GPU) and capture: config
and tokenizer, CUDA's start, the KV cache. ``--cprofile N`` runs each fxllm start under cProfile and lists
the N fxllm functions with the most cumulative time (where "other" goes); the profiler
slows Python down, so its run's figures are not the un-profiled ones.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT_TOKENS = 128
PROFILED_PACKAGE = "fxllm"


def _top_functions(profiler: cProfile.Profile, count: int) -> dict[str, float]:
    """The ``count`` functions of fxllm with the most cumulative seconds."""
    import pstats

    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive, own s, cumulative s, callers)
    ranked = sorted(
        ((f"{Path(file).name}:{line}({name})", row[3]) for (file, line, name), row in stats.items()
         if f"/{PROFILED_PACKAGE}/" in file and name != "<genexpr>"),
        key=lambda item: -item[1],
    )
    return {name: round(seconds, 2) for name, seconds in ranked[:count]}


def _worker(args: argparse.Namespace) -> dict:
    import torch

    from fxllm import LLM, SamplingParams

    profiler = cProfile.Profile() if args.cprofile else None
    start = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    compilation = {"level": args.level, "cache_dir": args.cache_dir}
    llm = LLM(model=args.model, max_model_len=args.max_model_len, compilation_config=compilation, device=args.device)
    startup = time.perf_counter() - start
    if profiler is not None:
        profiler.disable()
    report = llm.compile_report()
    vocab_size = llm.llm_engine_config.model.hf_config.vocab_size
    prompt_tokens = min(PROMPT_TOKENS, args.max_model_len - args.decode_tokens)
    prompt = {"prompt_token_ids": [((7 * i) % 1000 + 2) % vocab_size for i in range(prompt_tokens)]}
    params = SamplingParams(temperature=0.0, max_tokens=args.decode_tokens, ignore_eos=True)
    llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    begin = time.perf_counter()
    llm.generate(prompt, params, use_tqdm=False)
    elapsed = time.perf_counter() - begin
    accounted = (report.load_seconds + report.compile_seconds + report.cudagraph_capture_seconds
                 + report.memory_profile_seconds)
    row = {
        "startup_s": round(startup, 2),
        "load_s": report.load_seconds,
        "dynamo_s": report.dynamo_seconds,
        "inductor_s": report.inductor_seconds,
        "compile_s": report.compile_seconds,
        "capture_s": report.cudagraph_capture_seconds,
        "memory_profile_s": report.memory_profile_seconds,
        "other_s": round(startup - accounted, 2),
        "graph_mib": round(report.cudagraph_memory_bytes / 2**20),
        "inductor_compiles": report.inductor_compiles,
        "loaded_from_cache": report.loaded_from_cache,
        "decode_tok_s": round(args.decode_tokens / elapsed, 1),
    }
    if profiler is not None:
        row["cprofile_cumulative_s"] = _top_functions(profiler, args.cprofile)
    return row


def _hf_worker(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    compiled = torch.compile(model)
    input_ids = torch.tensor([[(7 * i) % 1000 + 2 for i in range(PROMPT_TOKENS)]], device=device)
    with torch.no_grad():
        compiled(input_ids)
    if device == "cuda":
        torch.cuda.synchronize()
    return {"startup_s": round(time.perf_counter() - start, 2)}


def _run(args: argparse.Namespace, mode: str, level: int | None, cache: Path) -> dict:
    env = dict(os.environ)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")
    env["TRITON_CACHE_DIR"] = str(cache / "triton")
    command = [sys.executable, __file__, "--worker", mode, "--model", args.model, "--device", args.device,
               "--max-model-len", str(args.max_model_len), "--decode-tokens", str(args.decode_tokens),
               "--cache-dir", str(cache / "fxllm"), "--level", str(level if level is not None else 0),
               "--cprofile", str(args.cprofile)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{mode} worker failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the default model)")
    parser.add_argument("--shape", default=None, help="random weights of a named shape (tools/random_model.py)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 3])
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--hf-compile", action="store_true", help="also time a whole-model torch.compile of HF")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N",
                        help="profile each fxllm start; list its N costliest fxllm functions (see above)")
    parser.add_argument("--json", default="bench_startup.json")
    parser.add_argument("--worker", choices=["fxllm", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--level", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args) if args.worker == "fxllm" else _hf_worker(args)))
        return

    if args.shape:
        sys.path.insert(0, str(Path(__file__).parent))
        import random_model  # the named shapes and the tiny CPU one

        args.model = str(random_model.write_random_model(args.shape, Path(tempfile.mkdtemp()) / args.shape))
    elif args.model is None:
        from fxllm import default_model

        args.model = default_model()
    rows = []
    for level in args.levels:
        with tempfile.TemporaryDirectory() as cache:
            runs = ["cold"] if level == 0 else ["cold", "warm"]
            for run in runs:
                rows.append({"engine": f"fxllm level {level}", "run": run, **_run(args, "fxllm", level, Path(cache))})
    if args.hf_compile:
        with tempfile.TemporaryDirectory() as cache:
            rows.append({"engine": "HF torch.compile (first call)", "run": "cold", **_run(args, "hf", None, Path(cache))})
    columns = ["startup_s", "load_s", "dynamo_s", "inductor_s", "capture_s", "memory_profile_s", "other_s",
               "decode_tok_s"]
    print(f"{'engine':<32} {'run':<5} " + " ".join(f"{c:>12}" for c in columns))
    for row in rows:
        print(f"{row['engine']:<32} {row['run']:<5} " + " ".join(f"{row.get(c, ''):>12}" for c in columns))
    for row in rows:
        if "cprofile_cumulative_s" in row:
            print(f"\n{row['engine']}, {row['run']}: cumulative seconds under cProfile")
            for name, seconds in row["cprofile_cumulative_s"].items():
                print(f"  {seconds:>8}  {name}")
    with open(args.json, "w") as handle:
        json.dump({"model": args.model, "shape": args.shape, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
