"""Offline generation, as vLLM's basic example writes it (import renamed)."""

from fxllm import LLM, EngineArgs, SamplingParams
from fxllm.utils.argparse_utils import FlexibleArgumentParser

prompts = ["Hello, my name is", "The president of the United States is", "The capital of France is"]


def main(argv=None):
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    parser.add_argument("--max-tokens", type=int, default=16)
    args = vars(parser.parse_args(argv))
    sampling_params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=args.pop("max_tokens"), seed=0)
    llm = LLM(**args)
    outputs = llm.generate(prompts, sampling_params)
    for output in outputs:
        print(f"Prompt: {output.prompt!r}, Generated text: {output.outputs[0].text!r}")
    return outputs


if __name__ == "__main__":
    main()
