"""Workload T (BENCHMARKS.md): offline throughput on random weights in the Qwen3-0.6B shape.

256 requests from ``random.seed(0)``: prompt ids ``randint(0, 10000)``, prompt lengths
uniform in [100, 1024], ``max_tokens`` uniform in [100, 1024], EOS ignored, temperature
0.6, ``max_model_len=4096`` (142,827 prompt and 133,966 output tokens). Reports output
tokens / wall seconds of ``generate`` (start-up excluded) and total tokens / s.

``--hf-compare N`` also runs HF transformers ``generate`` on the first N requests (one
left-padded batch, sampling, max_new_tokens = the largest of the N, counting only the
tokens the requests asked for) and fxllm on the same N requests, in the same run.

    python tools/bench_throughput.py --hf-compare 64                    # GPU
    python tools/bench_throughput.py --shape tiny --num-requests 4 \\
        --input-len 8 32 --output-len 4 16 --enforce-eager               # CPU smoke run

Prefix caching is off: the random prompts share no prefix, so it could only help a
repeated run, and the comparator repeats the first N requests.

``--profile-steps N`` runs the workload once more under the torch profiler and reports
N engine steps taken after ``--profile-after`` steps (past the prefill-heavy start):
wall ms per step, kernel ms per step and the kernels that take the most of it.

``--step-log`` records every step of the main run (requests, tokens, context, wall time)
and sums them by kind: steps of decodes alone (one CUDA graph each) against steps that
carry prompt tokens, and for the decode steps the KV cache bytes they read per second.
Under async scheduling a step's wall time is the time between launches, which in a
steady run is the device's time for the step.

``--structured`` runs the workload a second time with every request under a JSON schema
(structured outputs on xgrammar) and reports its throughput beside the free run's, with
the host milliseconds per step that filling and copying the token bitmasks takes. The
random model then gets a real tokenizer (``--structured-tokenizer``, the default model's
if not given: 49,152 tokens, the rest of the vocabulary is padding), since JSON cannot be
written with the word-level one. Requests end where their JSON does or at max_tokens.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
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
    from fxllm import LLM

NUM_REQUESTS = 256
SEED = 0
MAX_PROMPT_ID = 10_000  # randint is inclusive: ids 0 ... 10000
INPUT_LEN = (100, 1024)
OUTPUT_LEN = (100, 1024)
TEMPERATURE = 0.6
MAX_MODEL_LEN = 4096
WARMUP_PROMPT = list(range(2, 18))
WARMUP_TOKENS = 4
HF_PAD_ID = 0  # any id: padded positions are masked out
SHAPES = ("qwen3-0.6b", "tiny")
PROFILE_AFTER_STEPS = 200  # past the first steps, which prefill most of the 256 prompts
PROFILE_TOP_KERNELS = 15
PROFILER_WARMUP_STEPS = 1  # the profiler's own start-up lands here, not in the measured steps
STEP_LOG_BATCH_BUCKETS = (1, 32, 64, 128, 192, 256)  # decode steps summed by batch size up to each bound
# --structured: a record with nested objects, arrays, enums and bounded integers. Strings and arrays
# are unbounded, so that random weights write long outputs as the free run does.
STRUCTURED_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"]},
        "notes": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "role", "address", "notes"],
}


@dataclass
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    def head(self, count: int) -> "Workload":
        return Workload(self.prompts[:count], self.max_tokens[:count])


def make_workload(num_requests: int, input_len: tuple[int, int], output_len: tuple[int, int]) -> Workload:
    """nano-vllm's bench.py draws, in its order: every prompt first, then every max_tokens."""
    rng = random.Random(SEED)
    prompts = [[rng.randint(0, MAX_PROMPT_ID) for _ in range(rng.randint(*input_len))] for _ in range(num_requests)]
    max_tokens = [rng.randint(*output_len) for _ in range(num_requests)]
    return Workload(prompts, max_tokens)


def bench_fxllm(llm: LLM, workload: Workload, schema: dict | None = None) -> dict:
    from fxllm import SamplingParams
    from fxllm.sampling_params import StructuredOutputsParams

    constraint = None if schema is None else StructuredOutputsParams(json=schema)
    params = [SamplingParams(temperature=TEMPERATURE, ignore_eos=True, max_tokens=n, structured_outputs=constraint)
              for n in workload.max_tokens]
    prompts = [{"prompt_token_ids": ids} for ids in workload.prompts]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    output_tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
    prompt_tokens = sum(map(len, workload.prompts))
    return {
        "requests": len(prompts),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "seconds": round(seconds, 3),
        "output_tok_s": round(output_tokens / seconds, 1),
        "total_tok_s": round((prompt_tokens + output_tokens) / seconds, 1),
    }


@dataclass
class StepRecord:
    requests: int
    tokens: int
    context: int  # tokens of K/V the step's attention reads (each request's context after the step)
    seconds: float

    @property
    def decode_only(self) -> bool:
        return self.tokens == self.requests


def run_with_step_log(llm: LLM, workload: Workload) -> tuple[dict, list[StepRecord]]:
    """The workload, with one record per engine step that scheduled anything."""
    records: list[StepRecord] = []

    class StepLog:
        def on_phase(self, phase: str, seconds: float) -> None:
            pass

        def on_step_end(self, scheduled, seconds: float) -> None:
            if scheduled.scheduled:
                context = sum(s.request.num_computed_tokens for s in scheduled.scheduled)  # already advanced
                records.append(StepRecord(len(scheduled.scheduled), scheduled.num_tokens, context, seconds))

    observer = StepLog()
    llm.llm_engine.add_step_observer(observer)
    try:
        result = bench_fxllm(llm, workload)
    finally:
        llm.llm_engine.remove_step_observer(observer)
    return result, records


def summarize_steps(records: list[StepRecord], kv_bytes_per_token: int, preemptions: int) -> dict:
    """Steps and seconds by kind; for decode steps, by batch size, with the KV bytes read per second."""
    def summary(group: list[StepRecord]) -> dict:
        seconds = sum(r.seconds for r in group)
        context = sum(r.context for r in group)
        return {
            "steps": len(group),
            "seconds": round(seconds, 3),
            "ms_per_step": round(seconds * 1e3 / len(group), 3) if group else 0.0,
            "mean_requests": round(sum(r.requests for r in group) / len(group), 1) if group else 0.0,
            "tokens": sum(r.tokens for r in group),
            # Significant digits, not decimals: a CPU smoke run's steps read kilobytes.
            "kv_gb_per_s": float(f"{context * kv_bytes_per_token / seconds / 1e9:.4g}") if seconds else 0.0,
        }

    decodes = [r for r in records if r.decode_only]
    by_batch, low = {}, 0
    for high in STEP_LOG_BATCH_BUCKETS:
        by_batch[f"{low + 1}-{high}"] = summary([r for r in decodes if low < r.requests <= high])
        low = high
    return {
        "preemptions": preemptions,
        "all": summary(records),
        "with_prompt_tokens": summary([r for r in records if not r.decode_only]),
        "decode_only": summary(decodes),
        "decode_only_by_batch": by_batch,
    }


def run_structured(llm: LLM, workload: Workload) -> dict:
    """The workload with every request under STRUCTURED_SCHEMA, with host ms per step by phase.
    The schema is compiled first, by a warm-up request (a one-off cost, reported apart)."""
    from fxllm import SamplingParams
    from fxllm.sampling_params import StructuredOutputsParams

    start = time.perf_counter()
    warmup = SamplingParams(max_tokens=WARMUP_TOKENS, structured_outputs=StructuredOutputsParams(json=STRUCTURED_SCHEMA))
    llm.generate({"prompt_token_ids": WARMUP_PROMPT}, warmup, use_tqdm=False)
    compile_seconds = time.perf_counter() - start
    seconds_by_phase: dict[str, float] = {}
    steps = []

    class PhaseTotals:
        def on_phase(self, phase: str, seconds: float) -> None:
            seconds_by_phase[phase] = seconds_by_phase.get(phase, 0.0) + seconds

        def on_step_end(self, scheduled, seconds: float) -> None:
            if scheduled.scheduled:
                steps.append(seconds)

    observer = PhaseTotals()
    llm.llm_engine.add_step_observer(observer)
    try:
        result = bench_fxllm(llm, workload, STRUCTURED_SCHEMA)
    finally:
        llm.llm_engine.remove_step_observer(observer)
    per_step = {phase: round(total * 1e3 / len(steps), 3) for phase, total in seconds_by_phase.items()}
    result["steps"] = len(steps)
    result["schema_compile_and_warmup_s"] = round(compile_seconds, 3)
    result["grammar_mask_ms_per_step"] = per_step.get("grammar masks", 0.0)
    result["host_ms_per_step_by_phase"] = per_step
    return result


def use_tokenizer(model_dir: Path, source: str | None) -> None:
    """Replace the random model's word-level tokenizer by a real one (the default model's)."""
    from transformers import AutoTokenizer

    if source is None:
        from fxllm import default_model

        source = default_model()
    AutoTokenizer.from_pretrained(source).save_pretrained(model_dir)


def profile_steps(llm: LLM, workload: Workload, skip: int, steps: int, top: int) -> dict:
    """``steps`` engine steps of the workload, after ``skip`` and a warm-up step, under the
    profiler (device kernels on a GPU, operators on a CPU), per step."""
    from torch.profiler import ProfilerActivity, profile, schedule

    on_gpu = llm.llm_engine_config.device.type == "cuda"
    walls: list[float] = []

    class StepProfiler:
        def on_phase(self, phase: str, seconds: float) -> None:
            pass

        def on_step_end(self, scheduled, seconds: float) -> None:
            if first_active <= profiler.step_num < first_active + steps:
                walls.append(seconds)
            profiler.step()

    activity = ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU
    first_active = skip + PROFILER_WARMUP_STEPS
    plan = schedule(wait=skip, warmup=PROFILER_WARMUP_STEPS, active=steps, repeat=1)
    observer = StepProfiler()
    with profile(activities=[activity], schedule=plan) as profiler:
        llm.llm_engine.add_step_observer(observer)
        try:
            bench_fxllm(llm, workload)
        finally:
            llm.llm_engine.remove_step_observer(observer)
    if not walls:
        raise ValueError(f"the workload ran out before step {first_active + 1}: lower --profile-after")
    per_kernel = kernel_ms(profiler, on_gpu, per=len(walls))
    return {
        "steps": len(walls),
        "after_steps": skip,
        "wall_ms_per_step": round(sum(walls) * 1e3 / len(walls), 3),
        "kernel_ms_per_step": round(sum(per_kernel.values()), 3),
        "top_kernels_ms_per_step": top_kernels(per_kernel, top),
    }


def bench_hf(model_dir: Path, workload: Workload, device: torch.device) -> dict:
    """HF ``generate`` on one left-padded batch; only the tokens each request asked for count."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    longest = max(map(len, workload.prompts))
    input_ids = torch.full((len(workload.prompts), longest), HF_PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(workload.prompts):
        input_ids[row, longest - len(ids):] = torch.tensor(ids)
        attention_mask[row, longest - len(ids):] = 1
    new_tokens = max(workload.max_tokens)
    sampling = dict(do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0, pad_token_id=HF_PAD_ID)
    with torch.inference_mode():
        warmup = torch.tensor([WARMUP_PROMPT], device=device)
        model.generate(warmup, max_new_tokens=WARMUP_TOKENS, **sampling)
        _synchronize(device)
        start = time.perf_counter()
        # min_new_tokens: the batch runs to max_new_tokens whatever EOS is sampled (ignore_eos).
        model.generate(input_ids.to(device), attention_mask=attention_mask.to(device),
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, **sampling)
        _synchronize(device)
        seconds = time.perf_counter() - start
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # give the memory back before fxllm sizes its KV cache
    useful = sum(workload.max_tokens)
    return {"requests": len(workload.prompts), "max_new_tokens": new_tokens, "useful_tokens": useful,
            "seconds": round(seconds, 3), "useful_tok_s": round(useful / seconds, 1)}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


PASSES_OFF = {"enable_noop": False, "enable_fusion": False}


def _engine(args: argparse.Namespace, model_dir: Path, pass_config: dict | None, async_scheduling: bool | None = None) -> LLM:
    """An engine as the arguments ask, warmed up (the first step allocates and tunes)."""
    from fxllm import LLM, SamplingParams

    compilation = {"level": args.level}
    if pass_config is not None:
        compilation["pass_config"] = pass_config
    llm = LLM(model=str(model_dir), max_model_len=args.max_model_len, device=args.device,
              enforce_eager=args.enforce_eager, compilation_config=compilation, enable_prefix_caching=False,
              async_scheduling=async_scheduling)
    llm.generate({"prompt_token_ids": WARMUP_PROMPT}, SamplingParams(max_tokens=WARMUP_TOKENS, ignore_eos=True),
                 use_tqdm=False)
    return llm


def run(args: argparse.Namespace, model_dir: Path) -> dict:
    from fxllm.config import resolve_device

    workload = make_workload(args.num_requests, tuple(args.input_len), tuple(args.output_len))
    result: dict = {"shape": args.shape, "num_requests": args.num_requests,
                    "input_len": args.input_len, "output_len": args.output_len}
    # HF first: on a GPU the engine takes most of the memory for its KV cache.
    if args.hf_compare:
        result["hf"] = bench_hf(model_dir, workload.head(args.hf_compare), resolve_device(args.device))
    start = time.perf_counter()
    llm = _engine(args, model_dir, args.pass_config)
    result["startup_s"] = round(time.perf_counter() - start, 2)  # warm-up included
    result["device"] = torch.cuda.get_device_name() if llm.llm_engine_config.device.type == "cuda" else "cpu"
    result["level"] = 0 if args.enforce_eager else args.level
    if args.step_log:
        result["fxllm"], records = run_with_step_log(llm, workload)
        runner = llm.llm_engine.runner
        kv_bytes_per_token = runner.bytes_per_block() // runner.block_size
        result["steps"] = summarize_steps(records, kv_bytes_per_token, llm.llm_engine.scheduler.num_preemptions)
        result["kv_cache_blocks"] = runner.num_blocks
    else:
        result["fxllm"] = bench_fxllm(llm, workload)
    if args.hf_compare:
        result["fxllm_same_as_hf"] = bench_fxllm(llm, workload.head(args.hf_compare))
        result["speedup_vs_hf"] = round(result["fxllm_same_as_hf"]["output_tok_s"] / result["hf"]["useful_tok_s"], 2)
    if args.profile_steps:
        result["profile"] = profile_steps(llm, workload, args.profile_after, args.profile_steps, PROFILE_TOP_KERNELS)
    result["passes"] = llm.compile_report().passes
    result["async_scheduling"] = llm.llm_engine.async_scheduling
    on_gpu = llm.llm_engine_config.device.type == "cuda"
    del llm
    if args.compare_passes_off:
        _release(on_gpu)
        result["fxllm_passes_off"] = bench_fxllm(_engine(args, model_dir, PASSES_OFF), workload)
    if args.compare_sync:
        _release(on_gpu)
        result["fxllm_sync"] = bench_fxllm(_engine(args, model_dir, args.pass_config, async_scheduling=False), workload)
    if args.compare_torch_sampler:
        _release(on_gpu)
        result["fxllm_torch_sampler"] = _run_with_torch_sampler(args, model_dir, workload)
    if args.structured:
        _release(on_gpu)
        result["fxllm_structured"] = run_structured(_engine(args, model_dir, args.pass_config), workload)
    return result


def _run_with_torch_sampler(args: argparse.Namespace, model_dir: Path, workload: Workload) -> dict:
    """The workload on a fresh engine whose sampler takes its torch path for every batch
    (on a GPU, plain temperature sampling otherwise runs as one Triton pass)."""
    llm = _engine(args, model_dir, args.pass_config)
    llm.llm_engine.runner.sampler.one_pass_kernel = False
    return bench_fxllm(llm, workload)


def _release(on_gpu: bool) -> None:
    """Free the last engine: the next one sizes its KV cache from free memory."""
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()


def print_table(result: dict) -> None:
    print(f"{'engine':<34} {'requests':>8} {'output tok/s':>12} {'total tok/s':>11} {'seconds':>8}")
    fx = result["fxllm"]
    print(f"{'fxllm level ' + str(result['level']):<34} {fx['requests']:>8} {fx['output_tok_s']:>12} "
          f"{fx['total_tok_s']:>11} {fx['seconds']:>8}")
    others = (("fxllm_passes_off", "FX passes off"), ("fxllm_sync", "async scheduling off"),
              ("fxllm_torch_sampler", "torch sampling path"), ("fxllm_structured", "JSON schema"))
    for key, label in others:
        if key in result:
            other = result[key]
            print(f"{'fxllm level ' + str(result['level']) + ', ' + label:<34} {other['requests']:>8} "
                  f"{other['output_tok_s']:>12} {other['total_tok_s']:>11} {other['seconds']:>8}")
    if "fxllm_structured" in result:
        structured = result["fxllm_structured"]
        print(f"JSON schema run: {structured['steps']} steps, {structured['grammar_mask_ms_per_step']} host ms per step "
              f"filling and copying the token bitmasks")
    if "hf" in result:
        hf, same = result["hf"], result["fxllm_same_as_hf"]
        print(f"{'HF generate (useful tokens)':<34} {hf['requests']:>8} {hf['useful_tok_s']:>12} "
              f"{'':>11} {hf['seconds']:>8}")
        print(f"{'fxllm, same requests':<34} {same['requests']:>8} {same['output_tok_s']:>12} "
              f"{same['total_tok_s']:>11} {same['seconds']:>8}")
        print(f"fxllm / HF on the same requests: {result['speedup_vs_hf']}x")


def print_steps(steps: dict) -> None:
    print(f"\nsteps of the main run ({steps['preemptions']} preemptions); KV GB/s = context read by attention / wall")
    print(f"{'steps':<26} {'count':>6} {'seconds':>8} {'ms/step':>8} {'requests':>9} {'tokens':>8} {'KV GB/s':>8}")
    rows = [("all", steps["all"]), ("with prompt tokens", steps["with_prompt_tokens"]),
            ("decodes only", steps["decode_only"])]
    rows += [(f"  decodes, batch {bucket}", group) for bucket, group in steps["decode_only_by_batch"].items()]
    for label, group in rows:
        print(f"{label:<26} {group['steps']:>6} {group['seconds']:>8} {group['ms_per_step']:>8} "
              f"{group['mean_requests']:>9} {group['tokens']:>8} {group['kv_gb_per_s']:>8}")


def print_profile(profile: dict) -> None:
    title = (f"profile of {profile['steps']} steps after step {profile['after_steps']}: "
             f"{profile['wall_ms_per_step']} ms wall, {profile['kernel_ms_per_step']} ms of kernels per step")
    print_kernels(title, profile["top_kernels_ms_per_step"])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="qwen3-0.6b", help="random weights of this shape")
    parser.add_argument("--num-requests", type=int, default=NUM_REQUESTS)
    parser.add_argument("--input-len", type=int, nargs=2, default=list(INPUT_LEN), metavar=("MIN", "MAX"),
                        help="prompt lengths, uniform in [MIN, MAX] (shrink for a CPU run)")
    parser.add_argument("--output-len", type=int, nargs=2, default=list(OUTPUT_LEN), metavar=("MIN", "MAX"),
                        help="max_tokens, uniform in [MIN, MAX] (shrink for a CPU run)")
    parser.add_argument("--max-model-len", type=int, default=MAX_MODEL_LEN)
    parser.add_argument("--level", type=int, choices=(0, 1, 2, 3), default=3, help="compilation level")
    parser.add_argument("--enforce-eager", action="store_true", help="no compilation, no CUDA graphs")
    parser.add_argument("--hf-compare", type=int, default=0, metavar="N",
                        help="also run HF transformers generate, and fxllm, on the first N requests")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compare-passes-off", action="store_true",
                        help="also run the workload with the FX passes off (enable_noop/enable_fusion False)")
    parser.add_argument("--compare-torch-sampler", action="store_true",
                        help="also run the workload with the sampler's torch path (not the one-pass GPU kernel)")
    parser.add_argument("--compare-sync", action="store_true",
                        help="also run the workload with async scheduling off (each step waits for the last one's tokens)")
    parser.add_argument("--structured", action="store_true",
                        help="also run the workload with every request under a JSON schema (see above)")
    parser.add_argument("--structured-tokenizer", default=None, metavar="DIR",
                        help="the tokenizer of --structured runs (default: the default model's)")
    parser.add_argument("--pass-config", type=json.loads, default=None, metavar="JSON",
                        help='pass_config of the main run, e.g. \'{"enable_qk_norm_rope_fusion": false}\'')
    parser.add_argument("--profile-steps", type=int, default=0, metavar="N",
                        help="also profile N engine steps of another run of the workload (see above)")
    parser.add_argument("--profile-after", type=int, default=PROFILE_AFTER_STEPS, metavar="K",
                        help="steps to let pass before the profiled ones")
    parser.add_argument("--step-log", action="store_true",
                        help="record every step of the main run and sum them by kind (see above)")
    parser.add_argument("--json", default="bench_throughput.json", help="where to write the results")
    args = parser.parse_args()
    if args.num_requests < 1:
        parser.error(f"--num-requests must be >= 1, got {args.num_requests}")
    for name in ("input_len", "output_len"):
        low, high = getattr(args, name)
        if not 1 <= low <= high:
            parser.error(f"--{name.replace('_', '-')} needs 1 <= MIN <= MAX, got {low} {high}")
    if args.input_len[1] + args.output_len[1] > args.max_model_len:
        parser.error(f"the longest prompt + completion ({args.input_len[1] + args.output_len[1]}) exceeds "
                     f"--max-model-len {args.max_model_len}: shorten --input-len/--output-len")
    if args.profile_steps < 0 or args.profile_after < 0:
        parser.error("--profile-steps and --profile-after must be >= 0")
    if not 0 <= args.hf_compare <= args.num_requests:
        parser.error(f"--hf-compare must be in [0, --num-requests={args.num_requests}], got {args.hf_compare}")
    return args


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = random_model.write_random_model(args.shape, Path(scratch) / args.shape)
        if args.structured:
            use_tokenizer(model_dir, args.structured_tokenizer)
        result = run(args, model_dir)
    print_table(result)
    if "steps" in result:
        print_steps(result["steps"])
    if "profile" in result:
        print_profile(result["profile"])
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
