"""A custom logits processor end to end, as vLLM's offline example has it (the imports are
vLLM's with ``vllm`` renamed): a batch-level processor that forces one token on the
requests whose ``extra_args`` name a ``target_token`` and leaves the others alone, the
same built from a per-request processor with ``AdapterLogitsProcessor``, and vLLM 0.11's
per-request callable in ``SamplingParams(logits_processors=...)``.

    python tests/logits_processor_example.py --model /path/to/model
"""

from __future__ import annotations

import argparse

import torch

from fxllm import LLM, SamplingParams
from fxllm.config import VllmConfig
from fxllm.v1.sample.logits_processor import AdapterLogitsProcessor, BatchUpdate, LogitsProcessor
from fxllm.v1.sample.logits_processor.builtin import process_dict_updates


def target_token_of(params: SamplingParams) -> int | None:
    return (params.extra_args or {}).get("target_token")


class TargetTokenLogitsProcessor(LogitsProcessor):
    """Every token but ``extra_args["target_token"]`` to -inf, on the rows that ask for it."""

    @classmethod
    def validate_params(cls, params: SamplingParams) -> None:
        target = target_token_of(params)
        if target is not None and (not isinstance(target, int) or isinstance(target, bool)):
            raise ValueError(f"target_token must be an int, got {target!r}")

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        self.targets: dict[int, int] = {}  # batch index -> the token its request must take

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the argmax

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.targets, batch_update, lambda params, _prompt, _output: target_token_of(params))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.targets:
            return logits
        rows = torch.tensor(list(self.targets), dtype=torch.long, device=logits.device)
        tokens = torch.tensor(list(self.targets.values()), dtype=torch.long, device=logits.device)
        kept = logits[rows, tokens]
        logits[rows] = float("-inf")
        logits[rows, tokens] = kept
        return logits


class ForceToken:
    """A per-request processor: (output ids, one row of logits) -> that row, all but one token masked."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        kept = logits[self.token].clone()
        logits.fill_(float("-inf"))
        logits[self.token] = kept
        return logits


class AdaptedTargetTokenLogitsProcessor(AdapterLogitsProcessor):
    """The same behaviour from a per-request processor."""

    @classmethod
    def validate_params(cls, params: SamplingParams) -> None:
        TargetTokenLogitsProcessor.validate_params(params)

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params: SamplingParams) -> ForceToken | None:
        target = target_token_of(params)
        return None if target is None else ForceToken(target)


PROMPTS = ["Hello, my name is", "The capital of France is", "Once upon a time", "The quick brown fox"]


def sampling_params(target_tokens: tuple[int, int], max_tokens: int = 12) -> list[SamplingParams]:
    """Half the requests ask for a target token, half do not."""
    first, second = target_tokens
    return [
        SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args={"target_token": first}),
        SamplingParams(temperature=0.0, max_tokens=max_tokens),
        SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args={"target_token": second}),
        SamplingParams(temperature=0.0, max_tokens=max_tokens),
    ]


def run(model: str, processor: type[LogitsProcessor] | str = TargetTokenLogitsProcessor,
        target_tokens: tuple[int, int] = (67, 128), **engine_args) -> list:
    llm = LLM(model=model, logits_processors=[processor], **engine_args)
    outputs = llm.generate(PROMPTS, sampling_params(target_tokens), use_tqdm=False)
    print("\nGenerated outputs:\n" + "-" * 60)
    for output in outputs:
        print(f"Prompt: {output.prompt!r}\nOutput: {output.outputs[0].text!r}\n" + "-" * 60)
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter", action="store_true", help="the processor built with AdapterLogitsProcessor")
    args = parser.parse_args()
    run(args.model, AdaptedTargetTokenLogitsProcessor if args.adapter else TargetTokenLogitsProcessor)


if __name__ == "__main__":
    main()
