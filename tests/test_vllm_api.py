"""vLLM's offline API, whole: the names, arguments and calls a vLLM script uses work here."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from fxllm import (
    LLM,
    CompilationConfig,
    CompilationMode,
    CUDAGraphMode,
    EngineArgs,
    LLMEngine,
    SamplingParams,
    TextPrompt,
    TokensPrompt,
)
from fxllm.config import CompilationLevel, derive_max_model_len
from fxllm.engine_arg_support import HONOURED, NO_EFFECT, REFUSED_BECAUSE, Support, support_of
from fxllm.runtime.chat import template_loops_over_content
from fxllm.utils.argparse_utils import FlexibleArgumentParser
from fxllm.v1.metrics.reader import Counter, Gauge, Histogram
from fxllm.vllm_engine_args import VLLM_ENGINE_ARGS

MAX_MODEL_LEN = 64
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPTS = ["The capital of France is", "Hello world"]


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN)


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


# ---- engine arguments ------------------------------------------------------------------------------


def test_every_vllm_engine_argument_is_accepted_at_each_of_its_defaults(llama_dir):
    for index in range(max(len(defaults) for defaults in VLLM_ENGINE_ARGS.values())):
        values = {name: defaults[min(index, len(defaults) - 1)] for name, defaults in VLLM_ENGINE_ARGS.items()}
        values.update(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, enforce_eager=True, device="cpu")
        config = EngineArgs(**values).create_engine_config()
        assert config.model.architecture == "LlamaForCausalLM"


def test_engine_args_round_trip_through_llm(llama_dir, llm):
    args = EngineArgs(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, enforce_eager=True)
    assert {f.name for f in dataclasses.fields(args)} >= set(VLLM_ENGINE_ARGS)
    built = LLM(**dataclasses.asdict(args))
    assert _tokens(built.generate(PROMPTS, GREEDY, use_tqdm=False)) == _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))


def test_every_honoured_argument_is_a_declared_field_and_every_argument_has_a_status():
    declared = {f.name for f in dataclasses.fields(EngineArgs)}
    assert HONOURED <= declared
    assert set(NO_EFFECT) & HONOURED == set() and set(REFUSED_BECAUSE) & HONOURED == set()
    assert all(support_of(name) in Support for name in VLLM_ENGINE_ARGS)


def test_engine_args_parse_vllm_style_flags(llama_dir):
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    parsed = parser.parse_args(
        ["--model", str(llama_dir), "--max_model_len", "32", "--enforce-eager", "--max-num-seqs", "4",
         "--compilation-config", '{"mode": 3}']
    )
    args = EngineArgs.from_cli_args(parsed)
    assert (args.max_model_len, args.enforce_eager, args.max_num_seqs) == (32, True, 4)
    config = args.create_engine_config()
    assert config.model.max_model_len == 32 and config.scheduler.max_num_seqs == 4


def test_compilation_names_of_both_generations(llama_dir):
    def compilation(value):
        return EngineArgs(model=str(llama_dir), compilation_config=value).create_engine_config().compilation

    assert compilation({"mode": CompilationMode.DYNAMO_TRACE_ONCE}).level == CompilationLevel.DYNAMO_ONCE
    assert compilation({"level": 1}).level == CompilationLevel.DYNAMO_AS_IS
    assert compilation({"backend": "eager"}).use_inductor is False
    assert compilation(CompilationConfig(cudagraph_mode="FULL_DECODE_ONLY")).cudagraph_mode is CUDAGraphMode.FULL_DECODE_ONLY
    assert compilation({"pass_config": {"eliminate_noops": False}}).pass_config.enable_noop is False
    with pytest.raises(ValueError, match="fuse_allreduce_rms: fxllm has no such pass"):
        compilation({"pass_config": {"fuse_allreduce_rms": True}})
    sized = EngineArgs(model=str(llama_dir), cudagraph_capture_sizes=[1, 2, 4]).create_engine_config().compilation
    assert sized.cudagraph_capture_sizes == (1, 2, 4)


def test_max_model_len_minus_one_and_rope_scaled_limits(llama_dir):
    config = EngineArgs(model=str(llama_dir), max_model_len=-1).create_engine_config()
    assert config.model.max_model_len == config.model.hf_config.max_position_embeddings

    class Yarn:
        max_position_embeddings = 4096
        rope_parameters = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}

    assert derive_max_model_len(Yarn(), None) == 16384


def test_non_default_values_of_arguments_that_change_nothing_here_warn(llama_dir):
    with pytest.warns(UserWarning, match="disable_log_stats .*served_model_name"):
        EngineArgs(model=str(llama_dir), disable_log_stats=True, served_model_name="m").create_engine_config()


# ---- names and inputs -------------------------------------------------------------------------------


def test_prompts_in_every_form_vllm_takes(llm):
    tokenizer = llm.get_tokenizer()
    ids = tokenizer.encode(PROMPTS[0])
    expected = _tokens(llm.generate(PROMPTS[0], GREEDY, use_tqdm=False))
    assert _tokens(llm.generate(ids, GREEDY, use_tqdm=False)) == expected  # a bare list of ints: one prompt
    assert _tokens(llm.generate(TokensPrompt(prompt_token_ids=ids), GREEDY, use_tqdm=False)) == expected
    assert _tokens(llm.generate(TextPrompt(prompt=PROMPTS[0]), GREEDY, use_tqdm=False)) == expected
    assert _tokens(llm.generate(prompt_token_ids=[ids], sampling_params=GREEDY, use_tqdm=False)) == expected


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(llm):
    ids = list(range(5, 25))
    kept = llm.generate(ids, GREEDY, use_tqdm=False, tokenization_kwargs={"truncate_prompt_tokens": 6})[0]
    assert kept.prompt_token_ids == ids[-6:]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, truncate_prompt_tokens=6)
    assert llm.generate(ids, params, use_tqdm=False)[0].outputs[0].token_ids == kept.outputs[0].token_ids


def test_cache_salt_keeps_prompts_apart_in_the_prefix_cache(llm):
    prompt = {"prompt_token_ids": list(range(7, 7 + 40))}
    llm.generate(prompt, GREEDY, use_tqdm=False)
    assert llm.generate(prompt, GREEDY, use_tqdm=False)[0].num_cached_tokens > 0
    salted = llm.generate({**prompt, "cache_salt": "tenant-a"}, GREEDY, use_tqdm=False)[0]
    assert salted.num_cached_tokens == 0
    assert salted.outputs[0].token_ids == llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_logprobs_of_the_whole_vocabulary_with_no_cap(llama_dir):
    llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, max_logprobs=-1)
    output = llm.generate(PROMPTS[0], SamplingParams(max_tokens=2, logprobs=-1), use_tqdm=False)[0].outputs[0]
    vocab = llm.llm_engine_config.model.vocab_size
    assert all(len(position) == vocab for position in output.logprobs)
    first = output.logprobs[0]
    assert next(iter(first)) == output.token_ids[0]  # the sampled token first, as vLLM
    assert math.isclose(sum(math.exp(lp.logprob) for lp in first.values()), 1.0, rel_tol=1e-4)


def test_override_generation_config_sets_the_defaults(llama_dir):
    llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN,
              override_generation_config={"temperature": 0.3, "max_new_tokens": 5})
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.max_tokens) == (0.3, 5)


def test_skip_tokenizer_init_serves_token_ids(llama_dir, llm):
    bare = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, skip_tokenizer_init=True)
    ids = llm.get_tokenizer().encode(PROMPTS[0])
    output = bare.generate(ids, GREEDY, use_tqdm=False)[0].outputs[0]
    assert output.token_ids == llm.generate(ids, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert output.text == ""
    with pytest.raises(ValueError, match="skip_tokenizer_init=True: pass prompt_token_ids"):
        bare.generate("text", GREEDY, use_tqdm=False)


def test_priority_scheduling_admits_the_lowest_value_first(llama_dir):
    llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, max_num_seqs=1,
              scheduling_policy="priority")
    prompts = [{"prompt_token_ids": [5, 6, 7 + i]} for i in range(3)]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False, priority=[2, 0, 1])
    order = sorted(range(3), key=lambda i: outputs[i].metrics.first_token_ts)
    assert order == [1, 2, 0]


# ---- chat -------------------------------------------------------------------------------------------

PARTS_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}:{% for part in m['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if tools %}tools:{{ tools | length }}\n{% endif %}{% if thinking %}think\n{% endif %}"
)
STRING_TEMPLATE = "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}\n{% endfor %}"


def test_chat_takes_openai_content_parts_tools_and_template_kwargs(llm):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    plain = [{"role": "user", "content": "Hello\nthere"}]
    string_form = llm.chat(parts, GREEDY, use_tqdm=False, chat_template=STRING_TEMPLATE)[0]
    assert string_form.prompt == "user:Hello\nthere\n"
    assert string_form.outputs[0].token_ids == llm.chat(plain, GREEDY, use_tqdm=False, chat_template=STRING_TEMPLATE)[0].outputs[0].token_ids
    openai_form = llm.chat(
        parts, GREEDY, use_tqdm=False, chat_template=PARTS_TEMPLATE, tools=[{"type": "function", "function": {"name": "f"}}],
        chat_template_kwargs={"thinking": True},
    )[0]
    assert openai_form.prompt == "user:Hellotheretools:1\nthink\n"  # the template trims newlines after its blocks


def test_the_content_format_is_read_from_the_templates_syntax_tree():
    assert template_loops_over_content(PARTS_TEMPLATE)
    assert not template_loops_over_content(STRING_TEMPLATE)


def test_an_engine_chat_template_is_chats_default(llama_dir, tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text(STRING_TEMPLATE)
    llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, chat_template=str(path))
    assert llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False)[0].prompt == "user:hi\n"


# ---- engine control ---------------------------------------------------------------------------------


def test_metrics_count_what_the_engine_did(llama_dir):
    llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN)
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    metrics = {m.name: m for m in llm.get_metrics() if "finished_reason" not in m.labels}
    assert isinstance(metrics["vllm:prompt_tokens"], Counter)
    assert metrics["vllm:prompt_tokens"].value == sum(len(o.prompt_token_ids) for o in outputs)
    assert metrics["vllm:generation_tokens"].value == sum(len(o.outputs[0].token_ids) for o in outputs)
    assert isinstance(metrics["vllm:num_requests_running"], Gauge) and metrics["vllm:num_requests_running"].value == 0
    ttft = metrics["vllm:time_to_first_token_seconds"]
    assert isinstance(ttft, Histogram) and ttft.count == len(PROMPTS) and ttft.buckets["+Inf"] == ttft.count
    success = [m for m in llm.get_metrics() if m.name == "vllm:request_success" and m.labels["finished_reason"] == "length"]
    assert success[0].value == len(PROMPTS)
    first = outputs[0].metrics
    assert 0 < first.queued_ts <= first.scheduled_ts <= first.first_token_ts <= first.last_token_ts
    assert first.num_generation_tokens == GREEDY.max_tokens


def test_reset_prefix_cache_forgets_cached_blocks(llm):
    prompt = {"prompt_token_ids": list(range(30, 70))}
    llm.generate(prompt, GREEDY, use_tqdm=False)
    assert llm.generate(prompt, GREEDY, use_tqdm=False)[0].num_cached_tokens > 0
    assert llm.reset_prefix_cache()
    assert llm.generate(prompt, GREEDY, use_tqdm=False)[0].num_cached_tokens == 0


def test_enqueue_then_wait_for_completion(llm):
    expected = _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    ids = llm.enqueue(PROMPTS[:1], GREEDY)
    ids += llm.enqueue(PROMPTS[1:], GREEDY)
    outputs = llm.wait_for_completion(use_tqdm=False)
    assert [o.request_id for o in outputs] == ids
    assert _tokens(outputs) == expected


def test_profiling_writes_a_trace(llama_dir, tmp_path):
    llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN,
              profiler_config={"profiler": "torch", "torch_profiler_dir": str(tmp_path)})
    llm.start_profile()
    llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    llm.stop_profile()
    traces = list(tmp_path.rglob("*.json"))
    assert traces and json.loads(traces[0].read_text())["traceEvents"]


def test_what_vllm_scripts_read_from_the_engine(llm):
    assert isinstance(llm.llm_engine, LLMEngine)
    assert llm.llm_engine.get_tokenizer() is llm.get_tokenizer()
    assert llm.model_config.max_model_len == MAX_MODEL_LEN
    assert llm.get_world_size() == 1
    assert llm.apply_model(lambda model: type(model).__name__) == ["LlamaForCausalLM"]


def test_load_format_dummy_builds_random_weights_of_the_checkpoints_shape(llama_dir):
    llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, load_format="dummy")
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == GREEDY.max_tokens for o in outputs)
    weights = [p for p in llm.llm_engine.runner.model.parameters()]
    assert all(float(p.abs().max()) <= 1e-3 for p in weights)
