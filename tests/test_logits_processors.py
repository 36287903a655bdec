"""Custom logits processors: vLLM's batch-level ones (LLM(logits_processors=...)) and vLLM 0.11's
per-request callables (SamplingParams(logits_processors=...)), on a tiny random model."""

from __future__ import annotations

import random

import pytest
import torch

from fxllm import LLM, SamplingParams
from fxllm.runtime import step_result
from fxllm.runtime.logits_processors import ProcessorBatch
from fxllm.runtime.request import Request
from fxllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from fxllm.v1.sample.logits_processor.builtin import process_dict_updates
from tests import logits_processor_example as example
from tests.conftest import assert_all_blocks_free

MAX_MODEL_LEN = 128
TARGETS = (67, 128)


@pytest.fixture(scope="module")
def plain(llama_dir):
    return LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN)


def _free_outputs(llm: LLM) -> list[list[int]]:
    """The example's requests that ask for no target token, run without any processor."""
    params = example.sampling_params(TARGETS)
    outputs = llm.generate([example.PROMPTS[1], example.PROMPTS[3]], [params[1], params[3]], use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize(
    "processor",
    [example.TargetTokenLogitsProcessor, example.AdaptedTargetTokenLogitsProcessor,
     "tests.logits_processor_example.TargetTokenLogitsProcessor",
     "tests.logits_processor_example:AdaptedTargetTokenLogitsProcessor"],
    ids=["class", "adapter", "dotted-name", "colon-name"],
)
def test_the_examples_processor_forces_its_token_on_the_requests_that_ask_and_no_other(llama_dir, plain, processor):
    outputs = example.run(str(llama_dir), processor, TARGETS, enforce_eager=True, max_model_len=MAX_MODEL_LEN)
    max_tokens = example.sampling_params(TARGETS)[0].max_tokens
    assert outputs[0].outputs[0].token_ids == [TARGETS[0]] * max_tokens
    assert outputs[2].outputs[0].token_ids == [TARGETS[1]] * max_tokens
    assert [outputs[1].outputs[0].token_ids, outputs[3].outputs[0].token_ids] == _free_outputs(plain)


def test_a_per_request_callable_forces_its_token_and_leaves_the_batch_alone(plain):
    forced = 77
    seen_outputs = []

    def with_prompt(prompt_ids, output_ids, logits):
        seen_outputs.append((len(prompt_ids), list(output_ids)))
        return example.ForceToken(forced)(output_ids, logits)

    params = example.sampling_params(TARGETS)
    params[0] = SamplingParams(temperature=0.0, max_tokens=params[0].max_tokens, logits_processors=[example.ForceToken(forced)])
    params[2] = SamplingParams(temperature=0.0, max_tokens=3, logits_processors=[with_prompt])
    outputs = plain.generate(example.PROMPTS, params, use_tqdm=False)
    assert outputs[0].outputs[0].token_ids == [forced] * params[0].max_tokens
    assert outputs[2].outputs[0].token_ids == [forced] * 3
    prompt_length = len(outputs[2].prompt_token_ids)
    assert seen_outputs == [(prompt_length, []), (prompt_length, [forced]), (prompt_length, [forced, forced])]
    assert [outputs[1].outputs[0].token_ids, outputs[3].outputs[0].token_ids] == _free_outputs(plain)


def test_a_processor_refusing_a_requests_params_fails_the_call_naming_it(llama_dir):
    llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN,
              logits_processors=[example.TargetTokenLogitsProcessor])
    params = [SamplingParams(max_tokens=2), SamplingParams(max_tokens=2, extra_args={"target_token": "x"})]
    with pytest.raises(ValueError, match="prompt 1: TargetTokenLogitsProcessor refuses them: target_token must be an int"):
        llm.generate(example.PROMPTS[:2], params, use_tqdm=False)
    assert_all_blocks_free(llm)


@pytest.mark.parametrize(
    "entry, error, message",
    [
        (lambda logits: logits, TypeError, "must be a subclass of fxllm.v1.sample.logits_processor.LogitsProcessor"),
        ("no_such_module.Processor", ValueError, "could not be loaded"),
        ("Processor", ValueError, "not a qualified class name"),
    ],
    ids=["callable", "missing-module", "bare-name"],
)
def test_engine_level_processors_must_be_processor_classes(llama_dir, entry, error, message):
    with pytest.raises(error, match=message):
        LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, logits_processors=[entry])


class _Recording(LogitsProcessor):
    """Applies nothing; records what it was told and when it was applied."""

    def __init__(self, vllm_config, device, is_pin_memory):
        self.updates: list[BatchUpdate | None] = []
        self.applied = 0

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update):
        self.updates.append(batch_update)

    def apply(self, logits):
        self.applied += 1
        return logits


def test_argmax_invariant_processors_apply_to_sampled_batches_only(llama_dir):
    llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, logits_processors=[_Recording])
    processor = llm.llm_engine.runner.logits_processors.argmax_invariant[0]
    llm.generate(example.PROMPTS[:2], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert processor.applied == 0 and len(processor.updates) == 3
    llm.generate(example.PROMPTS[:2], SamplingParams(temperature=0.7, seed=1, max_tokens=3), use_tqdm=False)
    assert processor.applied == 3


def test_engine_level_processors_run_their_engine_step_by_step_under_async_scheduling(llama_dir, monkeypatch):
    llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, async_scheduling=True,
              logits_processors=[example.TargetTokenLogitsProcessor])
    events = []
    real_launch, real_result = llm.llm_engine.executor.execute_model, step_result.LaunchedStep.result
    monkeypatch.setattr(llm.llm_engine.executor, "execute_model", lambda step, previous=None: events.append("launch") or real_launch(step, previous))
    monkeypatch.setattr(step_result.LaunchedStep, "result", lambda self: events.append("result") or real_result(self))
    llm.generate(example.PROMPTS[0], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert events == ["launch", "result"] * 4


# ---- the persistent batch the processors index ------------------------------------------------------


class _IndexOwners(LogitsProcessor):
    """Keeps each batch index's request id through process_dict_updates, and checks that
    ``apply`` gets row i of the request at index i (each row is filled with its request's id)."""

    def __init__(self, vllm_config, device, is_pin_memory):
        self.owners: dict[int, int] = {}
        self.batch_size = 0

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update):
        if batch_update is not None:
            self.batch_size = batch_update.batch_size
        process_dict_updates(self.owners, batch_update, lambda params, prompt, output: params.extra_args["id"])

    def apply(self, logits):
        assert sorted(self.owners) == list(range(self.batch_size))
        assert logits[:, 0].tolist() == [float(self.owners[i]) for i in range(self.batch_size)]
        return logits + 1.0  # so that the caller sees its rows come back in its own order


def _request(request_id: int) -> Request:
    params = SamplingParams(extra_args={"id": request_id})
    return Request(str(request_id), None, [1, 2], params, max_tokens=4, stop_token_ids=frozenset(), detokenizer=None)


def test_batch_updates_keep_every_request_at_its_index_whatever_the_step_order():
    """Random steps: requests join, leave and change places in the step order; the processor's
    view (built from BatchUpdates alone, vLLM's rules) always matches the batch it is applied to."""
    rng = random.Random(0)
    processor = _IndexOwners(None, torch.device("cpu"), False)
    batch = ProcessorBatch([processor], torch.device("cpu"))
    pool = [_request(i) for i in range(40)]
    live: list[Request] = []
    for _ in range(200):
        live = [r for r in live if rng.random() > 0.2]
        live += rng.sample([r for r in pool if r not in live], k=min(rng.randint(0, 3), len(pool) - len(live)))
        rng.shuffle(live)
        if not live:
            continue
        step = batch.step(live)
        logits = torch.tensor([[float(r.sampling_params.extra_args["id"])] for r in live])
        processed = step.apply(logits, argmax_invariant=False)
        assert torch.equal(processed, logits + 1.0)


@pytest.mark.gpu
def test_the_examples_processors_on_a_gpu_engine_with_its_defaults(llama_dir):
    """Compiled, CUDA graphs; batch-level processors make the engine wait for each step's tokens."""
    outputs = example.run(str(llama_dir), example.TargetTokenLogitsProcessor, TARGETS, max_model_len=MAX_MODEL_LEN)
    max_tokens = example.sampling_params(TARGETS)[0].max_tokens
    assert outputs[0].outputs[0].token_ids == [TARGETS[0]] * max_tokens
    assert outputs[2].outputs[0].token_ids == [TARGETS[1]] * max_tokens
    # The other requests are not forced (their exact tokens are checked on the CPU).
    assert len(set(outputs[1].outputs[0].token_ids + outputs[3].outputs[0].token_ids)) > 2
