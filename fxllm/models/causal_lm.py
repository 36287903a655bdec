"""What Llama-style decoders share around their body: the LM head and fused weight loading.

Their checkpoints keep q/k/v and gate/up apart; the models fuse each group into one
projection (one GEMM instead of three or two), and the loader fills the slices.
"""

from __future__ import annotations

from typing import Iterable

import torch
from transformers import PretrainedConfig

from fxllm.models.interface import Model
from fxllm.models.layers import LMHead
from fxllm.models.weights import FusedShard, load_named_weights


class FusedDecoderForCausalLM(Model):
    """Subclasses build ``self.model`` (with ``embed_tokens`` and layers whose ``self_attn``
    has ``q_size``/``kv_size``) and then call ``_init_lm_head``."""

    # HF checkpoint module name -> (our fused parameter, shard index)
    fused_weights = {
        "q_proj": FusedShard("qkv_proj", 0),
        "k_proj": FusedShard("qkv_proj", 1),
        "v_proj": FusedShard("qkv_proj", 2),
        "gate_proj": FusedShard("gate_up_proj", 0),
        "up_proj": FusedShard("gate_up_proj", 1),
    }

    def _init_lm_head(self, config: PretrainedConfig, tied_by_default: bool) -> None:
        self.config = config
        self.lm_head = LMHead(config, self.model.embed_tokens, tied_by_default)
        attn = self.model.layers[0].self_attn
        self.qkv_sizes = [attn.q_size, attn.kv_size, attn.kv_size]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def fused_shard_sizes(self, fused_name: str) -> list[int]:
        if fused_name == "qkv_proj":
            return self.qkv_sizes
        return [self.config.intermediate_size] * 2

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_named_weights(self, weights, skip=self.lm_head.checkpoint_skip)
