"""Beam search as vLLM runs it: over the engine, one token per step for every live beam."""

from __future__ import annotations

from fxllm.outputs import BeamSearchOutput, BeamSearchSequence
from fxllm.runtime.engine import LLMEngine
from fxllm.runtime.input_processor import InputProcessor, ProcessedPrompt
from fxllm.runtime.output_processor import request_outputs
from fxllm.sampling_params import BeamSearchParams, SamplingParams
from fxllm.validation import check_int

# Candidates kept per beam and step, as a multiple of the beam width (vLLM's choice).
CANDIDATES_PER_BEAM = 2


def beam_score(tokens: list[int], cum_logprob: float, eos_token_id: int | None, length_penalty: float) -> float:
    """vLLM's score: cumulative logprob over (prompt + output length, without a final EOS) ** penalty."""
    length = len(tokens) - (1 if tokens and tokens[-1] == eos_token_id else 0)
    return cum_logprob / (length**length_penalty)


def run_beam_search(
    engine: LLMEngine,
    processor: InputProcessor,
    prompts: list[ProcessedPrompt],
    params: BeamSearchParams,
    concurrency_limit: int | None = None,
) -> list[BeamSearchOutput]:
    """Each prompt's beams are what they would be alone: a prompt stops expanding at its own
    ``max_tokens`` or ``max_model_len``, whatever the other prompts of the call do.
    ``concurrency_limit`` (vLLM's): at most that many prompts are searched at a time."""
    if concurrency_limit is not None:
        check_int("concurrency_limit", concurrency_limit, minimum=1)
        outputs = []
        for start in range(0, len(prompts), concurrency_limit):
            outputs += run_beam_search(engine, processor, prompts[start : start + concurrency_limit], params)
        return outputs
    tokenizer = engine.get_tokenizer()
    eos = tokenizer.eos_token_id
    vocab_size = processor.vocab_size
    candidates_per_beam = CANDIDATES_PER_BEAM * params.beam_width
    if candidates_per_beam > vocab_size:
        raise ValueError(
            f"beam_width={params.beam_width} keeps {candidates_per_beam} candidates a beam, more than the "
            f"vocabulary's {vocab_size} tokens: use beam_width <= {vocab_size // CANDIDATES_PER_BEAM}"
        )
    max_model_len = processor.max_model_len
    for index, prompt in enumerate(prompts):
        if len(prompt.token_ids) >= max_model_len:
            raise ValueError(
                f"prompt {index} has {len(prompt.token_ids)} tokens but max_model_len is {max_model_len}; a prompt "
                f"must leave room for at least one generated token: shorten it or raise max_model_len"
            )
    step_params = SamplingParams(
        logprobs=candidates_per_beam, max_tokens=1, temperature=params.temperature, ignore_eos=params.ignore_eos
    )
    steps_left = [min(params.max_tokens, max_model_len - len(prompt.token_ids)) for prompt in prompts]
    live = [[BeamSearchSequence(tokens=list(prompt.token_ids), logprobs=[])] for prompt in prompts]
    completed: list[list[BeamSearchSequence]] = [[] for _ in prompts]
    while True:
        expanding = [index for index, beams in enumerate(live) if beams and steps_left[index] > 0]
        if not expanding:
            break
        flat = [beam for index in expanding for beam in live[index]]
        requests = processor.make_requests([ProcessedPrompt(None, beam.tokens) for beam in flat], [step_params] * len(flat))
        engine.run(requests, use_tqdm=False)
        outputs = iter(request_outputs(requests, len(flat), tokenizer))
        for index in expanding:
            candidates = []
            for beam in live[index]:
                step_logprobs = next(outputs).outputs[0].logprobs[0]
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
            steps_left[index] -= 1
    results = []
    for index in range(len(prompts)):
        finished = completed[index] + live[index]
        finished.sort(key=lambda b: beam_score(b.tokens, b.cum_logprob, eos, params.length_penalty), reverse=True)
        best = finished[: params.beam_width]
        for beam in best:
            beam.text = tokenizer.decode(beam.tokens)
            beam.finish_reason = beam.finish_reason or "length"
        results.append(BeamSearchOutput(sequences=best))
    return results
