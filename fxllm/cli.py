"""The ``fxllm`` command: inspect what the compiler did, generate text, run the benchmarks.

    fxllm inspect /path/to/model --out inspect       # report + graphs + depyf dump in ./inspect
    fxllm generate /path/to/model --prompt "Hello"   # prints the completion
    fxllm bench latency --shape tiny                 # runs tools/bench_latency.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # the engine is imported only by the subcommands that need it: `--help` stays fast
    from fxllm import LLM, SamplingParams

# Exit status for a bad model or bad generation settings: the same as argparse's usage errors.
USAGE_ERROR = 2
BENCHMARKS = (
    "throughput", "latency", "startup", "kernels", "step_sync", "fp8_gemm", "int_gemm", "vision", "host_step", "attention",
    "decode_settings", "all_reduce", "moe",
)
DEFAULT_INSPECT_DIR = "fxllm_inspect"
DEFAULT_MAX_TOKENS = 64
# Errors the engine raises for user input (a missing or unreadable model, a bad setting);
# anything else is a bug and keeps its traceback.
USER_ERRORS = (OSError, ValueError)

MODEL_HELP = (
    "a local Hugging Face model directory or a .gguf file "
    "(default: SmolLM2-135M-Instruct, fetched and converted on first use)"
)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        return run_benchmark(args.workload, args.bench_args)
    try:
        return inspect_model(args) if args.command == "inspect" else generate_text(args)
    except USER_ERRORS as error:
        print(f"fxllm {args.command}: error: {error}", file=sys.stderr)
        return USAGE_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxllm", description="fxllm: a compiler-first offline LLM inference engine with vLLM's offline API."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_inspect(commands)
    _add_generate(commands)
    _add_bench(commands)
    return parser


def _add_inspect(commands: argparse._SubParsersAction) -> None:
    inspect_parser = commands.add_parser(
        "inspect",
        help="compile a model and write what the compiler did (report, graphs, picture, depyf dump)",
        description=(
            "Build the engine (which compiles the model), then write into OUT: report.json and report.md "
            "(pieces, ops per piece, passes, compile time, cache use), graph.graphml (every op), "
            "pieces.graphml and graph.svg (the pieces between attention ops) and depyf/ (Dynamo's "
            "transformed code and each graph stage as .py files)."
        ),
    )
    inspect_parser.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    inspect_parser.add_argument(
        "--level", type=int, choices=(2, 3), default=3,
        help="3: split at every attention op and compile each piece (default); 2: compile one whole graph",
    )
    inspect_parser.add_argument("--out", default=DEFAULT_INSPECT_DIR, help=f"output folder (default: {DEFAULT_INSPECT_DIR})")
    _add_engine_options(inspect_parser)


def _add_generate(commands: argparse._SubParsersAction) -> None:
    generate_parser = commands.add_parser(
        "generate",
        help="complete one or more prompts and print the text",
        description=(
            "Complete each --prompt and print the result. Sampling settings not given come from the "
            "model's generation_config.json (as vLLM does); with none there, sampling is at temperature 1."
        ),
    )
    generate_parser.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    generate_parser.add_argument(
        "--prompt", action="append", required=True, help="text to complete; repeat the option for several prompts"
    )
    generate_parser.add_argument(
        "--chat", action="store_true",
        help="treat each prompt as a user message and apply the model's chat template",
    )
    generate_parser.add_argument("--temperature", type=float, help="0 means greedy (always the likeliest token)")
    generate_parser.add_argument("--top-p", type=float, help="sample only from the smallest token set of this total probability")
    generate_parser.add_argument("--top-k", type=int, help="sample only from the k likeliest tokens (0: all)")
    generate_parser.add_argument(
        "--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
        help=f"most new tokens per prompt (default: {DEFAULT_MAX_TOKENS})",
    )
    generate_parser.add_argument("--seed", type=int, help="make sampling reproducible")
    generate_parser.add_argument(
        "--enforce-eager", action="store_true", help="skip compilation: starts faster, runs slower"
    )
    _add_engine_options(generate_parser)


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-model-len", type=int, default=None,
        help="longest prompt + completion in tokens (default: the model's own limit); smaller saves memory",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: a GPU if there is one)")


def _add_bench(commands: argparse._SubParsersAction) -> None:
    bench_parser = commands.add_parser(
        "bench",
        help="run a benchmark script from the repository's tools/ folder",
        description=(
            "Run tools/bench_WORKLOAD.py with the remaining arguments (see BENCHMARKS.md). "
            "Needs a source checkout of fxllm. `fxllm bench latency --help` shows the script's options."
        ),
    )
    bench_parser.add_argument(
        "workload", choices=BENCHMARKS,
        help=(
            "throughput: many requests (workload T); latency: batch-1 decode (L); startup: load + compile time (S); "
            "kernels: kernels per decoder layer; step_sync: tensor parallelism's per-step broadcast; "
            "fp8_gemm: FP8 GEMM paths per step size (GPU); int_gemm: INT4 / INT8 GEMMs against bf16 (GPU); vision: the VL vision tower eager vs compiled; "
            "host_step: host time of a step, phase by phase; moe: the fused MoE kernel, batch-1 decode and "
            "workload T on the Qwen3-30B-A3B shape (GPU)"
        ),
    )
    bench_parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to the script unchanged")


# ---- the subcommands ---------------------------------------------------------------------


def inspect_model(args: argparse.Namespace) -> int:
    from fxllm import LLM
    from fxllm.inspection import export_graph, summary_lines

    out = Path(args.out)
    compilation = {"level": args.level, "debug_dump_path": str(out / "depyf")}
    llm = LLM(model=args.model, max_model_len=args.max_model_len, device=args.device, compilation_config=compilation)
    exported = export_graph(llm, out)
    for line in summary_lines(llm.compile_report(), llm.llm_engine_config.model.model):
        print(line)
    print(f"\nwrote {exported['ops']} ops in {exported['pieces']} pieces to {out}/:")
    for key in ("report_json", "report_md", "graph", "pieces_graph", "svg"):
        print(f"  {exported[key]}")
    print(f"  {out / 'depyf'}/  (Dynamo's transformed code and the graphs as .py files)")
    return 0


def generate_text(args: argparse.Namespace) -> int:
    from fxllm import LLM

    llm = LLM(
        model=args.model, max_model_len=args.max_model_len, device=args.device, enforce_eager=args.enforce_eager
    )
    params = _sampling_params(llm, args)
    if args.chat:
        conversations = [[{"role": "user", "content": prompt}] for prompt in args.prompt]
        outputs = llm.chat(conversations, params, use_tqdm=False)
    else:
        outputs = llm.generate(args.prompt, params, use_tqdm=False)
    for prompt, output in zip(args.prompt, outputs):
        print(f"--- prompt: {prompt}")
        print(output.outputs[0].text)
    return 0


def _sampling_params(llm: LLM, args: argparse.Namespace) -> SamplingParams:
    """The model's default sampling params with the options the user gave on top."""
    given = {
        "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
        "max_tokens": args.max_tokens, "seed": args.seed,
    }
    # replace() re-runs SamplingParams' validation, so a bad value gets the engine's own message.
    return replace(llm.get_default_sampling_params(), **{k: v for k, v in given.items() if v is not None})


def run_benchmark(workload: str, bench_args: list[str]) -> int:
    script = _tools_dir() / f"bench_{workload}.py"
    if not script.is_file():
        print(
            f"fxllm bench: error: {script} not found. The benchmarks live in the tools/ folder of fxllm's "
            "source repository, which this installation does not include: clone the repository and "
            "install it with `pip install -e .`, then run `fxllm bench` again.",
            file=sys.stderr,
        )
        return USAGE_ERROR
    # The script's output goes straight to our stdout/stderr, so tables appear as they are printed.
    return subprocess.run([sys.executable, str(script), *bench_args]).returncode


def _tools_dir() -> Path:
    """tools/ of the source checkout this package was installed from (editable install) or runs in."""
    return Path(__file__).resolve().parent.parent / "tools"


if __name__ == "__main__":
    sys.exit(main())
