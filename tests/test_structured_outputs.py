"""Structured outputs (vLLM's StructuredOutputsParams on xgrammar) on a tiny random model.

The model's tokens are random, so the constraint is the only structure its outputs can
have: every output must parse and validate, match, or equal a choice. Schemas bound
every string, number and array, so that a random walk through them ends well within
max_tokens.
"""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
import torch

from fxllm import LLM, SamplingParams
from fxllm.engine_args import EngineArgs
from fxllm.runtime import step_result
from fxllm.runtime.structured_outputs.bitmask import apply_token_bitmask
from fxllm.sampling_params import GuidedDecodingParams, StructuredOutputsParams
from tests.conftest import assert_all_blocks_free
from tests.tiny_models import VOCAB_SIZE, save_config_checkpoint

xgr = pytest.importorskip("xgrammar")

MAX_MODEL_LEN = 256
MAX_TOKENS = 200  # far above what the bounded schemas below take
NUM_PROMPTS = 24
# 16 blocks of 16 tokens hold a few of the requests at once: preemption is certain.
SMALL_CACHE_BLOCKS = 16

WORD = {"type": "string", "pattern": "^[a-z]{1,6}$"}
SCHEMA = {
    "type": "object",
    "properties": {
        "name": WORD,
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"zip": {"type": "integer", "minimum": 10000, "maximum": 99999}, "city": WORD},
            "required": ["zip", "city"],
        },
        "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "minItems": 1, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "tags", "active"],
}
REGEX = r"(0|[1-9][0-9]{0,3})-[a-z]{2,5}(\.[a-z]{2,3})?"
CHOICES = ["yes", "no", 'say "maybe"', "back\\slash", "naïve"]
# Sums of at most four terms: "12+3*45".
GRAMMAR = 'root ::= num (("+" | "*") num){0,3}\nnum ::= [1-9] [0-9]?'
GRAMMAR_REGEX = r"[1-9][0-9]?([+*][1-9][0-9]?){0,3}"


def _prompts(count: int) -> list[dict]:
    rng = random.Random(0)
    return [{"prompt_token_ids": [rng.randrange(3, VOCAB_SIZE) for _ in range(rng.randint(2, 30))]} for _ in range(count)]


def _sampled(constraint: StructuredOutputsParams, count: int = NUM_PROMPTS, **kwargs) -> list[SamplingParams]:
    """Seeded sampling at temperature 1: the random model's whole distribution, under the constraint."""
    return [
        SamplingParams(temperature=1.0, seed=index, max_tokens=MAX_TOKENS, structured_outputs=constraint, **kwargs)
        for index in range(count)
    ]


def _texts(outputs) -> list[str]:
    return [completion.text for output in outputs for completion in output.outputs]


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN)


# ---- every kind of constraint ------------------------------------------------------------------


def test_every_output_under_a_json_schema_parses_and_validates(llm):
    constraint = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    outputs = llm.generate(_prompts(NUM_PROMPTS), _sampled(constraint), use_tqdm=False)
    for output in outputs:
        completion = output.outputs[0]
        assert completion.finish_reason == "stop"
        jsonschema.validate(json.loads(completion.text), SCHEMA)
    assert len({o.outputs[0].text for o in outputs}) > NUM_PROMPTS // 2, "the outputs do not vary: nothing was sampled"
    assert_all_blocks_free(llm)


def test_a_schema_given_as_text_or_by_pydantic_compiles_the_same(llm):
    pydantic = pytest.importorskip("pydantic")

    class Point(pydantic.BaseModel):
        x: int = pydantic.Field(ge=0, le=9)
        y: int = pydantic.Field(ge=0, le=9)

    for schema in (Point.model_json_schema(), json.dumps(Point.model_json_schema())):
        constraint = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
        for text in _texts(llm.generate(_prompts(4), _sampled(constraint, 4), use_tqdm=False)):
            Point.model_validate_json(text)


def test_whitespace_pattern_is_the_only_whitespace_between_json_tokens(llm):
    constraint = StructuredOutputsParams(json=SCHEMA, whitespace_pattern=r"[ ]?")
    for text in _texts(llm.generate(_prompts(8), _sampled(constraint, 8), use_tqdm=False)):
        jsonschema.validate(json.loads(text), SCHEMA)
        # The schema's strings hold letters only: every whitespace is between tokens.
        assert not re.search(r"\s\s|[\n\r\t]", text), text


def test_json_object_outputs_are_json_objects(llm):
    tokenizer = llm.get_tokenizer()
    # Random weights would write strings for ever: make closing them likely (the mask alone keeps it JSON).
    closers = {tokenizer.convert_tokens_to_ids(t): 6.0 for t in ('"', "}")}
    constraint = StructuredOutputsParams(json_object=True, disable_any_whitespace=True)
    for text in _texts(llm.generate(_prompts(8), _sampled(constraint, 8, logit_bias=closers), use_tqdm=False)):
        assert isinstance(json.loads(text), dict), text


def test_every_output_under_a_regex_matches_it_whole(llm):
    outputs = llm.generate(_prompts(NUM_PROMPTS), _sampled(StructuredOutputsParams(regex=REGEX)), use_tqdm=False)
    for text in _texts(outputs):
        assert re.fullmatch(REGEX, text), text


def test_every_output_under_choices_is_one_of_them(llm):
    constraint = StructuredOutputsParams(choice=CHOICES)
    texts = _texts(llm.generate(_prompts(NUM_PROMPTS), _sampled(constraint), use_tqdm=False))
    texts += _texts(llm.generate(_prompts(2), SamplingParams(temperature=0, structured_outputs=constraint), use_tqdm=False))
    assert set(texts) <= set(CHOICES) and len(set(texts)) > 1


def test_every_output_under_an_ebnf_grammar_is_a_sentence_of_it(llm):
    outputs = llm.generate(_prompts(NUM_PROMPTS), _sampled(StructuredOutputsParams(grammar=GRAMMAR)), use_tqdm=False)
    for text in _texts(outputs):
        assert re.fullmatch(GRAMMAR_REGEX, text), text


def test_a_structural_tag_wraps_json_in_its_tags(llm):
    tag = {
        "type": "structural_tag",
        "format": {
            "type": "sequence",
            "elements": [
                {"type": "const_string", "value": "<point>"},
                {"type": "json_schema", "json_schema": {"type": "array", "items": {"enum": [1, 2, 3]}, "maxItems": 2}},
                {"type": "const_string", "value": "</point>"},
            ],
        },
    }
    constraint = StructuredOutputsParams(structural_tag=json.dumps(tag))
    for text in _texts(llm.generate(_prompts(6), _sampled(constraint, 6), use_tqdm=False)):
        match = re.fullmatch(r"<point>(.*)</point>", text, re.DOTALL)
        assert match and set(json.loads(match.group(1))) <= {1, 2, 3}, text


def test_a_grammar_ends_its_request_with_stop_even_when_eos_is_ignored(llm):
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=50, structured_outputs=StructuredOutputsParams(choice=["no"]))
    completion = llm.generate(_prompts(1), params, use_tqdm=False)[0].outputs[0]
    assert (completion.text, completion.finish_reason) == ("no", "stop")


# ---- with the rest of the engine ------------------------------------------------------------------


def test_free_requests_batched_with_constrained_ones_get_their_unconstrained_tokens(llm):
    prompts = _prompts(8)
    free = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
            SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)] * 2
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts[:4], free, use_tqdm=False)]
    constrained = _sampled(StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True), 4)
    interleaved = [p for pair in zip(prompts[:4], prompts[4:]) for p in pair]
    mixed = llm.generate(interleaved, [p for pair in zip(free, constrained) for p in pair], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[::2]] == alone
    for output in mixed[1::2]:
        jsonschema.validate(json.loads(output.outputs[0].text), SCHEMA)


def test_n_completions_and_seeds(llm):
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=MAX_TOKENS, structured_outputs=StructuredOutputsParams(regex=REGEX))
    first = llm.generate(_prompts(1), params, use_tqdm=False)[0]
    again = llm.generate(_prompts(1), params, use_tqdm=False)[0]
    assert [c.index for c in first.outputs] == [0, 1, 2, 3]
    assert [c.text for c in first.outputs] == [c.text for c in again.outputs]
    assert all(re.fullmatch(REGEX, c.text) for c in first.outputs) and len({c.text for c in first.outputs}) > 1


def test_max_tokens_cuts_a_constrained_output_by_length(llm):
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=5, structured_outputs=StructuredOutputsParams(json=SCHEMA))
    completion = llm.generate(_prompts(1), params, use_tqdm=False)[0].outputs[0]
    assert completion.finish_reason == "length" and len(completion.token_ids) == 5
    assert completion.text.startswith('{')


def test_a_stop_string_cuts_a_constrained_output(llm):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=["-"], structured_outputs=StructuredOutputsParams(regex=REGEX))
    completion = llm.generate(_prompts(1), params, use_tqdm=False)[0].outputs[0]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", "-")
    assert re.fullmatch(r"0|[1-9][0-9]{0,3}", completion.text)


def test_logprobs_are_those_of_the_constrained_distribution(llm):
    """As vLLM: the mask applies before logprobs, so a token the grammar forbids never shows."""
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=5, structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    completion = llm.generate(_prompts(1), params, use_tqdm=False)[0].outputs[0]
    assert completion.text in ("yes", "no")
    for token, position in zip(completion.token_ids, completion.logprobs):
        assert position[token].logprob > float("-inf")
        assert sum(torch.tensor(entry.logprob).exp().item() for entry in position.values() if entry.logprob > float("-inf")) == pytest.approx(1.0, abs=1e-4) or len(position) == 5


def test_chat_under_a_schema(llm):
    constraint = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    outputs = llm.chat(
        [[{"role": "user", "content": "Describe a user."}]] * 3, _sampled(constraint, 3),
        chat_template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}", use_tqdm=False,
    )
    for text in _texts(outputs):
        jsonschema.validate(json.loads(text), SCHEMA)


def test_prefix_cached_prompts_under_a_schema(llm):
    prompt = {"prompt_token_ids": list(range(3, 70))}  # four full blocks
    hits = llm.llm_engine.kv_cache.prefix_hits
    constraint = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    llm.generate([prompt], _sampled(constraint, 1), use_tqdm=False)
    for text in _texts(llm.generate([prompt] * 3, _sampled(constraint, 3), use_tqdm=False)):
        jsonschema.validate(json.loads(text), SCHEMA)
    assert llm.llm_engine.kv_cache.prefix_hits > hits


def test_preempted_and_async_scheduled_requests_keep_their_grammar_state(llm, llama_dir):
    """A preempted request keeps its outputs and its matcher, which took exactly those tokens;
    under async scheduling constrained requests run step by step. Both give the outputs of an
    engine that does neither."""
    small = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN,
                num_gpu_blocks_override=SMALL_CACHE_BLOCKS, async_scheduling=True)
    finished = []
    real_finish = small.llm_engine.scheduler.finish

    def finish(request):
        finished.append((request.grammar.num_accepted, len(request.output_token_ids)))
        real_finish(request)

    small.llm_engine.scheduler.finish = finish
    constraint = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    prompts, params = _prompts(NUM_PROMPTS), _sampled(constraint)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    outputs = small.generate(prompts, params, use_tqdm=False)
    assert small.llm_engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert all(accepted == length for accepted, length in finished) and len(finished) == NUM_PROMPTS
    assert_all_blocks_free(small)


def test_constrained_requests_run_step_by_step_under_async_scheduling(llama_dir, monkeypatch):
    llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, async_scheduling=True)
    events = []
    real_launch, real_result = llm.llm_engine.executor.execute_model, step_result.LaunchedStep.result
    monkeypatch.setattr(llm.llm_engine.executor, "execute_model", lambda step, previous=None: events.append("launch") or real_launch(step, previous))
    monkeypatch.setattr(step_result.LaunchedStep, "result", lambda self: events.append("result") or real_result(self))
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, structured_outputs=StructuredOutputsParams(regex="[a-z]{4}"))
    completion = llm.generate(_prompts(1), params, use_tqdm=False)[0].outputs[0]
    assert completion.finish_reason == "stop" and events == ["launch", "result"] * len(completion.token_ids)


def test_ids_past_the_tokenizers_vocabulary_are_never_allowed(tmp_path):
    """A model whose embedding is padded past the tokenizer: the padding ids stay masked,
    however much a bias favours them."""
    from transformers import LlamaConfig

    padded = VOCAB_SIZE + 64
    config = LlamaConfig(vocab_size=padded, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                         architectures=["LlamaForCausalLM"])
    llm = LLM(model=str(save_config_checkpoint(config, tmp_path / "padded")), enforce_eager=True, max_model_len=MAX_MODEL_LEN)
    favour_padding = {token: 50.0 for token in range(VOCAB_SIZE, padded)}
    outputs = llm.generate(_prompts(6), _sampled(StructuredOutputsParams(regex=REGEX), 6, logit_bias=favour_padding), use_tqdm=False)
    for output in outputs:
        assert max(output.outputs[0].token_ids) < VOCAB_SIZE
        assert re.fullmatch(REGEX, output.outputs[0].text)


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "constraint, message",
    [
        (StructuredOutputsParams(regex="(unclosed"), "regex does not compile"),
        (StructuredOutputsParams(json="{not json"), "json is not a JSON schema"),
        (StructuredOutputsParams(json={"type": "no-such-type"}), "json does not compile"),
        (StructuredOutputsParams(grammar="root ::= "), "grammar does not compile"),
        (StructuredOutputsParams(structural_tag='{"type": "nonsense"}'), "structural_tag does not compile"),
    ],
    ids=["regex", "json-text", "json-schema", "grammar", "structural-tag"],
)
def test_a_constraint_that_does_not_compile_fails_the_call_before_anything_runs(llm, monkeypatch, constraint, message):
    good = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(regex="[a-z]+"))
    bad = SamplingParams(max_tokens=4, structured_outputs=constraint)
    queued = []
    with monkeypatch.context() as patch:
        patch.setattr(llm.llm_engine, "add_request", queued.append)
        with pytest.raises(ValueError, match=rf"prompt 1: .*{message}"):
            llm.generate(_prompts(3), [good, bad, good], use_tqdm=False)
    assert queued == []
    assert_all_blocks_free(llm)
    assert re.fullmatch("[a-z]+", llm.generate(_prompts(1), good, use_tqdm=False)[0].outputs[0].text)


def test_a_constraint_compiles_once_per_engine(llm):
    compiler_constraint = StructuredOutputsParams(regex="[0-9]{3}")
    llm.generate(_prompts(2), SamplingParams(max_tokens=4, structured_outputs=compiler_constraint), use_tqdm=False)
    compiler = llm.input_processor._grammar_compiler
    compiled = compiler.num_compiled
    llm.generate(_prompts(3), [SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(regex="[0-9]{3}"))] * 3, use_tqdm=False)
    assert compiler.num_compiled == compiled


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({}, ValueError, "exactly one of json, regex, choice, grammar, json_object, structural_tag: got none"),
        ({"json": SCHEMA, "regex": "a"}, ValueError, "got json, regex"),
        ({"choice": []}, ValueError, "at least one string"),
        ({"choice": "yes"}, TypeError, "list of strings"),
        ({"json": 3}, TypeError, "JSON schema as a dict or a string"),
        ({"json_object": False}, ValueError, "json_object must be True"),
        ({"regex": "a", "whitespace_pattern": " "}, ValueError, "applies to JSON"),
        ({"json": SCHEMA, "whitespace_pattern": " ", "disable_any_whitespace": True}, ValueError, "contradict"),
    ],
)
def test_structured_outputs_params_are_validated(kwargs, error, message):
    with pytest.raises(error, match=message):
        StructuredOutputsParams(**kwargs)


def test_guided_decoding_is_the_older_name_of_structured_outputs(llm):
    guided = GuidedDecodingParams(choice=["yes", "no"], backend="xgrammar")
    params = SamplingParams(temperature=0, guided_decoding=guided)
    assert params.structured_outputs is guided and params.guided_decoding is None
    assert llm.generate(_prompts(1), params, use_tqdm=False)[0].outputs[0].text in ("yes", "no")
    with pytest.raises(ValueError, match="xgrammar"):
        GuidedDecodingParams(regex="a", backend="outlines")
    with pytest.raises(ValueError, match="one setting under two names"):
        SamplingParams(structured_outputs=StructuredOutputsParams(regex="a"), guided_decoding=GuidedDecodingParams(regex="b"))


def test_structured_outputs_engine_arguments(llama_dir):
    def config(**kwargs):
        return EngineArgs(model=str(llama_dir), **kwargs).create_engine_config().structured_outputs

    assert config().backend == "auto"
    assert config(structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True}).disable_any_whitespace
    assert config(guided_decoding_backend="xgrammar", guided_decoding_disable_any_whitespace=True).disable_any_whitespace
    with pytest.raises(ValueError, match="'outlines' is not supported: fxllm runs structured outputs on xgrammar"):
        config(structured_outputs_config={"backend": "outlines"})
    with pytest.raises(ValueError, match="pass structured_outputs_config only"):
        config(structured_outputs_config={}, guided_decoding_backend="xgrammar")
    with pytest.raises(ValueError, match="unknown structured_outputs_config field"):
        config(structured_outputs_config={"no_such_option": True})


def test_the_engines_disable_any_whitespace_applies_to_every_request(llama_dir):
    llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN,
              structured_outputs_config={"disable_any_whitespace": True})
    for text in _texts(llm.generate(_prompts(4), _sampled(StructuredOutputsParams(json=SCHEMA), 4), use_tqdm=False)):
        jsonschema.validate(json.loads(text), SCHEMA)
        assert "\n" not in text and "  " not in text


# ---- the mask on the device -----------------------------------------------------------------------


def test_the_bitmask_matches_xgrammars_and_leaves_other_rows_alone():
    generator = torch.Generator().manual_seed(0)
    vocab = 100
    logits = torch.randn(5, vocab, generator=generator)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (2, 4), dtype=torch.int32, generator=generator)
    expected = logits.clone()
    full = torch.full((5, 4), -1, dtype=torch.int32)
    full[[1, 3]] = bitmask
    xgr.apply_token_bitmask_inplace(expected, full, vocab_size=vocab, indices=[1, 3])
    apply_token_bitmask(logits, bitmask, torch.tensor([1, 3]))
    assert torch.equal(logits, expected)


# ---- on a GPU: compiled, CUDA graphs, async scheduling, the one-pass sampling kernel -------------


@pytest.mark.gpu
def test_structured_outputs_on_a_gpu_engine_with_its_defaults(llama_dir):
    llm = LLM(model=str(llama_dir), max_model_len=MAX_MODEL_LEN)  # compiled, CUDA graphs, async scheduling
    assert llm.llm_engine.async_scheduling
    prompts = _prompts(NUM_PROMPTS)
    free = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    schema = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    params = _sampled(schema)  # plain temperature sampling: the one-pass kernel
    params[:4] = [free] * 4
    params[4:8] = _sampled(StructuredOutputsParams(regex=REGEX), 4)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    # (Exact tokens of free requests are checked on the CPU: in half precision a batch's shape
    # can change the logits themselves.)
    assert all(len(o.outputs[0].token_ids) == 16 for o in outputs[:4])
    for output in outputs[4:8]:
        assert re.fullmatch(REGEX, output.outputs[0].text)
    for output in outputs[8:]:
        assert output.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(output.outputs[0].text), SCHEMA)
    assert_all_blocks_free(llm)


@pytest.mark.gpu
def test_the_bitmask_on_a_gpu_matches_xgrammars_kernel():
    generator = torch.Generator(device="cuda").manual_seed(0)
    vocab, words = 151936, 4748
    logits = torch.randn(64, vocab, device="cuda", dtype=torch.bfloat16, generator=generator)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (64, words), dtype=torch.int32, device="cuda", generator=generator)
    rows = list(range(0, 64, 3))
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, bitmask, vocab_size=vocab, indices=rows)
    apply_token_bitmask(logits, bitmask[rows], torch.tensor(rows, device="cuda"))
    assert torch.equal(logits, expected)
