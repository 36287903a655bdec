"""Tiny random-weight checkpoints of each supported architecture, built from configs.

Every parameter (biases and norm weights included) is randomized, so a loader
that drops or misplaces any weight changes the output.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

VOCAB_SIZE = 320
_CORPUS = [
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog.",
    "Compilers turn graphs into fast kernels; attention reads the paged cache.",
    "Once upon a time there was a tiny model that learned to count: one two three four five.",
    "Hello world! How are you today? I am fine, thank you.",
]
_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)

CONFIGS = {
    # GQA, untied, llama3 RoPE scaling, biases everywhere.
    "llama": lambda: LlamaConfig(
        **_COMMON,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        attention_bias=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        architectures=["LlamaForCausalLM"],
    ),
    # MHA, tied, explicit head_dim.
    "mistral": lambda: MistralConfig(
        **_COMMON, num_key_value_heads=4, head_dim=16, tie_word_embeddings=True, sliding_window=None,
        architectures=["MistralForCausalLM"],
    ),
    # GQA, tied, q/k/v biases.
    "qwen2": lambda: Qwen2Config(
        **_COMMON, num_key_value_heads=2, tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"]
    ),
    # head_dim (32) != hidden / heads (16), q/k norms, untied.
    "qwen3": lambda: Qwen3Config(
        **_COMMON, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, architectures=["Qwen3ForCausalLM"]
    ),
    # Granite's four multipliers.
    "granite": lambda: GraniteConfig(
        **_COMMON,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        embedding_multiplier=4.0,
        residual_multiplier=0.5,
        attention_multiplier=0.2,
        logits_scaling=2.0,
        architectures=["GraniteForCausalLM"],
    ),
}

GEMMA3_WINDOW = 6


def gemma3_text_config():
    """Gemma 3 text: sliding and full layers with their own RoPE, per-head q/k norms,
    scaled embeddings, soft-capped logits, tied lm_head."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=GEMMA3_WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], max_position_embeddings=256,
        final_logit_softcapping=5.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}},
        architectures=["Gemma3ForCausalLM"],
    )


def build_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random; norm gains (RMSNorm, LayerNorm, ...) around 1."""
    generator = torch.Generator().manual_seed(seed)
    gains = {
        id(module.weight) for module in model.modules() if "Norm" in type(module).__name__ and getattr(module, "weight", None) is not None
    }
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if id(param) in gains else 0.15 * noise)


def save_random_checkpoint(model: torch.nn.Module, directory: Path, seed: int = 0) -> Path:
    """Randomize ``model`` and write it as an HF checkpoint with the tiny tokenizer."""
    randomize_(model, seed)
    model.save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return directory


def save_config_checkpoint(config, directory: Path, seed: int = 0) -> Path:
    """A random-weight fp32 checkpoint of a causal LM config."""
    torch.manual_seed(seed)
    return save_random_checkpoint(AutoModelForCausalLM.from_config(config, dtype=torch.float32), directory, seed)


def save_tiny_model(arch: str, directory: Path, seed: int = 0) -> Path:
    """Write a random-weight HF checkpoint of ``arch`` (a key of CONFIGS) with a tokenizer."""
    return save_config_checkpoint(CONFIGS[arch](), directory, seed)


def hf_greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The oracle: HF transformers, fp32, one prompt at a time, no padding, no EOS stop."""
    model = _hf_model(model_dir)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(prompt_ids) :].tolist()


@functools.lru_cache(maxsize=None)
def _hf_model(model_dir: Path) -> torch.nn.Module:
    """The HF oracle model, loaded once per checkpoint."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
