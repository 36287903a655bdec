"""Random-weight checkpoints in the shape of named models (speed does not depend on weights).

    python tools/random_model.py llama-3.2-1b /tmp/llama1b

Writes config.json, model.safetensors (seeded random bf16) and a word-level
tokenizer covering the whole vocabulary ("t0", "t1", ...), so prompts can be given
as token ids and every sampled id detokenizes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES: dict[str, dict] = {
    "qwen3-0.6b": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, intermediate_size=3072,
        vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=40960,
        rms_norm_eps=1e-6, hidden_act="silu",
    ),
    "llama-3.2-1b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, intermediate_size=8192, vocab_size=128256,
        tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
    "llama-3-8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256,
        tie_word_embeddings=False, max_position_embeddings=8192, rms_norm_eps=1e-5, hidden_act="silu",
        rope_theta=500000.0,
    ),
    # A 2-layer Qwen3 (qk-norm, tied) for CPU smoke runs of every tool.
    "tiny": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=10240,
        tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=4096,
        rms_norm_eps=1e-6, hidden_act="silu",
    ),
}
WEIGHT_STD = 0.02


def write_random_model(shape: str, directory: Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    directory.mkdir(parents=True, exist_ok=True)
    config_dict = dict(SHAPES[shape], torch_dtype=str(dtype).removeprefix("torch."), bos_token_id=0, eos_token_id=1)
    (directory / "config.json").write_text(json.dumps(config_dict, indent=2))
    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, param in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(param.shape, dtype=dtype)
        else:
            tensors[name] = (torch.randn(param.shape, generator=generator) * WEIGHT_STD).to(dtype)
    save_file(tensors, str(directory / "model.safetensors"))
    _write_tokenizer(directory, config.vocab_size)
    return directory


INT4_GROUP_SIZE = 128
# Scales of random 4-bit levels around 8 that give weights of about WEIGHT_STD.
INT4_SCALE = WEIGHT_STD / 4


def write_random_int4_model(shape: str, directory: Path, seed: int = 0, group_size: int = INT4_GROUP_SIZE) -> Path:
    """The shape as a GPTQ W4A16 checkpoint (symmetric, ``group_size``) of random packed weights:
    every linear layer but lm_head as ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx``, the rest
    as ``write_random_model`` writes it. Written directly, without quantizing a bf16 model."""
    write_random_model(shape, directory, seed)
    from safetensors import safe_open

    generator = torch.Generator().manual_seed(seed + 1)
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        names = list(handle.keys())
        tensors = {name: handle.get_tensor(name) for name in names}
    for name in names:
        if not name.endswith("proj.weight"):
            continue
        out_features, in_features = tensors.pop(name).shape
        module = name.removesuffix(".weight")
        groups = -(-in_features // group_size)  # the last group may be partial
        tensors[f"{module}.qweight"] = torch.randint(
            -(2**31), 2**31 - 1, (in_features // 8, out_features), generator=generator, dtype=torch.int32
        )
        tensors[f"{module}.qzeros"] = torch.full((groups, out_features // 8), 0x77777777, dtype=torch.int32)
        tensors[f"{module}.scales"] = torch.full((groups, out_features), INT4_SCALE, dtype=torch.float16)
        tensors[f"{module}.g_idx"] = (torch.arange(in_features) // group_size).to(torch.int32)
    save_file(tensors, str(directory / "model.safetensors"))
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "gptq", "bits": 4, "group_size": group_size, "sym": True, "desc_act": False,
        "checkpoint_format": "gptq",
    }  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def _write_tokenizer(directory: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="t0", eos_token="t1").save_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_random_model(args.shape, args.directory, args.seed))


if __name__ == "__main__":
    main()
