"""InternLM2 and Phi-3 as text models: greedy parity with transformers, their checkpoint layouts,
and RoPE that transformers derives from the sequence length (dynamic NTK, LongRoPE), which fxllm
selects per position from tables built once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Phi3Config

from fxllm import LLM, SamplingParams
from fxllm.models.layers import RotaryEmbedding, default_inv_freq
from tests.tiny_internvl_models import (
    INTERNLM2_MAX_POSITIONS,
    INTERNLM2_ROPE_FACTOR,
    hf_greedy_token_by_token,
    llama_twin_config,
    save_tiny_internlm2,
)
from tests.tiny_models import VOCAB_SIZE, hf_greedy, save_config_checkpoint

NEW_TOKENS = 12
SHORT_PROMPT = "The capital of France is"
# 66 tokens: past InternLM2's 48 original positions, and past Phi-3's 32.
LONG_PROMPT = (
    "Once upon a time there was a tiny model that learned to count: one two three four five. "
    "Hello world! How are you today?"
)
PHI3_ORIGINAL_POSITIONS = 32
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def phi3_config() -> Phi3Config:
    """Phi-3 with LongRoPE over a short original length and half of each head rotating."""
    return Phi3Config(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, original_max_position_embeddings=PHI3_ORIGINAL_POSITIONS,
        partial_rotary_factor=0.5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [1.5, 2.0, 3.0, 4.5]},
        architectures=["Phi3ForCausalLM"],
    )


@pytest.fixture(scope="module")
def internlm2_dirs(tmp_path_factory) -> tuple[Path, Path]:
    return save_tiny_internlm2(tmp_path_factory.mktemp("internlm2"))


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory) -> Path:
    return save_config_checkpoint(phi3_config(), tmp_path_factory.mktemp("phi3") / "phi3")


def _token_by_token(model_dir: Path, prompt_ids: list[int]) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return hf_greedy_token_by_token(model, prompt_ids, NEW_TOKENS)


def test_internlm2_matches_its_llama_twin_past_the_original_length(internlm2_dirs):
    """wqkv regrouped per KV group, renamed weights, dynamic NTK RoPE: within the original length
    as transformers in one forward; past it as transformers token by token (each position rotated
    as a sequence of its length)."""
    internlm2_dir, twin_dir = internlm2_dirs
    llm = LLM(model=str(internlm2_dir), enforce_eager=True, block_size=4)
    assert llm.llm_engine_config.model.max_model_len == int(INTERNLM2_MAX_POSITIONS * INTERNLM2_ROPE_FACTOR)
    short, long = llm.generate([SHORT_PROMPT, LONG_PROMPT], GREEDY, use_tqdm=False)
    assert len(long.prompt_token_ids) > INTERNLM2_MAX_POSITIONS
    assert short.outputs[0].token_ids == hf_greedy(twin_dir, short.prompt_token_ids, NEW_TOKENS)
    assert long.outputs[0].token_ids == _token_by_token(twin_dir, long.prompt_token_ids)


def test_internlm2_config_is_read_without_remote_code(internlm2_dirs):
    """config.json names remote code (auto_map) for a config class transformers lacks: fxllm reads
    the file itself, asks nothing, and trust_remote_code changes nothing."""
    internlm2_dir, _ = internlm2_dirs
    assert "auto_map" in json.loads((internlm2_dir / "config.json").read_text())
    llm = LLM(model=str(internlm2_dir), enforce_eager=True, max_model_len=64, trust_remote_code=True)
    config = llm.llm_engine_config.model.hf_config
    assert config.rope_parameters == {"rope_type": "dynamic", "factor": INTERNLM2_ROPE_FACTOR, "rope_theta": 10000.0}
    assert llm.llm_engine_config.model.architecture == "InternLM2ForCausalLM"
    with pytest.raises(ValueError, match=r"larger than the model's maximum length 96"):
        LLM(model=str(internlm2_dir), enforce_eager=True, max_model_len=97)


def test_phi3_longrope_matches_transformers(phi3_dir):
    """Fused qkv_proj/gate_up_proj loaded as they are, partial rotary; LongRoPE's short factors
    within the original length, the long ones past it, position by position."""
    llm = LLM(model=str(phi3_dir), enforce_eager=True, block_size=4)
    within = SamplingParams(temperature=0, max_tokens=PHI3_ORIGINAL_POSITIONS - 16, ignore_eos=True)
    short = llm.generate(SHORT_PROMPT, within, use_tqdm=False)[0]
    assert short.outputs[0].token_ids == hf_greedy(phi3_dir, short.prompt_token_ids, within.max_tokens)
    long = llm.generate(LONG_PROMPT, GREEDY, use_tqdm=False)[0]
    assert long.outputs[0].token_ids == _token_by_token(phi3_dir, long.prompt_token_ids)


@pytest.mark.parametrize("arch", ["internlm2", "phi3"])
def test_compiled_text_models_match_transformers(arch, internlm2_dirs, phi3_dir, tmp_path):
    """The piecewise-compiled graph (per-position RoPE tables gathered inside it) against the oracles."""
    model_dir, reference_dir = internlm2_dirs if arch == "internlm2" else (phi3_dir, phi3_dir)
    llm = LLM(model=str(model_dir), max_model_len=96, compilation_config={"level": 3, "cache_dir": str(tmp_path)})
    assert llm.compile_report().pieces == 5  # two layers: split at each attention
    outputs = llm.generate([SHORT_PROMPT, LONG_PROMPT], GREEDY, use_tqdm=False)
    for output in outputs:
        assert output.outputs[0].token_ids == _token_by_token(reference_dir, output.prompt_token_ids)


def test_dynamic_ntk_table_is_plain_rope_up_to_max_position_embeddings_then_grows_per_position():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = llama_twin_config()
    head_dim = config.hidden_size // config.num_attention_heads
    max_positions = int(INTERNLM2_MAX_POSITIONS * INTERNLM2_ROPE_FACTOR)
    rotary = RotaryEmbedding(config, head_dim, max_positions)
    plain = torch.arange(INTERNLM2_MAX_POSITIONS, dtype=torch.float)[:, None] * default_inv_freq(10000.0, head_dim)
    assert torch.equal(rotary.cos[:INTERNLM2_MAX_POSITIONS], plain.cos())
    # Past it, position p has transformers' frequencies for a sequence of p + 1 tokens.
    for position in (INTERNLM2_MAX_POSITIONS, 70, max_positions - 1):
        inv_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu", seq_len=torch.tensor(position + 1))
        torch.testing.assert_close(rotary.cos[position], (position * inv_freq).cos(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("config", [llama_twin_config, phi3_config], ids=["dynamic", "longrope"])
def test_per_position_tables_build_on_any_device(config):
    """Models are built under a device context (the GPU's): the tables must not mix devices."""
    with torch.device("meta"):
        rotary = RotaryEmbedding(config(), 16, 96)
    assert rotary.cos.device.type == "meta" and rotary.cos.shape[0] == 96
