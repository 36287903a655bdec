"""Prefix caching: the same answers with and without it, the shared prefix computed once."""

import argparse

from fxllm import LLM, SamplingParams
from fxllm.distributed import cleanup_dist_env_and_memory

prefix = "You are an expert school principal, skilled in effectively managing faculty and staff. " * 2
prompts = ["Hello, my name is", "The president of the United States is", "The capital of France is"]
generating_prompts = [prefix + prompt for prompt in prompts]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    args = parser.parse_args(argv)
    sampling_params = SamplingParams(temperature=0.0, max_tokens=8)
    regular_llm = LLM(model=args.model, enforce_eager=True, max_model_len=256, enable_prefix_caching=False)
    regular = regular_llm.generate(generating_prompts, sampling_params)
    del regular_llm
    cleanup_dist_env_and_memory()
    prefix_cached_llm = LLM(model=args.model, enforce_eager=True, max_model_len=256, enable_prefix_caching=True)
    prefix_cached_llm.generate(generating_prompts[0], sampling_params)  # warms the cache
    cached = prefix_cached_llm.generate(generating_prompts, sampling_params)
    same = all(r.outputs[0].text == c.outputs[0].text for r, c in zip(regular, cached))
    print(f"Generated answers are the same: {same}")
    return regular, cached


if __name__ == "__main__":
    main()
