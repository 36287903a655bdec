"""InternVL: InternViT over dynamic image tiles, pixel shuffle, an MLP projector, and a decoder
(InternLM2, Qwen2, Phi-3 or Llama) that reads the image embeddings in place of ``<IMG_CONTEXT>``.

Two checkpoint layouts load into one model: the original ``InternVLChatModel`` (config.json with
``llm_config`` and ``vision_config``; weights ``vision_model.*``, ``mlp1.*``,
``language_model.*``) and transformers' ``InternVLForConditionalGeneration`` (``text_config``;
weights ``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``model.language_model.*``,
``lm_head.*``), whose names are mapped onto the original ones as they load.

The compiled graph is the decoder alone, from ``inputs_embeds`` with token-index positions; each
image's tiles run through the tower outside it (``encode_images``), each tile becoming
``num_image_token`` embeddings.
"""

from __future__ import annotations

import copy
from typing import Iterable, Iterator

import torch
from torch import nn
from transformers import PretrainedConfig

from fxllm.config import MultiModalConfig
from fxllm.models.intern_vit import InternVisionModel, InternVisionSettings
from fxllm.models.interface import Model
from fxllm.models.internlm2 import InternLM2ForCausalLM
from fxllm.models.layers import activation, compile_layers
from fxllm.models.llama import LlamaForCausalLM
from fxllm.models.phi3 import Phi3ForCausalLM
from fxllm.models.weights import load_named_weights

# The decoders InternVL checkpoints pair with the tower, by architecture, else by model type.
LANGUAGE_MODELS: dict[str, type[LlamaForCausalLM]] = {
    "InternLM2ForCausalLM": InternLM2ForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
}
_LANGUAGE_MODEL_TYPES = {
    "internlm2": "InternLM2ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "phi3": "Phi3ForCausalLM",
}
PIXEL_SHUFFLE_VERSIONS = ("v1", "v2")

# transformers' layout -> the original one, by name prefix (the vision tower's q/k/v are fused
# apart). transformers saves its checkpoints without the leading "model." of its module paths
# (and its language model as language_model.model.*, language_model.lm_head.*): both load.
_HF_PREFIXES = (
    ("vision_tower.embeddings.cls_token", "vision_model.embeddings.class_embedding"),
    ("vision_tower.embeddings.patch_embeddings.projection.", "vision_model.embeddings.patch_embedding."),
    ("vision_tower.embeddings.position_embeddings", "vision_model.embeddings.position_embedding"),
    ("vision_tower.encoder.layer.", "vision_model.encoder.layers."),
    ("multi_modal_projector.layer_norm.", "mlp1.0."),
    ("multi_modal_projector.linear_1.", "mlp1.1."),
    ("multi_modal_projector.linear_2.", "mlp1.3."),
    ("language_model.model.", "language_model.model."),
    ("language_model.lm_head.", "language_model.lm_head."),
    ("language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
_HF_LAYER_PIECES = (
    (".attention.projection_layer.", ".attn.proj."),
    (".attention.q_norm.", ".attn.q_norm."),
    (".attention.k_norm.", ".attn.k_norm."),
    (".layernorm_before.", ".norm1."),
    (".layernorm_after.", ".norm2."),
    (".lambda_1", ".ls1"),
    (".lambda_2", ".ls2"),
)
_HF_QKV = (".attention.q_proj.", ".attention.k_proj.", ".attention.v_proj.")


def language_model_class(text_config: PretrainedConfig) -> type[LlamaForCausalLM]:
    names = [*(getattr(text_config, "architectures", None) or ()), _LANGUAGE_MODEL_TYPES.get(text_config.model_type, "")]
    for name in names:
        if name in LANGUAGE_MODELS:
            return LANGUAGE_MODELS[name]
    raise ValueError(
        f"InternVL with a {names[0] or text_config.model_type!r} language model is not supported; "
        f"supported: {', '.join(sorted(LANGUAGE_MODELS))}"
    )


def pixel_shuffle(features: torch.Tensor, ratio: float, version: str) -> torch.Tensor:
    """[tiles, side, side, dim] -> [tiles, side * ratio, side * ratio, dim / ratio**2]: each
    (1 / ratio) x (1 / ratio) block of patches folded into one, in InternVL's order ("v1"
    leaves the two sides transposed, as its first checkpoints were trained)."""
    tiles, width, height, dim = features.shape
    features = features.reshape(tiles, width, int(height * ratio), int(dim / ratio))
    features = features.permute(0, 2, 1, 3)
    features = features.reshape(tiles, int(height * ratio), int(width * ratio), int(dim / (ratio * ratio)))
    return features if version == "v1" else features.permute(0, 2, 1, 3)


class InternVLChatModel(Model):
    takes_inputs_embeds = True  # the runner embeds tokens and merges images before the graph
    hf_layout = False

    def __init__(self, config: PretrainedConfig, max_positions: int, multimodal: MultiModalConfig):
        super().__init__()
        text_config = config.get_text_config()
        if self.hf_layout:  # transformers ties the LM head by the top-level config's flag
            text_config = copy.copy(text_config)
            text_config.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.language_model = language_model_class(text_config)(text_config, max_positions)
        vision_config = config.vision_config
        if self.hf_layout:
            if config.vision_feature_select_strategy != "default":
                raise ValueError(
                    f"vision_feature_select_strategy {config.vision_feature_select_strategy!r} is not supported; "
                    f"InternVL drops the class token ('default')"
                )
            feature_layer, self.ps_version = config.vision_feature_layer, "v2"
            if not isinstance(feature_layer, int):
                raise ValueError(f"vision_feature_layer must be one layer for InternVL, got {feature_layer!r}")
            projector_act = config.projector_hidden_act
        else:
            feature_layer, self.ps_version = config.select_layer, getattr(config, "ps_version", "v2")
            projector_act = "gelu"  # the original mlp1 is nn.GELU()
            image_size = getattr(config, "force_image_size", None) or vision_config.image_size
            if image_size != vision_config.image_size:
                raise ValueError(
                    f"force_image_size {image_size} differs from the vision tower's image_size {vision_config.image_size}: "
                    f"fxllm does not interpolate InternViT's position embeddings"
                )
        if self.ps_version not in PIXEL_SHUFFLE_VERSIONS:
            raise ValueError(f"ps_version {self.ps_version!r} is not supported; expected one of {', '.join(PIXEL_SHUFFLE_VERSIONS)}")
        self.settings = InternVisionSettings.from_config(vision_config, feature_layer, self.hf_layout)
        self.downsample_ratio = config.downsample_ratio
        self.num_image_token = int(self.settings.patches_per_side**2 * self.downsample_ratio**2)
        # Zero image limit: no tower, none of its weights loaded.
        self.vision_model = self.mlp1 = None
        if multimodal.takes_any():
            self.vision_model = InternVisionModel(self.settings)
            merged = self.settings.hidden_size * int(1 / self.downsample_ratio) ** 2
            hidden = text_config.hidden_size
            self.mlp1 = nn.Sequential(nn.LayerNorm(merged), nn.Linear(merged, hidden), activation(projector_act), nn.Linear(hidden, hidden))

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.language_model.forward_embeds(inputs_embeds, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_input_ids(input_ids)

    def compile_vision_encoder(self) -> bool:
        if self.vision_model is None:
            return False
        compile_layers(self.vision_model.encoder.layers)
        return True

    def encode_images(self, pixel_values: torch.Tensor, grids: list[tuple[int, ...]]) -> list[torch.Tensor]:
        """The tiles of every image [tiles, 3, size, size] -> one [tiles x num_image_token, hidden]
        per image; ``grids``: (tiles,) of each image, in order."""
        assert self.vision_model is not None, "images reach the model only when the image limit is above 0"
        features = self.vision_model(pixel_values)  # [tiles, patches, dim]
        side = self.settings.patches_per_side
        features = pixel_shuffle(features.reshape(features.shape[0], side, side, -1), self.downsample_ratio, self.ps_version)
        embeddings = self.mlp1(features.reshape(features.shape[0], -1, features.shape[-1]))  # [tiles, tokens, hidden]
        return [tiles.flatten(0, 1) for tiles in embeddings.split([tiles for tiles, in grids])]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        vision: list[tuple[str, torch.Tensor]] = []
        projector: list[tuple[str, torch.Tensor]] = []
        self.language_model.load_weights(self._language_weights(weights, vision, projector))
        if self.vision_model is not None:
            load_named_weights(self.vision_model, vision)
            load_named_weights(self.mlp1, projector)

    def _language_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], vision: list, projector: list
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The decoder's tensors as they stream by; the tower's and projector's kept aside (none
        without a tower, and none of the tower's blocks past the feature layer)."""
        for name, tensor in self._original_names(weights):
            if name.startswith("language_model."):
                yield name[len("language_model.") :], tensor
            elif self.vision_model is None:
                continue
            elif name.startswith("vision_model."):
                name = name[len("vision_model.") :]
                if not _past_feature_layer(name, self.settings.num_layers):
                    vision.append((name, tensor))
            elif name.startswith("mlp1."):
                projector.append((name[len("mlp1.") :], tensor))
            else:
                raise ValueError(f"checkpoint tensor {name!r} belongs to no part of {type(self).__name__}")

    def _original_names(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(weights)


class InternVLForConditionalGeneration(InternVLChatModel):
    """transformers' layout of the same model."""

    hf_layout = True

    def _original_names(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """transformers' names mapped onto the original ones; each block's q, k and v (weights and
        biases) concatenated into its fused ``qkv`` once all three have come by."""
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in weights:
            name = name.removeprefix("model.")
            for old, new in _HF_PREFIXES:
                if name.startswith(old):
                    name = new + name[len(old) :]
                    break
            if name.startswith("vision_model."):
                for old, new in _HF_LAYER_PIECES:
                    name = name.replace(old, new)
                piece = next((piece for piece in _HF_QKV if piece in name), None)
                if piece is not None:
                    fused = name.replace(piece, ".attn.qkv.")
                    parts = pending.setdefault(fused, {})
                    parts[piece] = tensor
                    if len(parts) == len(_HF_QKV):
                        yield fused, torch.cat([parts[p] for p in _HF_QKV])
                        del pending[fused]
                    continue
            yield name, tensor
        if pending:
            raise ValueError(f"the checkpoint has only part of q_proj/k_proj/v_proj for {', '.join(sorted(pending))}")


def _past_feature_layer(name: str, num_layers: int) -> bool:
    """Whether a tower tensor belongs to a block after the one the projector reads."""
    prefix = "encoder.layers."
    return name.startswith(prefix) and int(name[len(prefix) :].split(".")[0]) >= num_layers
