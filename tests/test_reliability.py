"""Reliability under load, KV pressure, interrupts and repeated use of one engine."""

from __future__ import annotations

import gc
import random
import sys
import threading
import weakref

import pytest
import torch

from fxllm import LLM, BeamSearchParams, SamplingParams
from tests.conftest import assert_all_blocks_free

MAX_MODEL_LEN = 80
SOAK_REQUESTS = 2000
SOAK_RUNS = 3
# 32 blocks of 16 tokens hold ~8 of the soak's requests at once: preemption is certain.
SOAK_BLOCKS = 32
# Growth of resident memory allowed between the 2nd and 3rd identical run: caches are
# warm after the 1st, so a leak of per-request state (2,000 requests a run) shows up.
RSS_TOLERANCE_BYTES = 32 << 20
PROMPT_CUTS = 6  # prompts that end inside a character, for the decoding test


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


def _soak_workload() -> tuple[list[dict], list[SamplingParams]]:
    rng = random.Random(0)
    prompts, params = [], []
    for index in range(SOAK_REQUESTS):
        prompts.append({"prompt_token_ids": [rng.randrange(3, 300) for _ in range(rng.randint(1, 48))]})
        max_tokens = rng.randint(1, 24)
        kind = index % 4
        if kind == 0:
            params.append(SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        elif kind == 1:
            params.append(SamplingParams(temperature=0.8, top_p=0.9, seed=index, max_tokens=max_tokens, ignore_eos=True))
        elif kind == 2:
            params.append(SamplingParams(n=2, temperature=1.0, top_k=20, seed=index, max_tokens=max_tokens, ignore_eos=True))
        else:
            params.append(SamplingParams(temperature=0, logprobs=2, max_tokens=max_tokens, ignore_eos=True))
    return prompts, params


def test_soak_answers_every_request_once_in_order_three_times_alike(llama_dir):
    llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, num_gpu_blocks_override=SOAK_BLOCKS)
    prompts, params = _soak_workload()
    runs, rss = [], []
    for _ in range(SOAK_RUNS):
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert len(outputs) == SOAK_REQUESTS
        signature = []
        for prompt, sampling, output in zip(prompts, params, outputs):
            assert output.prompt_token_ids == prompt["prompt_token_ids"]
            assert [c.index for c in output.outputs] == list(range(sampling.n))
            for completion in output.outputs:
                assert len(completion.token_ids) == sampling.max_tokens
                assert completion.finish_reason == "length"
                if sampling.logprobs is not None:
                    assert len(completion.logprobs) == sampling.max_tokens
            signature.append(tuple(tuple(c.token_ids) for c in output.outputs))
        assert_all_blocks_free(llm)
        runs.append(signature)
        gc.collect()
        rss.append(_rss_bytes())
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert runs[0] == runs[1] == runs[2]
    assert rss[2] - rss[1] < RSS_TOLERANCE_BYTES, f"RSS grew {(rss[2] - rss[1]) >> 20} MiB between runs 2 and 3"


# Where the interrupt lands: in a step, or (async scheduling) while a step is in flight
# and the one before it has its tokens taken.
INTERRUPTED = {"step": "step", "step in flight": "_complete"}


@pytest.mark.parametrize("moment", sorted(INTERRUPTED))
def test_keyboard_interrupt_inside_generate_frees_the_calls_requests(llama_dir, monkeypatch, moment):
    llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN,
              async_scheduling=moment == "step in flight")
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 20, 40)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    baseline = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    engine = llm.llm_engine
    method = INTERRUPTED[moment]
    real = getattr(engine, method)
    calls = {"count": 0}

    def interrupting(*args):
        calls["count"] += 1
        if calls["count"] == 4:  # mid-call: prompts computed, decoding under way
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(engine, method, interrupting)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, params, use_tqdm=False)
    assert_all_blocks_free(llm)
    monkeypatch.setattr(engine, method, real)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == baseline


@pytest.mark.parametrize("engine_args", [{"max_num_seqs": 1}, {"max_num_seqs": 3}, {"max_num_batched_tokens": 5}, {"max_num_batched_tokens": 37, "max_num_seqs": 7}])
def test_greedy_tokens_do_not_depend_on_batch_limits(llama_dir, engine_args):
    rng = random.Random(1)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 300) for _ in range(rng.randint(1, 30))]} for _ in range(9)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    reference = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN)
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params, use_tqdm=False)]
    llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, **engine_args)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected


def test_seeded_and_greedy_requests_repeat_exactly(llama_dir):
    llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN)
    params = [SamplingParams(temperature=0.9, seed=11, max_tokens=12, ignore_eos=True), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)]
    prompts = ["Hello world", "Once upon a time"]
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    again = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    fresh = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN)
    assert first == again == [o.outputs[0].token_ids for o in fresh.generate(prompts, params, use_tqdm=False)]


def test_three_engines_are_created_and_freed_in_one_process(llama_dir):
    models = []
    for _ in range(3):
        llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN)
        assert llm.generate("Hello", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
        models.append(weakref.ref(llm.llm_engine.runner.model))
        del llm
        gc.collect()
    assert all(ref() is None for ref in models), "an engine's model outlived its LLM"


@pytest.fixture
def no_garbage_collector():
    """Objects die by reference count alone: a reference cycle keeps them."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_del_frees_the_engine_without_the_garbage_collector(llama_dir, no_garbage_collector, async_scheduling):
    """A cycle through the engine would hold its model and KV cache (GiBs of device memory)
    until the collector happened to run: the next engine in the process could run out."""
    llm = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, async_scheduling=async_scheduling)
    llm.generate(["Hello", "Hi"], SamplingParams(max_tokens=4), use_tqdm=False)
    runner, model = weakref.ref(llm.llm_engine.runner), weakref.ref(llm.llm_engine.runner.model)
    del llm
    assert runner() is None and model() is None


@pytest.mark.gpu
def test_gpu_memory_returns_after_the_engine_is_deleted(llama_dir, no_garbage_collector):
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    baseline = torch.cuda.mem_get_info()[0]
    # Compiled with CUDA graphs (the default): graphs and pieces must not hold the engine either.
    llm = LLM(model=str(llama_dir), device="cuda", max_model_len=MAX_MODEL_LEN, gpu_memory_utilization=0.5)
    llm.generate("Hello", SamplingParams(max_tokens=4), use_tqdm=False)
    del llm
    torch.cuda.empty_cache()
    free_after = torch.cuda.mem_get_info()[0]
    assert free_after >= baseline * 0.95


# ---- edges found by trying fxllm as a new user would ------------------------------------------


@pytest.fixture(scope="module")
def shared_llm(llama_dir):
    return LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN)


def test_an_interrupt_while_requests_are_being_queued_leaves_none_behind(shared_llm, monkeypatch):
    engine = shared_llm.llm_engine
    prompts = [{"prompt_token_ids": [5, 6, 7 + i]} for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in shared_llm.generate(prompts, params, use_tqdm=False)]
    real_add, calls = engine.add_request, {"count": 0}

    def interrupted_add(request):
        calls["count"] += 1
        if calls["count"] == 4:
            raise KeyboardInterrupt
        real_add(request)

    monkeypatch.setattr(engine, "add_request", interrupted_add)
    with pytest.raises(KeyboardInterrupt):
        shared_llm.generate(prompts, params, use_tqdm=False)
    monkeypatch.setattr(engine, "add_request", real_add)
    assert_all_blocks_free(shared_llm)
    assert [o.outputs[0].token_ids for o in shared_llm.generate(prompts, params, use_tqdm=False)] == expected


def test_beam_search_gives_each_prompt_the_beams_it_gets_alone(shared_llm):
    """A long prompt that reaches max_model_len early does not end the short one's search."""
    params = BeamSearchParams(beam_width=2, max_tokens=20, ignore_eos=True)
    short = {"prompt_token_ids": [5, 6, 7]}
    long = {"prompt_token_ids": [(3 * i) % 200 + 3 for i in range(MAX_MODEL_LEN - 8)]}
    alone = shared_llm.beam_search([short], params)[0]
    together = shared_llm.beam_search([short, long], params)
    assert [b.tokens for b in together[0].sequences] == [b.tokens for b in alone.sequences]
    assert len(alone.sequences[0].tokens) == 3 + 20
    assert len(together[1].sequences[0].tokens) == MAX_MODEL_LEN  # the long one stopped at the limit


def test_beam_search_refuses_what_generate_refuses(shared_llm):
    too_long = {"prompt_token_ids": [5] * MAX_MODEL_LEN}
    with pytest.raises(ValueError, match="max_model_len"):
        shared_llm.beam_search([too_long], BeamSearchParams(beam_width=2, max_tokens=4))
    vocab = shared_llm.llm_engine_config.model.vocab_size
    with pytest.raises(ValueError, match="beam_width"):
        shared_llm.beam_search(["Hello"], BeamSearchParams(beam_width=vocab, max_tokens=2))
    assert shared_llm.beam_search(["Hello"], BeamSearchParams(beam_width=2, max_tokens=2))[0].sequences


def test_calls_from_two_threads_on_one_llm_take_turns_and_both_complete(shared_llm):
    prompts = [{"prompt_token_ids": [9, 8, 7 + i]} for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in shared_llm.generate(prompts, params, use_tqdm=False)]
    results, errors = {}, []

    def call(name):
        try:
            results[name] = [o.outputs[0].token_ids for o in shared_llm.generate(prompts, params, use_tqdm=False)]
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=call, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert results == {"a": expected, "b": expected}


def test_two_engines_driven_from_two_threads_never_share_a_forward_context(llama_dir, shared_llm):
    other = LLM(model=str(llama_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN)
    prompts = [{"prompt_token_ids": [4, 5, 6 + i]} for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in shared_llm.generate(prompts, params, use_tqdm=False)]
    results, errors = {}, []

    def call(name, llm):
        try:
            for _ in range(3):
                results[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=call, args=(name, llm)) for name, llm in (("a", shared_llm), ("b", other))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert results == {"a": expected, "b": expected}


def test_a_progress_bar_without_a_terminal_stream_neither_fails_nor_leaks_a_request(shared_llm, monkeypatch):
    monkeypatch.setattr(sys, "stderr", None)  # pythonw, some daemons
    outputs = shared_llm.generate(["Hello"], SamplingParams(max_tokens=3), use_tqdm=True)
    assert len(outputs[0].outputs[0].token_ids) >= 1
    assert_all_blocks_free(shared_llm)


def test_a_callable_use_tqdm_builds_the_progress_bar(shared_llm):
    built = []

    def progress(**kwargs):
        from tqdm import tqdm

        built.append(kwargs["total"])
        return tqdm(disable=True, **kwargs)

    shared_llm.generate(["Hello", "World"], SamplingParams(max_tokens=2), use_tqdm=progress)
    assert built == [2]


def test_a_stop_tokens_text_joins_the_output_only_when_asked(shared_llm):
    tokenizer = shared_llm.get_tokenizer()
    probe = shared_llm.generate("Hello", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    stop = probe.outputs[0].token_ids[3]
    ids = probe.outputs[0].token_ids[: probe.outputs[0].token_ids.index(stop) + 1]
    for include in (False, True):
        params = SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[stop], include_stop_str_in_output=include)
        out = shared_llm.generate("Hello", params, use_tqdm=False)[0].outputs[0]
        assert out.token_ids == ids and out.finish_reason == "stop" and out.stop_reason == stop
        visible = ids if include else ids[:-1]
        assert out.text == tokenizer.decode(visible, skip_special_tokens=True)


@pytest.mark.slow
def test_output_text_is_what_the_generated_tokens_decode_to(tmp_path):
    """A prompt whose ids end inside a multi-byte character: none of its bytes reach the
    output's text, on the stream path (stop strings) and the bulk path alike."""
    from fxllm import default_model

    llm = LLM(model=default_model(), enforce_eager=True, max_model_len=256)
    tokenizer = llm.get_tokenizer()
    ids = tokenizer.encode("Café 東京 🙂 naïve — ‘quotes’ 日本語のテキスト", add_special_tokens=False)
    cuts = [cut for cut in range(1, len(ids)) if tokenizer.decode(ids[:cut]).endswith("\ufffd")][:PROMPT_CUTS]
    assert cuts, "the text splits no character across tokens: the test misses its case"
    prompts = [{"prompt_token_ids": ids[:cut]} for cut in cuts]
    for stop in (None, "zzzz"):  # no stop string: one decode at the end; a stop string: the stream
        params = [SamplingParams(temperature=1.0, seed=cut, max_tokens=12, stop=stop) for cut in cuts]
        for cut, output in zip(cuts, llm.generate(prompts, params, use_tqdm=False)):
            completion = output.outputs[0]
            assert completion.text == tokenizer.decode(completion.token_ids), (cut, stop)


def test_a_damaged_compile_cache_entry_is_compiled_again(llama_dir, tmp_path):
    cache_dir = tmp_path / "compile-cache"
    config = {"cache_dir": str(cache_dir), "cudagraph_mode": "NONE"}
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = LLM(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, compilation_config=config)
    expected = first.generate("Hello", params, use_tqdm=False)[0].outputs[0].token_ids
    del first
    entries = sorted(cache_dir.rglob("*.bin"))
    assert entries
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # what a full disk mid-write leaves
    entries[-1].write_bytes(b"")
    with _logs_warning("damaged compile-cache entry"):
        second = LLM(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, compilation_config=config)
    assert second.generate("Hello", params, use_tqdm=False)[0].outputs[0].token_ids == expected
    assert second.compile_report().inductor_compiles >= 1  # the damaged pieces were compiled again


def test_a_compile_cache_dir_that_is_a_file_is_named(llama_dir, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError, match="not-a-directory is a file"):
        LLM(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, compilation_config={"cache_dir": str(blocker)})


class _logs_warning:
    """Asserts that the fxllm.compiler.cache logger warns with ``text`` inside the block."""

    def __init__(self, text: str):
        self.text, self.records = text, []

    def __enter__(self):
        import logging

        self.handler = logging.Handler()
        self.handler.emit = self.records.append
        self.logger = logging.getLogger("fxllm.compiler.cache")
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        if exc[0] is None:
            assert any(self.text in record.getMessage() for record in self.records), "no warning was logged"
