"""Embeddings, as vLLM's embed example writes them."""

import argparse

from fxllm import LLM

prompts = ["Hello, my name is", "The president of the United States is", "The capital of France is"]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    args = parser.parse_args(argv)
    llm = LLM(model=args.model, runner="pooling", enforce_eager=True)
    outputs = llm.embed(prompts)
    for prompt, output in zip(prompts, outputs):
        embeds = output.outputs.embedding
        print(f"Prompt: {prompt!r} \nEmbeddings: {embeds[:4]} (size={len(embeds)})")
    return outputs


if __name__ == "__main__":
    main()
