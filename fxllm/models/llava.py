"""LLaVA-1.5: a CLIP vision tower, a two-layer MLP projector, and a Llama-family decoder that reads
one image embedding per ``<image>`` token (the processor repeats the token once per patch).

The compiled graph is the decoder alone, from ``inputs_embeds``; each image runs through the
tower and projector outside it (``encode_images``). The saved layout (``vision_tower.*``,
``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.*``; the tower's
names with or without CLIP's ``vision_model.``) and transformers 5's module paths (``model.*``,
``lm_head.*``) both load.
"""

from __future__ import annotations

import copy
from typing import Iterable, Iterator

import torch
from torch import nn
from transformers import PretrainedConfig

from fxllm.config import MultiModalConfig
from fxllm.models.clip_vision import CLIPVisionTower
from fxllm.models.interface import Model
from fxllm.models.layers import activation, compile_layers
from fxllm.models.llama import LlamaForCausalLM
from fxllm.models.weights import load_named_weights

# The decoders LLaVA checkpoints pair with the tower, by model type.
LANGUAGE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
FEATURE_STRATEGIES = ("default", "full")  # "default" drops the class token
# transformers 5's module paths -> the saved layout's.
_RENAMES = (
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
_CLIP_PREFIX = "vision_model."  # llava-hf's tower names have it, transformers 5's saved ones not


class LlavaMultiModalProjector(nn.Module):
    def __init__(self, config: PretrainedConfig, num_feature_layers: int):
        super().__init__()
        bias = getattr(config, "multimodal_projector_bias", True)
        vision, text = config.vision_config.hidden_size * num_feature_layers, config.get_text_config().hidden_size
        self.linear_1 = nn.Linear(vision, text, bias=bias)
        self.act = activation(config.projector_hidden_act)
        self.linear_2 = nn.Linear(text, text, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


def feature_layers_of(config: PretrainedConfig) -> list[int]:
    layers = config.vision_feature_layer
    return list(layers) if isinstance(layers, (list, tuple)) else [layers]


class LlavaForConditionalGeneration(Model):
    takes_inputs_embeds = True  # the runner embeds tokens and merges images before the graph

    def __init__(self, config: PretrainedConfig, max_positions: int, multimodal: MultiModalConfig):
        super().__init__()
        text_config = copy.copy(config.get_text_config())
        if text_config.model_type not in LANGUAGE_MODEL_TYPES:
            raise ValueError(
                f"LLaVA with a {text_config.model_type!r} language model is not supported; "
                f"supported: {', '.join(sorted(LANGUAGE_MODEL_TYPES))}"
            )
        # transformers ties the LM head by the top-level config's flag.
        text_config.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.language_model = LlamaForCausalLM(text_config, max_positions)
        if config.vision_config.model_type != "clip_vision_model":
            raise ValueError(f"LLaVA with a {config.vision_config.model_type!r} vision tower is not supported; expected CLIP")
        if config.vision_feature_select_strategy not in FEATURE_STRATEGIES:
            raise ValueError(
                f"vision_feature_select_strategy must be one of {', '.join(FEATURE_STRATEGIES)}, "
                f"got {config.vision_feature_select_strategy!r}"
            )
        self.drop_class_token = config.vision_feature_select_strategy == "default"
        # Zero image limit: no tower, none of its weights loaded.
        self.vision_tower = self.multi_modal_projector = None
        if multimodal.takes_any():
            layers = feature_layers_of(config)
            self.vision_tower = CLIPVisionTower(config.vision_config, layers)
            self.multi_modal_projector = LlavaMultiModalProjector(config, len(layers))

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.language_model.forward_embeds(inputs_embeds, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_input_ids(input_ids)

    def compile_vision_encoder(self) -> bool:
        if self.vision_tower is None:
            return False
        compile_layers(self.vision_tower.vision_model.encoder.layers)
        return True

    def encode_images(self, pixel_values: torch.Tensor, grids: list[tuple[int, ...]]) -> list[torch.Tensor]:
        """Images [images, 3, size, size] -> one [tokens, hidden] each (a row per patch, and one for
        the class token unless the strategy drops it)."""
        assert self.vision_tower is not None, "images reach the model only when the image limit is above 0"
        features = self.vision_tower(pixel_values)
        if self.drop_class_token:
            features = features[:, 1:]
        return list(self.multi_modal_projector(features))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        vision: list[tuple[str, torch.Tensor]] = []
        projector: list[tuple[str, torch.Tensor]] = []
        self.language_model.load_weights(self._language_weights(weights, vision, projector))
        if self.vision_tower is not None:
            load_named_weights(self.vision_tower, vision)
            load_named_weights(self.multi_modal_projector, projector)

    def _language_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], vision: list, projector: list
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            name = next((new + name[len(old) :] for old, new in _RENAMES if name.startswith(old)), name)
            if name.startswith("language_model."):
                yield name[len("language_model.") :], tensor
            elif self.vision_tower is None:
                continue
            elif name.startswith("vision_tower."):
                name = name[len("vision_tower.") :]
                name = name if name.startswith(_CLIP_PREFIX) else _CLIP_PREFIX + name
                if _tower_uses(name, self.vision_tower.num_layers):
                    vision.append((name, tensor))
            elif name.startswith("multi_modal_projector."):
                projector.append((name[len("multi_modal_projector.") :], tensor))
            else:
                raise ValueError(f"checkpoint tensor {name!r} belongs to no part of LlavaForConditionalGeneration")


def _tower_uses(name: str, num_layers: int) -> bool:
    """Whether the built tower has this tensor: not blocks past the deepest feature layer, nor the
    final LayerNorm of CLIP's pooled output (LLaVA reads hidden states)."""
    if name.startswith("vision_model.post_layernorm."):
        return False
    prefix = "vision_model.encoder.layers."
    return not name.startswith(prefix) or int(name[len(prefix) :].split(".")[0]) < num_layers
