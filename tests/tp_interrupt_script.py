"""Run as a script in its own process group: a tensor-parallel engine on CPU, Ctrl-C'd as a
terminal would (SIGINT to the whole group) part-way through a generate, then asked again.

The signal is sent from another thread once the call has run the given share of its steps,
so it lands wherever rank 0 happens to be: inside a step or between two. Prints one JSON
line: the tokens before, whether the interrupt surfaced as KeyboardInterrupt, the tokens
after, and whether the workers stayed the same processes."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

from fxllm import LLM, SamplingParams

PROMPTS = [{"prompt_token_ids": [5 + i, 17, 42, 99, 3, 7 * i + 1]} for i in range(6)]


class StepCounter:
    def __init__(self, signal_at: int | None = None):
        self.steps, self.signal_at, self.sender = 0, signal_at, None

    def on_phase(self, phase: str, seconds: float) -> None:
        pass

    def on_step_end(self, scheduled, seconds: float) -> None:
        self.steps += 1
        if self.steps == self.signal_at:
            self.sender = threading.Thread(target=os.killpg, args=(os.getpgid(0), signal.SIGINT))
            self.sender.start()


def main(model_dir: str, fraction: float) -> None:
    llm = LLM(model=model_dir, enforce_eager=True, max_model_len=64, tensor_parallel_size=2)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    counter = StepCounter()
    llm.llm_engine.add_step_observer(counter)
    before = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    llm.llm_engine.remove_step_observer(counter)
    pids = llm.llm_engine.executor.worker_pids
    interrupter = StepCounter(signal_at=max(1, int(counter.steps * fraction)))
    llm.llm_engine.add_step_observer(interrupter)
    interrupted = False
    try:
        llm.generate(PROMPTS, params, use_tqdm=False)
    except KeyboardInterrupt:
        interrupted = True
    interrupter.sender.join()
    llm.llm_engine.remove_step_observer(interrupter)
    after = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    print(json.dumps({
        "before": before, "interrupted": interrupted, "after": after,
        "same_workers": llm.llm_engine.executor.worker_pids == pids,
    }))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
