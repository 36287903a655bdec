"""Gemma 3 text: alternating sliding/global layers, per-type RoPE, soft-capping, against HF."""

from __future__ import annotations

import pytest
from transformers import Gemma3TextConfig

from fxllm import LLM, SamplingParams
from fxllm.runtime.attention.layer import Attention
from tests.tiny_models import VOCAB_SIZE, hf_greedy, save_config_checkpoint

WINDOW = 6
PROMPTS = ["Once upon a time there was a tiny model that learned to count: one two three", "Hello world", "The quick brown fox"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    config = Gemma3TextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], max_position_embeddings=256,
        final_logit_softcapping=5.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}},
        architectures=["Gemma3ForCausalLM"],
    )
    return save_config_checkpoint(config, tmp_path_factory.mktemp("gemma3"))


@pytest.mark.parametrize("budget", [2048, 5], ids=["whole_prompts", "chunked"])
def test_gemma3_text_matches_hf(gemma_dir, budget):
    llm = LLM(model=str(gemma_dir), enforce_eager=True, max_model_len=128, max_num_batched_tokens=budget, max_num_seqs=4)
    windows = [m.spec.sliding_window for m in llm.llm_engine.runner.model.modules() if isinstance(m, Attention)]
    assert windows == [WINDOW, None, WINDOW]
    tokenizer = llm.get_tokenizer()
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == hf_greedy(gemma_dir, tokenizer.encode(prompt), NEW_TOKENS)


def test_gemma3_logits_are_soft_capped(gemma_dir):
    llm = LLM(model=str(gemma_dir), enforce_eager=True, max_model_len=128)
    output = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=2, logprobs=VOCAB_SIZE - 1), use_tqdm=False)[0]
    logprobs = [lp.logprob for lp in output.outputs[0].logprobs[0].values()]
    # With |logit| <= 5, no two tokens' logprobs differ by more than 10.
    assert max(logprobs) - min(logprobs) <= 10.0 + 1e-4
