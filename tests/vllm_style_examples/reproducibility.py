"""Reproducible sampling: a global seed and per-request seeds give the same outputs twice."""

import argparse

from fxllm import LLM, SamplingParams

prompts = ["Hello, my name is", "The president of the United States is"]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    args = parser.parse_args(argv)
    llm = LLM(model=args.model, seed=0, enforce_eager=True, max_model_len=128)
    runs = []
    for _ in range(2):
        seeded = llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=8, seed=42))
        runs.append([o.outputs[0].text for o in seeded])
    print(f"Same outputs: {runs[0] == runs[1]}")
    return runs


if __name__ == "__main__":
    main()
