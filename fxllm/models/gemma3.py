"""Gemma 3 text decoder (Gemma3ForCausalLM, model_type gemma3_text; also the language model of a
Gemma3ForConditionalGeneration checkpoint, run text-only).

Alternating sliding-window and global layers (``layer_types``), one RoPE table per
layer type, q/k norms, norms before and after attention and MLP, Gemma's (1 + w)
RMSNorm, the sqrt(hidden) embedding scale and optional final logit soft-capping.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn
from transformers import PretrainedConfig

from fxllm.config import MultiModalConfig
from fxllm.models.causal_lm import FusedDecoderForCausalLM
from fxllm.models.layers import RotaryEmbedding, RotaryTables, apply_rotary
from fxllm.attention import Attention

SLIDING = "sliding_attention"


class GemmaRMSNorm(nn.Module):
    """Scales by (1 + weight), in fp32 before casting back, as HF's Gemma norms do."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


class Gemma3Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, index: int):
        super().__init__()
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise ValueError("attention logit soft-capping is not supported; Gemma 3 checkpoints do not use it")
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = config.attention_bias
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=bias)
        self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.layer_type = config.layer_types[index]
        window = config.sliding_window if self.layer_type == SLIDING else None
        scale = config.query_pre_attn_scalar**-0.5
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, scale, window)

    def forward(self, rotary: RotaryTables, hidden: torch.Tensor) -> torch.Tensor:
        query, key, value = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        query = self.q_norm(query.view(-1, self.num_heads, self.head_dim))  # [T, heads, head_dim]
        key = self.k_norm(key.view(-1, self.num_kv_heads, self.head_dim))  # [T, kv_heads, head_dim]
        query, key = apply_rotary(query, rotary), apply_rotary(key, rotary)
        return self.o_proj(self.attn(query.flatten(1), key.flatten(1), value))


class Gemma3MLP(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        if config.hidden_activation != "gelu_pytorch_tanh":
            raise ValueError(f"hidden_activation {config.hidden_activation!r} is not supported; expected 'gelu_pytorch_tanh'")
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(hidden).chunk(2, dim=-1)
        return self.down_proj(nn.functional.gelu(gate, approximate="tanh") * up)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, index: int):
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = Gemma3Attention(config, index)
        self.mlp = Gemma3MLP(config)
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(self, rotary: RotaryTables, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.post_attention_layernorm(self.self_attn(rotary, self.input_layernorm(hidden)))
        return hidden + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden)))


class Gemma3Model(nn.Module):
    def __init__(self, config: PretrainedConfig, max_positions: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.layer_types = list(config.layer_types)
        self.rotary = nn.ModuleDict(
            {kind: RotaryEmbedding(config, config.head_dim, max_positions, kind) for kind in sorted(set(self.layer_types))}
        )
        # HF rounds sqrt(hidden) to the embedding dtype before scaling.
        self.register_buffer("embed_scale", torch.tensor(config.hidden_size**0.5), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T, hidden]
        hidden = hidden * self.embed_scale.to(hidden.dtype)
        tables = {kind: rotary(positions, hidden.dtype) for kind, rotary in self.rotary.items()}
        for layer, kind in zip(self.layers, self.layer_types):
            hidden = layer(tables[kind], hidden)
        return self.norm(hidden)


class Gemma3ForCausalLM(FusedDecoderForCausalLM):
    def __init__(self, config: PretrainedConfig, max_positions: int):
        super().__init__()
        self.model = Gemma3Model(config, max_positions)
        self._init_lm_head(config, tied_by_default=True)
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


# Checkpoint name prefixes of a Gemma 3 vision-language checkpoint's language model (transformers 5's
# module paths, then the original layout) and of the parts a text-only run skips.
_LANGUAGE_PREFIXES = {
    "model.language_model.": "model.",
    "language_model.model.": "model.",
    "language_model.lm_head.": "lm_head.",
}
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    """A Gemma 3 vision-language checkpoint run text-only (``limit_mm_per_prompt={"image": 0}``):
    its language model on Gemma3ForCausalLM; the vision tower and projector are never loaded."""

    def __init__(self, config: PretrainedConfig, max_positions: int, multimodal: MultiModalConfig):
        if multimodal.image_limit > 0:
            raise ValueError(
                "fxllm runs Gemma3ForConditionalGeneration text-only (its vision tower is not supported): "
                "pass limit_mm_per_prompt={'image': 0}"
            )
        super().__init__(config.get_text_config(), max_positions)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._language_weights(weights))

    @staticmethod
    def _language_weights(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if name.startswith(_VISION_PREFIXES):
                continue
            prefix = next((p for p in _LANGUAGE_PREFIXES if name.startswith(p)), None)
            yield (_LANGUAGE_PREFIXES[prefix] + name[len(prefix) :] if prefix else name), tensor
