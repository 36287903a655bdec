"""InternLM2: a Llama-family decoder under other checkpoint names (also InternVL2's language model).

Its checkpoint fuses q/k/v into ``wqkv`` laid out per KV head group — for each KV head, that
group's query heads, then its key head, then its value head — and names the rest
``tok_embeddings``, ``attention.wo``, ``feed_forward.w1/w3/w2`` (gate, up, down),
``attention_norm``/``ffn_norm`` and ``output``. The loader regroups ``wqkv`` into plain q, k and
v and renames the rest, so the model is ``LlamaForCausalLM`` itself. Real configs carry
``auto_map`` (remote code) and dynamic NTK RoPE; ``fxllm.models.native_configs`` reads them.
"""

from __future__ import annotations

import copy
from typing import Iterable, Iterator

import torch
from transformers import PretrainedConfig

from fxllm.hf_config import head_dim_of
from fxllm.models.llama import LlamaForCausalLM

# InternLM2 checkpoint name pieces -> the Llama names they load as.
_RENAMES = (
    ("model.tok_embeddings.", "model.embed_tokens."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".feed_forward.w1.", ".mlp.gate_proj."),
    (".feed_forward.w3.", ".mlp.up_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
)
_FUSED_QKV = ".attention.wqkv."


def _llama_view(config: PretrainedConfig) -> PretrainedConfig:
    """The config as the Llama layers read it: InternLM2's ``bias`` puts biases on wqkv and wo."""
    view = copy.copy(config)
    view.attention_bias = bool(getattr(config, "bias", False))
    return view


class InternLM2ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: PretrainedConfig, max_positions: int):
        super().__init__(_llama_view(config), max_positions)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._as_llama(weights))

    def _as_llama(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if name.startswith("output."):
                yield "lm_head." + name[len("output.") :], tensor
            elif _FUSED_QKV in name:
                prefix, leaf = name.split(_FUSED_QKV)
                for projection, part in zip(("q_proj", "k_proj", "v_proj"), self._split_wqkv(tensor)):
                    yield f"{prefix}.self_attn.{projection}.{leaf}", part
            else:
                for old, new in _RENAMES:
                    name = name.replace(old, new)
                yield name, tensor

    def _split_wqkv(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """wqkv rows [kv_heads x (group + 2) x head_dim] (a weight [rows, hidden] or a bias [rows])
        -> q [heads x head_dim], k and v [kv_heads x head_dim], each head in order."""
        group = self.num_heads // self.num_kv_heads
        grouped = fused.reshape(self.num_kv_heads, group + 2, self.head_dim, *fused.shape[1:])
        query = grouped[:, :group].reshape(self.num_heads * self.head_dim, *fused.shape[1:])
        key = grouped[:, group].reshape(self.num_kv_heads * self.head_dim, *fused.shape[1:])
        value = grouped[:, group + 1].reshape(self.num_kv_heads * self.head_dim, *fused.shape[1:])
        return query, key, value
