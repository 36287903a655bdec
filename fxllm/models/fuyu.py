"""Fuyu: the Persimmon decoder reading image patches projected by one linear layer; no vision tower.

Each image is cut into patches (rows x columns, in reading order) by the checkpoint's
FuyuProcessor; ``vision_embed_tokens`` maps each flattened patch to one embedding, which takes
the place of one ``|SPEAKER|`` token (the ``|NEWLINE|`` token closing each row stays text). The
compiled graph is the decoder alone, from ``inputs_embeds``.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn
from transformers import PretrainedConfig

from fxllm.config import MultiModalConfig
from fxllm.models.interface import Model
from fxllm.models.persimmon import PersimmonForCausalLM
from fxllm.models.weights import load_named_weights

# Checkpoint name prefixes: transformers 5's module paths, then the original checkpoints'.
_RENAMES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_embed_tokens.", "vision_embed_tokens."),
)


class FuyuForCausalLM(Model):
    takes_inputs_embeds = True  # the runner embeds tokens and merges image patches before the graph

    def __init__(self, config: PretrainedConfig, max_positions: int, multimodal: MultiModalConfig):
        super().__init__()
        self.language_model = PersimmonForCausalLM(config.get_text_config(), max_positions)
        patch_dim = config.patch_size**2 * config.num_channels
        # Zero image limit: no projection, none of its weights loaded.
        self.vision_embed_tokens = nn.Linear(patch_dim, config.get_text_config().hidden_size) if multimodal.takes_any() else None

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.language_model.forward_embeds(inputs_embeds, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_input_ids(input_ids)

    def encode_images(self, pixel_values: torch.Tensor, grids: list[tuple[int, ...]]) -> list[torch.Tensor]:
        """Patches [patches, patch * patch * channels] of every image -> one [rows x columns, hidden]
        per image; ``grids``: (rows, columns) of each image, in order."""
        assert self.vision_embed_tokens is not None, "images reach the model only when the image limit is above 0"
        embeddings = self.vision_embed_tokens(pixel_values.to(self.vision_embed_tokens.weight.dtype))
        return list(embeddings.split([rows * columns for rows, columns in grids]))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        vision: list[tuple[str, torch.Tensor]] = []
        self.language_model.load_weights(self._language_weights(weights, vision))
        if self.vision_embed_tokens is not None:
            load_named_weights(self.vision_embed_tokens, vision)

    def _language_weights(self, weights: Iterable[tuple[str, torch.Tensor]], vision: list) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            name = next((new + name[len(old) :] for old, new in _RENAMES if name.startswith(old)), name)
            if name.startswith("vision_embed_tokens."):
                if self.vision_embed_tokens is not None:
                    vision.append((name[len("vision_embed_tokens.") :], tensor))
            elif name.startswith("language_model."):
                yield name[len("language_model.") :], tensor
            else:
                raise ValueError(f"checkpoint tensor {name!r} belongs to no part of FuyuForCausalLM")
