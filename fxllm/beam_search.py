"""Beam search as vLLM runs it: over the engine, one token per step for every live beam."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fxllm.outputs import BeamSearchOutput, BeamSearchSequence
from fxllm.sampling_params import BeamSearchParams, SamplingParams

if TYPE_CHECKING:
    from fxllm.llm import LLM

# Candidates kept per beam and step, as a multiple of the beam width (vLLM's choice).
CANDIDATES_PER_BEAM = 2


def beam_score(tokens: list[int], cum_logprob: float, eos_token_id: int | None, length_penalty: float) -> float:
    """vLLM's score: cumulative logprob over (prompt + output length, without a final EOS) ** penalty."""
    length = len(tokens) - (1 if tokens and tokens[-1] == eos_token_id else 0)
    return cum_logprob / (length**length_penalty)


def run_beam_search(
    llm: "LLM", tokenized: list[tuple[str | None, list[int]]], params: BeamSearchParams
) -> list[BeamSearchOutput]:
    tokenizer = llm.get_tokenizer()
    eos = tokenizer.eos_token_id
    step_params = SamplingParams(
        logprobs=CANDIDATES_PER_BEAM * params.beam_width, max_tokens=1, temperature=params.temperature,
        ignore_eos=params.ignore_eos,
    )
    max_model_len = llm.llm_engine_config.model.max_model_len
    num_steps = min(params.max_tokens, max_model_len - max(len(ids) for _, ids in tokenized))
    live = [[BeamSearchSequence(tokens=list(ids), logprobs=[])] for _, ids in tokenized]
    completed: list[list[BeamSearchSequence]] = [[] for _ in tokenized]
    for _ in range(max(num_steps, 0)):
        flat = [beam for beams in live for beam in beams]
        if not flat:
            break
        outputs = llm._generate_tokenized([(None, beam.tokens) for beam in flat], [step_params] * len(flat), use_tqdm=False)
        results = iter(outputs)
        for index, beams in enumerate(live):
            candidates = []
            for beam in beams:
                step_logprobs = next(results).outputs[0].logprobs[0]
                for token_id, logprob in step_logprobs.items():
                    candidate = BeamSearchSequence(
                        tokens=beam.tokens + [token_id],
                        logprobs=beam.logprobs + [step_logprobs],
                        cum_logprob=beam.cum_logprob + logprob.logprob,
                    )
                    if token_id == eos and not params.ignore_eos:
                        candidate.finish_reason = "stop"
                        completed[index].append(candidate)
                    else:
                        candidates.append(candidate)
            candidates.sort(key=lambda b: b.cum_logprob, reverse=True)
            live[index] = candidates[: params.beam_width]
    results = []
    for index in range(len(tokenized)):
        finished = completed[index] + live[index]
        finished.sort(key=lambda b: beam_score(b.tokens, b.cum_logprob, eos, params.length_penalty), reverse=True)
        best = finished[: params.beam_width]
        for beam in best:
            beam.text = tokenizer.decode(beam.tokens)
            beam.finish_reason = beam.finish_reason or "length"
        results.append(BeamSearchOutput(sequences=best))
    return results
