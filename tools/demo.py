"""`make demo`: fetch the default model if needed, generate for a few prompts, print tokens/s."""

from __future__ import annotations

import time

from fxllm import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "The three primary colors are",
    "A good way to learn a new programming language is",
    "Once upon a time, in a small village,",
]


def main() -> None:
    llm = LLM()  # the default model, SmolLM2-135M-Instruct
    params = SamplingParams(temperature=0.0, max_tokens=48)
    start = time.perf_counter()
    outputs = llm.generate(PROMPTS, params)
    elapsed = time.perf_counter() - start
    for output in outputs:
        print(f"\n{output.prompt!r} ->{output.outputs[0].text!r}")
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    device = llm.llm_engine_config.device
    print(f"\n{num_tokens} tokens for {len(PROMPTS)} prompts in {elapsed:.2f} s: {num_tokens / elapsed:.1f} tokens/s on {device}")


if __name__ == "__main__":
    main()
