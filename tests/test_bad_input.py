"""Bad input raises a clear error for the whole call, queues nothing, and the engine keeps serving."""

from __future__ import annotations

import json
import shutil

import pytest

from fxllm import LLM, SamplingParams
from fxllm.lora.request import LoRARequest

GOOD_PROMPTS = ["The capital of France is", "Hello world"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def baseline(llm):
    return _tokens(llm.generate(GOOD_PROMPTS, GREEDY, use_tqdm=False))


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def _assert_still_serves(llm, baseline):
    engine = llm.llm_engine
    assert not engine.has_unfinished(), "a rejected call left requests queued"
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
    assert _tokens(llm.generate(GOOD_PROMPTS, GREEDY, use_tqdm=False)) == baseline


GOOD = GOOD_PROMPTS[0]
# Each bad call puts a good prompt first: nothing of the call may run half-way.
BAD_CALLS = {
    "prompt_longer_than_max_model_len": ([GOOD, "word " * 200], GREEDY, ValueError, "max_model_len"),
    "token_id_above_vocab": ([GOOD, {"prompt_token_ids": [1, 2, 10**6]}], GREEDY, ValueError, "vocabulary"),
    "negative_token_id": ([GOOD, {"prompt_token_ids": [-1, 2]}], GREEDY, ValueError, "vocabulary"),
    "empty_prompt": ([GOOD, ""], GREEDY, ValueError, "prompt 1 is empty"),
    "empty_token_list": ([GOOD, {"prompt_token_ids": []}], GREEDY, ValueError, "prompt 1 is empty"),
    "sampling_params_list_of_wrong_length": (GOOD_PROMPTS, [GREEDY] * 3, ValueError, "3 sampling_params for 2 prompts"),
    "prompt_of_wrong_type": ([GOOD, 42], GREEDY, TypeError, "prompt 1 must be a string"),
    "prompts_not_a_list": (42, GREEDY, TypeError, "prompts must be"),
    "token_ids_not_ints": ([GOOD, {"prompt_token_ids": ["a"]}], GREEDY, TypeError, "list of ints"),
    "dict_without_prompt_keys": ([GOOD, {"text": "hi"}], GREEDY, TypeError, "prompt 1 must be"),
    "unknown_prompt_key": ([GOOD, {"prompt": "hi", "promt_id": 3}], GREEDY, ValueError, "prompt 1 has unknown keys"),
    "logprobs_above_max_logprobs": ([GOOD], SamplingParams(logprobs=21, max_tokens=2), ValueError, "max_logprobs=20"),
    "whole_vocabulary_above_max_logprobs": ([GOOD], SamplingParams(prompt_logprobs=-1), ValueError, "max_logprobs"),
    "every_allowed_token_banned": (
        GOOD_PROMPTS, [GREEDY, SamplingParams(allowed_token_ids=[2], min_tokens=2, max_tokens=4)], ValueError,
        "ban every token they allow",
    ),
    "lora_request_given": ([GOOD], GREEDY, ValueError, "LoRA adapters are not supported yet"),
    "priority_without_the_policy": ([GOOD], GREEDY, ValueError, "scheduling_policy"),
    "unknown_tokenization_kwarg": ([GOOD], GREEDY, ValueError, "tokenization_kwargs has keys"),
    "prompt_embeds": ([GOOD, {"prompt_embeds": None}], GREEDY, ValueError, "prompt_embeds are not supported"),
}
# Call keywords of the cases above that need them.
BAD_CALL_KEYWORDS = {
    "lora_request_given": {"lora_request": LoRARequest("sql", 1, "/adapters/sql")},
    "priority_without_the_policy": {"priority": [1]},
    "unknown_tokenization_kwarg": {"tokenization_kwargs": {"padding": True}},
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_prompt_in_a_batch_raises_and_engine_still_serves(llm, baseline, case):
    prompts, params, error_type, message = BAD_CALLS[case]
    with pytest.raises(error_type, match=message):
        llm.generate(prompts, params, use_tqdm=False, **BAD_CALL_KEYWORDS.get(case, {}))
    _assert_still_serves(llm, baseline)


CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
# Each conversation is bad in one way; the error names it.
BAD_CONVERSATIONS = {
    "no_role": ([{"content": "hi"}], ValueError, "conversation 1, message 0 has no 'role'"),
    "no_content": ([{"role": "user"}], ValueError, r"conversation 1, message 0 \(user\) has no 'content'"),
    "content_none": ([{"role": "user", "content": None}], ValueError, "'content' is None"),
    "unknown_part": ([{"role": "user", "content": [{"type": "audio", "audio": b""}]}], ValueError, "unknown content part"),
    "image_on_a_text_model": (
        [{"role": "user", "content": [{"type": "image_pil", "image_pil": None}, {"type": "text", "text": "hi"}]}],
        ValueError, "text-only model",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONVERSATIONS))
def test_a_bad_chat_message_names_its_conversation_message_and_field(llm, baseline, case):
    conversation, error_type, message = BAD_CONVERSATIONS[case]
    with pytest.raises(error_type, match=message):
        llm.chat([[{"role": "user", "content": "fine"}], conversation], GREEDY, use_tqdm=False, chat_template=CHAT_TEMPLATE)
    _assert_still_serves(llm, baseline)


@pytest.mark.parametrize(
    "template, message",
    [
        ("{% for m in messages %}{{ m.content }", "the chat template failed: TemplateSyntaxError"),
        ("{{ raise_exception('only user turns') }}", "the chat template failed: .*only user turns"),
    ],
    ids=["syntax_error", "raise_exception"],
)
def test_a_failing_chat_template_says_why(llm, baseline, template, message):
    with pytest.raises(ValueError, match=message):
        llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False, chat_template=template)
    _assert_still_serves(llm, baseline)


def test_a_huge_top_k_in_a_mixed_batch_means_every_token(llm):
    params = [SamplingParams(top_k=5, seed=1, max_tokens=3), SamplingParams(top_k=2**70, seed=1, max_tokens=3)]
    outputs = llm.generate(GOOD_PROMPTS, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) >= 1 for o in outputs)


# Engine arguments of the wrong type, range or finiteness: an error naming the argument.
BAD_ENGINE_ARGUMENTS = [
    ({"enable_prefix_caching": "no"}, TypeError, "enable_prefix_caching must be True or False"),
    ({"disable_custom_all_reduce": 1}, TypeError, "disable_custom_all_reduce must be True or False"),
    ({"max_num_seqs": 2.5}, TypeError, "max_num_seqs must be an int"),
    ({"seed": 2**64}, ValueError, "seed must be an int in"),
    ({"gpu_memory_utilization": float("nan")}, ValueError, "gpu_memory_utilization must be a finite number"),
    ({"max_logprobs": -2}, ValueError, "max_logprobs must be an int >= -1"),
    ({"device": "meta"}, ValueError, "device='meta' is not supported"),
    ({"compilation_config": {"debug_dump_path": 12}}, TypeError, "debug_dump_path must be a path"),
    ({"hf_overrides": {"num_hidden_layers": -1}}, ValueError, "num_hidden_layers must be a positive int, got -1"),
    ({"hf_overrides": {"num_attention_heads": 0}}, ValueError, "num_attention_heads must be a positive int"),
    ({"hf_overrides": {"max_position_embeddings": -5}}, ValueError, "max_position_embeddings must be a positive int"),
    ({"hf_overrides": {"rope_theta": "abc"}}, ValueError, "rope_theta must be a positive number"),
    ({"hf_overrides": {"hidden_size": 96}}, ValueError, "shape"),
    ({"generation_config": "/nonexistent/folder"}, FileNotFoundError, "generation_config='/nonexistent/folder'"),
    ({"enable_lora": True}, ValueError, "enable_lora=True: LoRA adapters are not supported yet"),
    ({"cpu_offload_gb": 4}, ValueError, "cpu_offload_gb=4: fxllm keeps every weight"),
]


@pytest.mark.parametrize("kwargs, error_type, message", BAD_ENGINE_ARGUMENTS, ids=lambda case: str(case)[:40])
def test_bad_engine_arguments_name_the_argument(llama_dir, kwargs, error_type, message):
    with pytest.raises(error_type, match=message):
        LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, **kwargs)


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_a_bad_cpu_kv_cache_size_names_the_variable(llama_dir, monkeypatch, value):
    monkeypatch.setenv("FXLLM_CPU_KVCACHE_SPACE", value)
    with pytest.raises(ValueError, match="FXLLM_CPU_KVCACHE_SPACE must be > 0 GiB"):
        LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN)


def test_a_generation_config_that_is_not_json_falls_back_to_the_defaults(llama_dir, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(llama_dir, broken)
    (broken / "generation_config.json").write_text("{ not json")
    with pytest.warns(UserWarning, match="generation_config.json is not valid JSON"):
        llm = LLM(model=str(broken), enforce_eager=True, max_model_len=MAX_MODEL_LEN)
    assert llm.get_default_sampling_params() == SamplingParams()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens must be an int >= 1"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -2}, "top_k must be an int >= -1"),
    ],
)
def test_invalid_sampling_params_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("top_k", [0, -1])
def test_top_k_zero_and_minus_one_mean_all_tokens(llm, top_k):
    params = SamplingParams(temperature=1.0, top_k=top_k, seed=3, max_tokens=6, ignore_eos=True)
    reference = SamplingParams(temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    assert _tokens(llm.generate(GOOD_PROMPTS, params, use_tqdm=False)) == _tokens(
        llm.generate(GOOD_PROMPTS, reference, use_tqdm=False)
    )


def test_missing_model_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(model=str(tmp_path / "nowhere"))


def test_directory_without_config_json_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LLM(model=str(tmp_path))


def test_unknown_architecture_lists_supported_ones(tmp_path, llama_dir):
    model_dir = tmp_path / "model"
    shutil.copytree(llama_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="FancyNewForCausalLM.*Supported: .*LlamaForCausalLM"):
        LLM(model=str(model_dir))


def test_truncated_safetensors_error_names_the_file(tmp_path, llama_dir):
    model_dir = tmp_path / "model"
    shutil.copytree(llama_dir, model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        LLM(model=str(model_dir), enforce_eager=True)


def test_corrupt_safetensors_error_names_the_file(tmp_path, llama_dir):
    model_dir = tmp_path / "model"
    shutil.copytree(llama_dir, model_dir)
    (model_dir / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ValueError, match="model.safetensors"):
        LLM(model=str(model_dir), enforce_eager=True)


def test_a_checkpoint_missing_a_weight_is_a_clear_error(tmp_path, llama_dir):
    """Layers are built without initializing their parameters: one the checkpoint lacks must
    stop the load, not serve uninitialized memory."""
    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "model"
    shutil.copytree(llama_dir, model_dir)
    weights = load_file(model_dir / "model.safetensors")
    del weights["model.layers.0.mlp.down_proj.weight"]
    save_file(weights, model_dir / "model.safetensors")
    with pytest.raises(ValueError, match="missing weights for: model.layers.0.mlp.down_proj.weight"):
        LLM(model=str(model_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN)


def test_building_a_model_runs_no_parameter_initializer(llama_dir, monkeypatch):
    """The checkpoint overwrites every parameter: initializing them first only costs start-up time
    (seconds on a CPU for a 1B model). The initializers are torch's own again afterwards."""
    import torch

    calls = []

    def counting_initializer(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return tensor

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", counting_initializer)
    monkeypatch.setattr(torch.nn.init, "normal_", counting_initializer)
    llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN)
    assert calls == []
    assert torch.nn.init.kaiming_uniform_ is counting_initializer
    torch.nn.Linear(4, 4)  # outside the build the initializers run
    assert calls == [(4, 4)]
    assert all(torch.isfinite(p).all() for p in llm.llm_engine.runner.model.parameters())


def test_unknown_keyword_is_named(llama_dir):
    with pytest.raises(TypeError, match="not_a_vllm_argument"):
        LLM(model=str(llama_dir), not_a_vllm_argument=1)


def test_vllm_arguments_that_change_nothing_here_warn_once_naming_each(llama_dir):
    with pytest.warns(UserWarning, match="change nothing in fxllm: swap_space .*; trust_remote_code"):
        LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, trust_remote_code=True, swap_space=8)


def test_disable_custom_all_reduce_is_taken_not_ignored(llama_dir):
    """vLLM's switch for its own all-reduce turns fxllm's one-shot all-reduce off."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, disable_custom_all_reduce=True)
    assert llm.llm_engine_config.parallel.disable_custom_all_reduce
    assert llm.compile_report().one_shot_all_reduce_bytes == 0


def test_max_model_len_that_cannot_fit_says_how_to_fix(llama_dir):
    with pytest.raises(ValueError, match="lower max_model_len"):
        LLM(model=str(llama_dir), enforce_eager=True, max_model_len=256, num_gpu_blocks_override=4)


def test_max_model_len_above_the_models_limit_is_rejected(llama_dir):
    with pytest.raises(ValueError, match="larger than the model's maximum length 512"):
        LLM(model=str(llama_dir), enforce_eager=True, max_model_len=100000)


def test_unknown_rope_type_is_a_clear_error(llama_dir):
    rope = {"rope_type": "spiral", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="unknown rope type 'spiral'; supported: default, "):
        LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, hf_overrides={"rope_parameters": rope})


def test_hf_overrides_callable_is_applied(llama_dir):
    def rename(config):
        config.architectures = ["MistralForCausalLM"]
        return config

    llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, hf_overrides=rename)
    assert llm.llm_engine_config.model.architecture == "MistralForCausalLM"
