"""Qwen2-VL and Qwen2.5-VL: a Qwen2 decoder with M-RoPE, fed by a vision tower.

The compiled graph is the language model alone: ``forward(inputs_embeds[T, H],
positions[3, T]) -> hidden[T, H]`` (docs/ARCHITECTURE.md, contract 1). The runner builds
``inputs_embeds`` outside it: ``embed_input_ids`` for every token, then the image and
video embeddings from ``encode_images`` (the vision tower: eager, or compiled by regions
with ``compile_mm_encoder``) written over their placeholder tokens.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn
from transformers import PretrainedConfig

from fxllm.config import MultiModalConfig
from fxllm.models.causal_lm import FusedDecoderForCausalLM
from fxllm.hf_config import head_dim_of
from fxllm.models.interface import Model
from fxllm.models.layers import RMSNorm
from fxllm.models.llama import LlamaDecoderLayer
from fxllm.models.mrope import MRotaryEmbedding
from fxllm.models.qwen2_vl_vision import Grid, Qwen2VisionTransformer, Qwen25VisionTransformer, compile_regions
from fxllm.models.weights import load_named_weights

# Checkpoint name prefixes: transformers 5's module paths, then the original checkpoints' layout.
_LANGUAGE_PREFIXES = ("model.language_model.", "model.")
_VISION_PREFIXES = ("model.visual.", "visual.")


class Qwen2VLTextModel(nn.Module):
    """Llama-family layers (Qwen2's q/k/v biases) over embeddings, rotated by M-RoPE."""

    def __init__(self, config: PretrainedConfig, max_positions: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.rotary = MRotaryEmbedding(config, head_dim_of(config), max_positions)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rotary = self.rotary(positions, inputs_embeds.dtype)
        hidden = inputs_embeds  # [T, hidden]
        for layer in self.layers:
            hidden = layer(rotary, hidden)
        return self.norm(hidden)


class Qwen2VLLanguageModel(FusedDecoderForCausalLM):
    """The decoder with its LM head; q/k/v and gate/up load fused."""

    def __init__(self, config: PretrainedConfig, max_positions: int, tie_word_embeddings: bool):
        super().__init__()
        self.model = Qwen2VLTextModel(config, max_positions)
        self._init_lm_head(config, tied_by_default=tie_word_embeddings)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


class Qwen2VLForConditionalGeneration(Model):
    takes_inputs_embeds = True  # the runner embeds tokens and merges images before the graph
    uses_mrope = True  # positions are [3, T]
    vision_tower: type[nn.Module] = Qwen2VisionTransformer

    def __init__(self, config: PretrainedConfig, max_positions: int, multimodal: MultiModalConfig):
        super().__init__()
        tie = bool(getattr(config, "tie_word_embeddings", False))
        self.language_model = Qwen2VLLanguageModel(config.get_text_config(), max_positions, tie)
        # Zero limits for every modality build no vision tower and load none of its weights.
        self.visual = self.vision_tower(config.vision_config) if multimodal.takes_any() else None

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.language_model(inputs_embeds, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(input_ids)

    def compile_vision_encoder(self) -> bool:
        """Compile the vision tower's regions; False when there is no tower (zero limits)."""
        if self.visual is None:
            return False
        compile_regions(self.visual.blocks)
        return True

    def encode_images(self, pixel_values: torch.Tensor, grids: list[Grid]) -> list[torch.Tensor]:
        """One [tokens, hidden] embedding per image or video, for the concatenated patches of ``grids``."""
        assert self.visual is not None, "images and videos reach the model only when a limit is above 0"
        embeddings = self.visual(pixel_values, grids)
        merge = self.visual.merge
        return list(embeddings.split([frames * height * width // merge**2 for frames, height, width in grids]))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # The tower's weights wait in a list while the decoder's stream by: each part is
        # loaded (and checked complete) on its own, the decoder's with its fused q/k/v.
        vision: list[tuple[str, torch.Tensor]] = []
        self.language_model.load_weights(self._language_weights(weights, vision))
        if self.visual is not None:
            load_named_weights(self.visual, vision)

    def _language_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], vision: list[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            vision_prefix = next((p for p in _VISION_PREFIXES if name.startswith(p)), None)
            if vision_prefix is not None:
                if self.visual is not None:
                    vision.append((name[len(vision_prefix) :], tensor))
                continue
            language_prefix = next((p for p in _LANGUAGE_PREFIXES if name.startswith(p)), None)
            yield ("model." + name[len(language_prefix) :] if language_prefix else name), tensor


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    vision_tower = Qwen25VisionTransformer
