"""Sliding-window attention (Mistral, Qwen2) matches HF, through chunked prefill and decode."""

from __future__ import annotations

import pytest

from fxllm import LLM, SamplingParams
from fxllm.attention.layer import Attention
from tests.tiny_models import CONFIGS, hf_greedy, save_config_checkpoint

WINDOW = 6  # shorter than a KV block and than the prompts, so the window really cuts
PROMPTS = [
    "Once upon a time there was a tiny model that learned to count: one two three",
    "The quick brown fox jumps over the lazy dog again and again",
    "Hello",
]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def windowed_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("windowed")
    mistral = CONFIGS["mistral"]()
    mistral.sliding_window = WINDOW
    from transformers import Qwen2Config

    base = CONFIGS["qwen2"]().to_dict()
    base.pop("layer_types")  # derived again from use_sliding_window and max_window_layers
    base.update(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    qwen2 = Qwen2Config(**base)
    return {"mistral": save_config_checkpoint(mistral, root / "mistral"), "qwen2": save_config_checkpoint(qwen2, root / "qwen2")}


@pytest.mark.parametrize("arch, windows", [("mistral", [WINDOW, WINDOW]), ("qwen2", [None, WINDOW])])
@pytest.mark.parametrize("budget", [2048, 5], ids=["whole_prompts", "chunked"])
def test_sliding_window_matches_hf(windowed_dirs, arch, windows, budget):
    model_dir = windowed_dirs[arch]
    llm = LLM(model=str(model_dir), enforce_eager=True, max_model_len=128, max_num_batched_tokens=budget, max_num_seqs=4)
    layers = [m.spec.sliding_window for m in llm.llm_engine.runner.model.modules() if isinstance(m, Attention)]
    assert layers == windows
    tokenizer = llm.get_tokenizer()
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == hf_greedy(model_dir, tokenizer.encode(prompt), NEW_TOKENS)


def test_window_changes_the_output(windowed_dirs, tiny_model_dirs):
    """Without the window the same weights give other tokens: the test above is not vacuous."""
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    windowed = LLM(model=str(windowed_dirs["mistral"]), enforce_eager=True, max_model_len=128)
    full = LLM(model=str(windowed_dirs["mistral"]), enforce_eager=True, max_model_len=128, hf_overrides={"sliding_window": None})
    assert [o.outputs[0].token_ids for o in windowed.generate(PROMPTS[:1], params, use_tqdm=False)] != [
        o.outputs[0].token_ids for o in full.generate(PROMPTS[:1], params, use_tqdm=False)
    ]
