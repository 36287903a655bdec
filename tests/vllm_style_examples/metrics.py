"""Metrics after a batch, read as vLLM's metrics example reads them."""

import argparse

from fxllm import LLM, SamplingParams
from fxllm.v1.metrics.reader import Counter, Gauge, Histogram, Vector

prompts = ["Hello, my name is", "The capital of France is"]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    args = parser.parse_args(argv)
    llm = LLM(model=args.model, disable_log_stats=False, enforce_eager=True, max_model_len=128)
    llm.generate(prompts, SamplingParams(temperature=0.8, top_p=0.95, max_tokens=8))
    values = {}
    for metric in llm.get_metrics():
        if isinstance(metric, Gauge):
            print(f"{metric.name} (gauge) = {metric.value}")
        elif isinstance(metric, Counter):
            print(f"{metric.name} (counter) = {metric.value}")
            values.setdefault(metric.name, metric.value)
        elif isinstance(metric, Vector):
            print(f"{metric.name} (vector) = {metric.values}")
        elif isinstance(metric, Histogram):
            print(f"{metric.name} (histogram) sum = {metric.sum} count = {metric.count}")
            for bucket_le, value in metric.buckets.items():
                print(f"    {bucket_le} = {value}")
    return values


if __name__ == "__main__":
    main()
