"""Workload C: fxllm vs HF transformers `generate` on the same prompts, same process, CPU.

Prints a table and writes JSON. Both sides generate exactly --max-tokens tokens per
prompt (EOS ignored), greedy, fp32.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fxllm import LLM, SamplingParams, default_model

BASE_PROMPTS = [
    "The capital of France is",
    "Explain in one paragraph why the sky is blue.",
    "Write a short poem about compilers.",
    "List three uses of a paged KV cache:",
]


def bench_fxllm(llm: LLM, prompts: list[str], max_tokens: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


def bench_hf(model_dir: str, prompts: list[str], max_tokens: int) -> float:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        model.generate(**tokenizer(prompts[:1], return_tensors="pt"), max_new_tokens=2, do_sample=False)
        start = time.perf_counter()
        model.generate(**batch, **kwargs)
        elapsed = time.perf_counter() - start
    return len(prompts) * max_tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="model directory (default: the default model)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 3], help="fxllm compilation levels to run")
    parser.add_argument("--json", default="bench_cpu.json")
    args = parser.parse_args()
    model_dir = args.model or default_model()
    engines = {level: LLM(model=model_dir, device="cpu", max_model_len=1024, compilation_config=level) for level in args.levels}
    rows = []
    for batch_size in args.batch_sizes:
        prompts = [BASE_PROMPTS[i % len(BASE_PROMPTS)] + f" ({i})" for i in range(batch_size)]
        row = {"batch": batch_size, "hf_tok_s": round(bench_hf(model_dir, prompts, args.max_tokens), 1)}
        for level, llm in engines.items():
            row[f"level{level}_tok_s"] = round(bench_fxllm(llm, prompts, args.max_tokens), 1)
        rows.append(row)
    header = f"{'batch':>5} {'HF tok/s':>10} " + " ".join(f"{'fxllm L' + str(level) + ' tok/s':>16}" for level in args.levels)
    print(header)
    for row in rows:
        cells = " ".join(f"{row[f'level{level}_tok_s']:>16}" for level in args.levels)
        print(f"{row['batch']:>5} {row['hf_tok_s']:>10} {cells}")
    with open(args.json, "w") as handle:
        json.dump({"model": model_dir, "max_tokens": args.max_tokens, "threads": torch.get_num_threads(), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
