"""GPT-2 and OPT: greedy parity with HF transformers (fp32, CPU, one prompt at a time)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2Model, OPTConfig

from fxllm import LLM, SamplingParams
from tests.tiny_models import VOCAB_SIZE, hf_greedy, save_config_checkpoint, save_random_checkpoint

PROMPTS = [
    "The capital of France is",
    "Hello",
    "Once upon a time there was a tiny model that learned to count: one two three",
    "How are you today? I am fine, thank you. The quick brown fox jumps over the lazy dog again and again",
]
NEW_TOKENS = 12
MAX_MODEL_LEN = 128
_SPECIAL_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)

CONFIGS = {
    # n_inner (96) != 4 * n_embd, both attention scalings on: every config switch is exercised.
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB_SIZE, n_embd=64, n_layer=2, n_head=4, n_positions=256, n_inner=96,
        scale_attn_by_inverse_layer_idx=True, **_SPECIAL_IDS, architectures=["GPT2LMHeadModel"],
    ),
    "opt_pre_ln": lambda: OPTConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, word_embed_proj_dim=64, num_hidden_layers=2, num_attention_heads=4,
        ffn_dim=128, max_position_embeddings=256, do_layer_norm_before=True, **_SPECIAL_IDS,
        architectures=["OPTForCausalLM"],
    ),
    # opt-350m's shape: post-LN, no final norm, word embeddings projected in and out.
    "opt_post_ln_projected": lambda: OPTConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, word_embed_proj_dim=32, num_hidden_layers=2, num_attention_heads=4,
        ffn_dim=128, max_position_embeddings=256, do_layer_norm_before=False, **_SPECIAL_IDS,
        architectures=["OPTForCausalLM"],
    ),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("more_architectures")
    dirs = {}
    for seed, (name, make_config) in enumerate(CONFIGS.items()):
        dirs[name] = save_config_checkpoint(make_config(), root / name, seed)
    return dirs


def _assert_greedy_matches_hf(llm: LLM, model_dir: Path) -> None:
    tokenizer = llm.get_tokenizer()
    prompt_ids = [tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for ids, output in zip(prompt_ids, outputs):
        assert output.prompt_token_ids == ids
        assert output.outputs[0].token_ids == hf_greedy(model_dir, ids, NEW_TOKENS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_batched_greedy_matches_hf_one_prompt_at_a_time(name, model_dirs):
    llm = LLM(model=str(model_dirs[name]), enforce_eager=True, max_model_len=MAX_MODEL_LEN)
    _assert_greedy_matches_hf(llm, model_dirs[name])


def test_headless_gpt2_checkpoint_runs_with_an_architecture_override(tmp_path):
    """Cerebras-GPT style: config.json says GPT2Model and the weights lack the ``transformer.`` prefix."""
    config = GPT2Config(
        vocab_size=VOCAB_SIZE, n_embd=64, n_layer=2, n_head=4, n_positions=256, **_SPECIAL_IDS,
        architectures=["GPT2Model"],
    )
    torch.manual_seed(7)
    model_dir = save_random_checkpoint(GPT2Model(config), tmp_path / "headless_gpt2", seed=7)
    assert json.loads((model_dir / "config.json").read_text())["architectures"] == ["GPT2Model"]
    with pytest.raises(ValueError, match="GPT2Model .* is not supported"):
        LLM(model=str(model_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN)
    llm = LLM(
        model=str(model_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN,
        hf_overrides={"architectures": ["GPT2LMHeadModel"]},
    )
    _assert_greedy_matches_hf(llm, model_dir)


def test_gpt2_config_without_architectures_loads_through_hf_overrides(model_dirs, tmp_path):
    model_dir = tmp_path / "no_architectures"
    shutil.copytree(model_dirs["gpt2"], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    del config["architectures"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="names no 'architectures'"):
        LLM(model=str(model_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN)
    llm = LLM(model=str(model_dir), enforce_eager=True, max_model_len=MAX_MODEL_LEN, hf_overrides={"architectures": ["GPT2LMHeadModel"]})
    _assert_greedy_matches_hf(llm, model_dirs["gpt2"])
