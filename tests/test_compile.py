"""The compiler spine: capture once, split at attention, Inductor per piece, equal to eager.

Compiled engines are expensive on CPU (a cold Inductor compile takes tens of
seconds), so each is built once per module and shared by the tests.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from fxllm import LLM, SamplingParams
from fxllm.config import CompilationConfig, CompilationLevel

MAX_MODEL_LEN = 256
PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
# Steps of T = 1, 3, 17, 64 and 129 tokens: lone prompts of 17/64/129 tokens decode at
# T=1; three short prompts together decode at T=3.
SWEEP = [[17], [64], [129], [5, 9, 12]]
# 2 layers -> 2 attention pieces, and 3 compute pieces around them:
# [embed + layer 0 up to attention] [attn] [layer 0 rest + layer 1 up to attention] [attn] [layer 1 rest + norm]
TWO_LAYER_PIECES = 5


def _prompts(lengths: list[int], seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, 300) for _ in range(n)]} for n in lengths]


def _sweep_tokens(llm: LLM) -> list[list[int]]:
    tokens = []
    for index, lengths in enumerate(SWEEP):
        outputs = llm.generate(_prompts(lengths, index), PARAMS, use_tqdm=False)
        tokens += [o.outputs[0].token_ids for o in outputs]
    return tokens


def _engine(model_dir, **compilation) -> LLM:
    return LLM(model=str(model_dir), max_model_len=MAX_MODEL_LEN, compilation_config=compilation)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("compile_cache")


@pytest.fixture(scope="module")
def eager_tokens(llama_dir):
    return _sweep_tokens(LLM(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, enforce_eager=True))


@pytest.fixture(scope="module")
def piecewise(llama_dir, cache_dir):
    return _engine(llama_dir, level=3, compile_sizes=[3], cache_dir=str(cache_dir))


def test_piecewise_splits_a_two_layer_model_into_five_pieces(piecewise):
    report = piecewise.compile_report()
    assert report.level == CompilationLevel.PIECEWISE
    assert report.pieces == TWO_LAYER_PIECES
    assert report.splitting_ops == ["fxllm.attention"]
    attention_pieces = [ops for ops in report.piece_ops if ops.get("fxllm.attention")]
    assert len(attention_pieces) == 2 and all(ops == {"fxllm.attention": 1} for ops in attention_pieces)
    assert report.piece_ops[0]["embedding"] == 1
    assert report.compiled_shapes == ["dynamic", "3"]
    assert report.inductor_compiles == report.unique_pieces > 0
    assert report.to_dict()["pieces"] == TWO_LAYER_PIECES


def test_q_k_v_reach_attention_without_a_copy(piecewise):
    """The value slice of the fused projection goes to the attention op as a strided view: a
    copy would cost a kernel per layer on the GPU."""
    copies = ("Tensor.contiguous", "clone", "Tensor.clone", "aten.clone")
    assert not [ops for ops in piecewise.compile_report().piece_ops if any(op in ops for op in copies)]


def test_piecewise_equals_eager_with_one_capture_for_every_step_size(piecewise, eager_tokens):
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert _sweep_tokens(piecewise) == eager_tokens
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_before
    assert piecewise.compile_report().dynamo_compiles == 1


@pytest.mark.parametrize(
    "compilation",
    [
        {"level": CompilationLevel.DYNAMO_ONCE},
        {"level": CompilationLevel.DYNAMO_AS_IS},
        {"level": CompilationLevel.PIECEWISE, "use_inductor": False},
        {"level": CompilationLevel.PIECEWISE, "splitting_ops": []},
    ],
    ids=["level2", "level1", "no_inductor", "no_split"],
)
def test_other_levels_equal_eager(llama_dir, cache_dir, eager_tokens, compilation):
    llm = _engine(llama_dir, cache_dir=str(cache_dir), **compilation)
    assert _sweep_tokens(llm) == eager_tokens
    report = llm.compile_report()
    assert report.dynamo_compiles == 1
    if compilation.get("use_inductor") is False:
        assert report.inductor_compiles == 0
    if compilation.get("splitting_ops") == [] or compilation["level"] == CompilationLevel.DYNAMO_ONCE:
        assert report.pieces == 1 and report.splitting_ops == []


def test_two_models_of_one_class_compile_side_by_side(piecewise, tiny_model_dirs, eager_tokens, tmp_path):
    mistral_dir = tiny_model_dirs["mistral"]
    seed_config = CompilationConfig(
        level=CompilationLevel.PIECEWISE, cudagraph_capture_sizes=[1, 2, 4, 8, 16], debug_dump_path=str(tmp_path / "dump")
    )
    other = LLM(model=str(mistral_dir), max_model_len=MAX_MODEL_LEN, compilation_config=seed_config)
    eager_other = LLM(model=str(mistral_dir), max_model_len=MAX_MODEL_LEN, enforce_eager=True)
    assert _sweep_tokens(other) == _sweep_tokens(eager_other)
    assert _sweep_tokens(piecewise) == eager_tokens  # the first engine is unaffected
    # The depyf dump holds Dynamo's transformed code and our split graph.
    dump = tmp_path / "dump"
    split = (dump / "split_graph.py").read_text()
    assert split.count("submod_") >= TWO_LAYER_PIECES
    assert any(dump.rglob("__transformed_code*.py"))


def test_a_second_process_loads_every_piece_from_the_cache(piecewise, llama_dir, cache_dir):
    script = (
        "import json, fxllm\n"
        f"llm = fxllm.LLM(model={str(llama_dir)!r}, max_model_len={MAX_MODEL_LEN}, "
        f"compilation_config={{'level': 3, 'compile_sizes': [3], 'cache_dir': {str(cache_dir)!r}}})\n"
        "print('REPORT' + json.dumps(llm.compile_report().to_dict()))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.split("REPORT", 1)[1])
    assert report["loaded_from_cache"] is True
    assert report["inductor_compiles"] == 0
    assert report["cache_dir"] == piecewise.compile_report().cache_dir


@pytest.mark.parametrize(
    "value, level",
    [(0, CompilationLevel.NO_COMPILATION), ({"level": 2}, CompilationLevel.DYNAMO_ONCE), (CompilationConfig(level=1), CompilationLevel.DYNAMO_AS_IS)],
)
def test_compilation_config_accepts_an_int_a_dict_or_the_object(value, level):
    assert CompilationConfig.from_user(value).level == level


@pytest.mark.parametrize(
    "value, error",
    [(7, "level must be 0, 1, 2 or 3"), ({"levle": 3}, "unknown compilation_config field"), ({"compile_sizes": [0]}, "compile_sizes")],
)
def test_bad_compilation_config_is_a_clear_error(value, error):
    with pytest.raises(ValueError, match=error):
        CompilationConfig.from_user(value)


def test_enforce_eager_means_level_zero(llama_dir):
    llm = LLM(model=str(llama_dir), max_model_len=MAX_MODEL_LEN, enforce_eager=True, compilation_config=3)
    assert llm.compile_report().level == CompilationLevel.NO_COMPILATION
