"""Tiny random InternLM2 and InternVL checkpoints in their original layouts, each with the same
weights re-laid into a transformers model that serves as the oracle: InternLM2 as
``LlamaForCausalLM``, the original InternVL as transformers' ``InternVLForConditionalGeneration``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from tests.tiny_models import VOCAB_SIZE, build_tokenizer, randomize_

INTERNLM2_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}
# InternLM2's shape at a tiny size: grouped KV heads, biases on wqkv and wo, dynamic NTK RoPE
# (as the released checkpoints have) over a short original length, so tests can pass it.
INTERNLM2_MAX_POSITIONS = 48
INTERNLM2_ROPE_FACTOR = 2.0
_INTERNLM2_SHAPE = dict(
    vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=INTERNLM2_MAX_POSITIONS, rms_norm_eps=1e-6, bos_token_id=1,
    eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)
_ROPE_THETA = 10000.0


def internlm2_config_json(**shape) -> dict:
    """config.json of an InternLM2 checkpoint, remote-code references and all."""
    shape = {**_INTERNLM2_SHAPE, **shape}
    return dict(
        architectures=["InternLM2ForCausalLM"], auto_map=INTERNLM2_AUTO_MAP, model_type="internlm2", hidden_act="silu",
        bias=True, rope_theta=_ROPE_THETA, rope_scaling={"type": "dynamic", "factor": INTERNLM2_ROPE_FACTOR},
        attn_implementation="eager", torch_dtype="float32", **shape,
    )


def llama_twin_config(**shape) -> LlamaConfig:
    """The transformers Llama that computes what the InternLM2 config describes."""
    shape = {**_INTERNLM2_SHAPE, **shape}
    rope = {"rope_type": "dynamic", "factor": INTERNLM2_ROPE_FACTOR, "rope_theta": _ROPE_THETA}
    return LlamaConfig(**shape, attention_bias=True, rope_parameters=rope, architectures=["LlamaForCausalLM"])


def llama_to_internlm2(state: dict[str, torch.Tensor], config: LlamaConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """A transformers Llama state dict in InternLM2's names, q/k/v fused into wqkv per KV group."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    group = heads // kv_heads
    renames = [
        ("model.embed_tokens.", "model.tok_embeddings."), ("lm_head.", "output."), (".self_attn.o_proj.", ".attention.wo."),
        (".mlp.gate_proj.", ".feed_forward.w1."), (".mlp.up_proj.", ".feed_forward.w3."),
        (".mlp.down_proj.", ".feed_forward.w2."), (".input_layernorm.", ".attention_norm."),
        (".post_attention_layernorm.", ".ffn_norm."),
    ]
    out = {}
    for name, tensor in state.items():
        if ".self_attn.q_proj." in name:
            query = tensor.reshape(kv_heads, group, head_dim, *tensor.shape[1:])
            key = state[name.replace("q_proj", "k_proj")].reshape(kv_heads, 1, head_dim, *tensor.shape[1:])
            value = state[name.replace("q_proj", "v_proj")].reshape(kv_heads, 1, head_dim, *tensor.shape[1:])
            fused = torch.cat([query, key, value], dim=1).reshape(-1, *tensor.shape[1:])
            out[prefix + name.replace(".self_attn.q_proj.", ".attention.wqkv.")] = fused.contiguous()
            continue
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        for old, new in renames:
            name = name.replace(old, new)
        out[prefix + name] = tensor.contiguous()
    return out


def save_tiny_internlm2(root: Path, seed: int = 0, **shape) -> tuple[Path, Path]:
    """(InternLM2 checkpoint, its transformers Llama twin) under ``root``."""
    config = llama_twin_config(**shape)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    randomize_(model, seed)
    twin_dir, internlm2_dir = root / "llama_twin", root / "internlm2"
    model.save_pretrained(twin_dir)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(twin_dir)
    internlm2_dir.mkdir(parents=True)
    save_file(llama_to_internlm2(model.state_dict(), config), str(internlm2_dir / "model.safetensors"))
    (internlm2_dir / "config.json").write_text(json.dumps(internlm2_config_json(**shape), indent=2))
    tokenizer.save_pretrained(internlm2_dir)
    return internlm2_dir, twin_dir


def hf_greedy_token_by_token(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The oracle for RoPE that depends on the sequence length: every token, prompt tokens too, goes
    through its own forward with a KV cache, so each is rotated as a sequence of its length is."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids, generated = list(prompt_ids), []
    with torch.no_grad():
        for position in range(len(prompt_ids) + max_new_tokens - 1):
            logits = model(
                input_ids=torch.tensor([[ids[position]]]), position_ids=torch.tensor([[position]]), cache=cache, use_cache=True
            ).logits
            if position >= len(prompt_ids) - 1:
                ids.append(int(logits[0, -1].argmax()))
                generated.append(ids[-1])
    return generated
