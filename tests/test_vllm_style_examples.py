"""Scripts written the way vLLM's offline examples are (import renamed) run end to end on tiny models."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import BertConfig, BertModel

from tests.tiny_models import VOCAB_SIZE, save_random_checkpoint
from tests.vllm_style_examples import basic, chat, embed, metrics, prefix_caching, reproducibility


def test_basic_generation_takes_vllm_style_flags(llama_dir):
    outputs = basic.main(["--model", str(llama_dir), "--max_model_len", "64", "--enforce-eager", "--max-tokens", "5"])
    assert len(outputs) == 3 and all(len(o.outputs[0].token_ids) == 5 for o in outputs)


def test_chat_with_content_parts(llama_dir):
    outputs = chat.main(["--model", str(llama_dir)])
    assert outputs[0].prompt.startswith("<|system|>You are a helpful assistant\n<|user|>Hello\nWrite an essay\n")
    assert len(outputs) == 3


def test_embedding(tmp_path):
    config = BertConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, architectures=["BertModel"])
    torch.manual_seed(0)
    model_dir = save_random_checkpoint(BertModel(config), tmp_path / "bert")
    outputs = embed.main(["--model", str(model_dir)])
    assert [len(o.outputs.embedding) for o in outputs] == [32, 32, 32]


def test_prefix_caching_gives_the_answers_without_it(llama_dir):
    regular, cached = prefix_caching.main(["--model", str(llama_dir)])
    assert [o.outputs[0].token_ids for o in regular] == [o.outputs[0].token_ids for o in cached]
    assert all(o.num_cached_tokens > 0 for o in cached)


def test_seeds_reproduce(llama_dir):
    first, second = reproducibility.main(["--model", str(llama_dir)])
    assert first == second


def test_metrics(llama_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # disable_log_stats changes nothing here
        values = metrics.main(["--model", str(llama_dir)])
    assert values["vllm:generation_tokens"] == 16


@pytest.mark.parametrize("script", [basic, chat, embed, prefix_caching, reproducibility, metrics])
def test_the_scripts_import_nothing_but_fxllm(script):
    source = open(script.__file__).read()
    assert "vllm" not in source.replace("vLLM", "")
