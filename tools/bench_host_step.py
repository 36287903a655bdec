"""Host time of an engine step, phase by phase, at several batch sizes.

A step is host work around device work: the scheduler picks the tokens, the step's
inputs are built (numpy, then one copy), the sampling parameters become tensors, the
step is launched, and once its sampled tokens reach the host each request takes its
token (detokenizing, stop checks, freeing). Synchronously these phases add to every
step; under async scheduling (the default on CUDA) they overlap the device's work on
the next step, and "wait for tokens" is where the host waits for the device. This
tool times each phase through the engine's step observer, with the model + sampler as one ("device work":
on a CPU it is the model itself; on a GPU the time to queue it), over decode steps of
--batch-sizes requests of a tiny random model.

    python tools/bench_host_step.py --batch-sizes 1 64 256 --device cpu --dtype float32
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import random_model  # noqa: E402  (tools/ is not a package)

DEFAULT_BATCH_SIZES = (1, 64, 256)
PROMPT_TOKENS = 16
NEW_TOKENS = 32
PHASES = ("schedule", "inputs", "sampling batch", "device work", "rest of launch", "wait for tokens", "bookkeeping")


class PhaseTimer:
    """A step observer (fxllm.runtime.step_observer): seconds spent in each phase, and steps."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0

    def on_phase(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds

    def on_step_end(self, scheduled, seconds: float) -> None:
        self.steps += 1


def measure(model_dir: Path, device: str, dtype: str, batch_size: int, async_scheduling: bool | None) -> dict:
    from fxllm import LLM, SamplingParams

    llm = LLM(
        model=str(model_dir), device=device, dtype=dtype, enforce_eager=True, max_num_seqs=batch_size,
        max_model_len=PROMPT_TOKENS + NEW_TOKENS + 8, enable_prefix_caching=False, async_scheduling=async_scheduling,
    )
    prompts = [{"prompt_token_ids": [2 + (i + j) % 200 for j in range(PROMPT_TOKENS)]} for i in range(batch_size)]
    params = SamplingParams(temperature=0.6, max_tokens=NEW_TOKENS, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    timer = PhaseTimer()
    llm.llm_engine.add_step_observer(timer)
    llm.generate(prompts, params, use_tqdm=False)
    llm.llm_engine.remove_step_observer(timer)
    seconds, steps = timer.seconds, timer.steps
    per_step = {
        "schedule": seconds["schedule"],
        "inputs": seconds["inputs"],
        "sampling batch": seconds["sampling batch"],
        "device work": seconds["device work"],
        "rest of launch": seconds["launch"] - seconds["inputs"] - seconds["sampling batch"] - seconds["device work"],
        "wait for tokens": seconds["wait for tokens"],
        "bookkeeping": seconds["step"] - seconds["launch"] - seconds["schedule"] - seconds["wait for tokens"],
    }
    per_step = {phase: round(value / steps * 1e3, 3) for phase, value in per_step.items()}
    per_step["host total"] = round(sum(v for k, v in per_step.items() if k not in ("device work", "wait for tokens")), 3)
    per_step["step"] = round(seconds["step"] / steps * 1e3, 3)
    return {
        "batch_size": batch_size, "async_scheduling": llm.llm_engine.async_scheduling, "steps": steps,
        "ms_per_step": per_step,
    }


def release_engines() -> None:
    """Free the last engine before the next batch size's engine sizes its KV cache from free memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCH_SIZES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="the model's dtype (float32 keeps a CPU's device work short)")
    parser.add_argument(
        "--async-scheduling", choices=("auto", "on", "off"), default="auto",
        help="launch each step before the previous step's tokens arrive (auto: on for CUDA)",
    )
    parser.add_argument("--json", default="bench_host_step.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = random_model.write_random_model("tiny", Path(scratch) / "tiny")
        asked = {"auto": None, "on": True, "off": False}[args.async_scheduling]
        rows = []
        for batch in args.batch_sizes:
            rows.append(measure(model_dir, args.device, args.dtype, batch, asked))
            release_engines()
    columns = (*PHASES, "host total", "step")
    print(f"{'batch':>5} " + " ".join(f"{c:>15}" for c in columns) + "   (ms per step)")
    for row in rows:
        print(f"{row['batch_size']:>5} " + " ".join(f"{row['ms_per_step'][c]:>15}" for c in columns))
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
