"""Kernels launched per decoder layer per decode step at batch 1, with the FX passes off and on.

Counts every device kernel the torch profiler sees over ``--steps`` decode steps
(CUDA graphs off, so each launch is visible), per step and per decoder layer, and
lists the most frequent kernels of one step. The layer count divides everything
(the embedding, final norm, lm_head and sampling add about one layer's worth).

    python tools/bench_kernels.py --shape qwen3-0.6b
    python tools/bench_kernels.py --shape tiny --device cpu --no-inductor   # CPU smoke run: counts CPU ops
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import random_model  # noqa: E402  (tools/ is not a package)

PROMPT_TOKENS = 16
PASS_SETTINGS = {
    "inductor alone": {"enable_noop": False, "enable_fusion": False},
    "no-op elimination": {"enable_noop": True, "enable_fusion": False},
    "every pass": {"enable_noop": True, "enable_fusion": True, "enable_qk_norm_rope_fusion": True, "enable_rms_norm_fusion": True},
}
TOP_KERNELS = 24


def count_kernels(model_dir: Path, device: str, pass_config: dict, steps: int, use_inductor: bool = True) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from fxllm import LLM, SamplingParams

    llm = LLM(
        model=str(model_dir), device=device, max_model_len=PROMPT_TOKENS + steps + 8, enable_prefix_caching=False,
        compilation_config={"cudagraph_mode": "NONE", "pass_config": pass_config, "use_inductor": use_inductor},
    )
    prompt = {"prompt_token_ids": list(range(2, 2 + PROMPT_TOKENS))}
    on_gpu = llm.llm_engine_config.device.type == "cuda"
    activity = ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU

    def kernels(tokens: int) -> Counter:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        llm.generate(prompt, params, use_tqdm=False)  # warm-up
        with profile(activities=[activity]) as prof:
            llm.generate(prompt, params, use_tqdm=False)
        wanted = (lambda e: e.device_type == torch.autograd.DeviceType.CUDA) if on_gpu else (lambda e: True)
        return Counter(e.name for e in prof.events() if wanted(e))

    # Steps beyond the first token are decode steps: the difference isolates them.
    decode = kernels(steps + 1)
    decode.subtract(kernels(1))
    layers = llm.llm_engine_config.model.hf_config.num_hidden_layers
    report = llm.compile_report()
    total = sum(decode.values())
    result = {
        "passes": report.passes,
        "kernels_per_step": round(total / steps, 1),
        "kernels_per_layer": round(total / steps / layers, 2),
        "top_kernels_per_step": {name: round(n / steps, 2) for name, n in decode.most_common(TOP_KERNELS)},
    }
    del llm
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-0.6b", help="random weights of a named shape (tools/random_model.py)")
    parser.add_argument("--steps", type=int, default=8, help="decode steps profiled")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default="bench_kernels.json")
    parser.add_argument("--no-inductor", action="store_true", help="pieces run eagerly (a quick smoke run)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = random_model.write_random_model(args.shape, Path(scratch) / args.shape)
        rows = {
            name: count_kernels(model_dir, args.device, config, args.steps, use_inductor=not args.no_inductor)
            for name, config in PASS_SETTINGS.items()
        }
    print(f"{'setting':<16} {'kernels/step':>12} {'kernels/layer':>13}  pass matches")
    for name, row in rows.items():
        print(f"{name:<16} {row['kernels_per_step']:>12} {row['kernels_per_layer']:>13}  {row['passes']}")
    for name, row in rows.items():
        print(f"\n{name}: most frequent kernels per step")
        for kernel, count in row["top_kernels_per_step"].items():
            print(f"  {count:>6}  {kernel[:100]}")
    Path(args.json).write_text(json.dumps({"shape": args.shape, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
