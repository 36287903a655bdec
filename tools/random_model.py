"""Random-weight checkpoints in the shape of named models (speed does not depend on weights).

    python tools/random_model.py llama-3.2-1b /tmp/llama1b

Writes config.json, model.safetensors (seeded random bf16) and a word-level
tokenizer covering the whole vocabulary ("t0", "t1", ...), so prompts can be given
as token ids and every sampled id detokenizes. Checkpoints over SHARD_BYTES are written
in several files with an index, as Hugging Face shards them; the experts of MoE shapes
(MOE_SHAPES) one tensor per expert and projection, as their checkpoints keep them.
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
# Mixture-of-experts shapes, kept apart from SHAPES: the dense tools count one MLP per layer.
MOE_SHAPES: dict[str, dict] = {
    "qwen3-30b-a3b": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
        moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936, tie_word_embeddings=False,
        rope_theta=1000000.0, max_position_embeddings=40960, rms_norm_eps=1e-6, hidden_act="silu",
    ),
    # A 2-layer Qwen3-MoE for CPU smoke runs of the MoE tools.
    "tiny-moe": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
        moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], vocab_size=10240, tie_word_embeddings=True,
        rope_theta=1000000.0, max_position_embeddings=4096, rms_norm_eps=1e-6, hidden_act="silu",
    ),
}
WEIGHT_STD = 0.02
SHARD_BYTES = 4 << 30  # a checkpoint file holds about this much; bounds the writer's memory too


def write_random_model(
    shape: str, directory: Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16, num_layers: int | None = None
) -> Path:
    """The checkpoint of ``shape`` in ``directory``; ``num_layers`` overrides the shape's layer count."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shapes = {**SHAPES, **MOE_SHAPES}
    if shape not in shapes:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(shapes)}")
    directory.mkdir(parents=True, exist_ok=True)
    config_dict = dict(shapes[shape], torch_dtype=str(dtype).removeprefix("torch."), bos_token_id=0, eos_token_id=1)
    if num_layers is not None:
        config_dict["num_hidden_layers"] = num_layers
    (directory / "config.json").write_text(json.dumps(config_dict, indent=2))
    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    writer = _ShardedWriter(directory)
    for name, param in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        for checkpoint_name, checkpoint_shape in _checkpoint_tensors(name, param.shape):
            if name.endswith("norm.weight"):
                writer.add(checkpoint_name, torch.ones(checkpoint_shape, dtype=dtype))
            else:
                writer.add(checkpoint_name, (torch.randn(checkpoint_shape, generator=generator) * WEIGHT_STD).to(dtype))
    writer.close()
    _write_tokenizer(directory, config.vocab_size)
    return directory


def _checkpoint_tensors(name: str, shape: torch.Size) -> list[tuple[str, tuple[int, ...]]]:
    """(checkpoint name, shape) of the tensors a checkpoint keeps for transformers' parameter
    ``name``: its MoE models stack each layer's experts (``experts.gate_up_proj`` [E, 2I, H],
    ``experts.down_proj`` [E, H, I]) where checkpoints keep one tensor per expert and projection."""
    module, _, leaf = name.rpartition(".")
    if module.rpartition(".")[2] != "experts" or leaf not in ("gate_up_proj", "down_proj"):
        return [(name, tuple(shape))]
    num_experts, rows, columns = shape
    if leaf == "down_proj":
        return [(f"{module}.{expert}.down_proj.weight", (rows, columns)) for expert in range(num_experts)]
    return [
        (f"{module}.{expert}.{projection}.weight", (rows // 2, columns))
        for expert in range(num_experts)
        for projection in ("gate_proj", "up_proj")
    ]


class _ShardedWriter:
    """Writes tensors into files of about SHARD_BYTES: model.safetensors if one is enough, else
    model-00001.safetensors, ... and the index that maps each tensor to its file."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: dict[str, list[str]] = {}  # file name -> its tensors

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= SHARD_BYTES:
            self._flush()

    def _flush(self) -> None:
        file_name = f"model-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.directory / file_name))
        self.files[file_name] = list(self.pending)
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        if len(self.files) == 1:
            (self.directory / next(iter(self.files))).rename(self.directory / "model.safetensors")
            return
        weight_map = {name: file_name for file_name, names in self.files.items() for name in names}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=2))


INT4_GROUP_SIZE = 128
# Scales of random 4-bit levels around 8 that give weights of about WEIGHT_STD.
INT4_SCALE = WEIGHT_STD / 4


def write_random_int4_model(shape: str, directory: Path, seed: int = 0, group_size: int = INT4_GROUP_SIZE) -> Path:
    """The shape as a GPTQ W4A16 checkpoint (symmetric, ``group_size``) of random packed weights:
    every linear layer but lm_head as ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx``, the rest
    as ``write_random_model`` writes it. Written directly, without quantizing a bf16 model."""
    write_random_model(shape, directory, seed)
    from safetensors.torch import load_file

    generator = torch.Generator().manual_seed(seed + 1)
    weight_map = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors = load_file(str(file))
        for name in list(tensors):
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
        save_file(tensors, str(file))
        weight_map.update(dict.fromkeys(tensors, file.name))
    index = directory / "model.safetensors.index.json"
    if index.exists():
        index.write_text(json.dumps({"weight_map": weight_map}, indent=2))
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
    parser.add_argument("shape", choices=sorted({**SHAPES, **MOE_SHAPES}))
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-layers", type=int, default=None, help="override the shape's layer count")
    args = parser.parse_args()
    print(write_random_model(args.shape, args.directory, args.seed, num_layers=args.num_layers))


if __name__ == "__main__":
    main()
