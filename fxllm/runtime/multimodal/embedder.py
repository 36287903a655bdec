"""A step's ``inputs_embeds[T, H]`` for a vision-language model, built outside the compiled graph.

Every token is embedded, then the image and video embeddings are written over the
placeholder tokens this step computes. A chunk may end inside an image (chunked
prefill, or a prefix-cache hit that stops mid-image): the whole image is encoded when
its first token is scheduled, kept on the request, sliced chunk by chunk, and dropped
once its last token is computed. So one image's embeddings always come from one
encoder run. Videos go through the same vision tower (their frames are its temporal
patches) and the same path. Where only some tokens of an item's span take embeddings
(Fuyu's rows of patches end in newline tokens), its ``embed_mask`` says which; the others
keep their token embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fxllm.runtime.request import Request
from fxllm.runtime.scheduler import ScheduledRequest


@dataclass(frozen=True)
class _ItemSlice:
    row: int  # first row of the step that takes it
    request: Request
    item: int  # index among the request's images and videos
    start: int  # its embeddings [start, end) go there
    end: int


class MultiModalEmbedder:
    def __init__(self, model: nn.Module):
        self.model = model  # a Model that takes inputs_embeds: embed_input_ids and encode_images
        self.items_encoded = 0  # images and videos, for stats and tests

    def inputs_embeds(self, scheduled: list[ScheduledRequest], input_ids: torch.Tensor) -> torch.Tensor:
        """[T_padded, H] for the step's ``input_ids`` [T_padded] (padding rows embed the padding id)."""
        embeds = self.model.embed_input_ids(input_ids)
        slices = self._item_slices(scheduled)
        self._encode_missing(slices, input_ids.device)
        for piece in slices:
            outputs = piece.request.encoder_outputs
            item = piece.request.multimodal.items[piece.item]
            rows = embeds[piece.row : piece.row + piece.end - piece.start]
            if item.embed_mask is None:
                rows.copy_(outputs[piece.item][piece.start : piece.end])
            else:  # only some of the span's tokens take embeddings, in order
                mask = item.embed_mask[piece.start : piece.end]
                first = int(item.embed_mask[: piece.start].sum())
                rows[mask.to(rows.device)] = outputs[piece.item][first : first + int(mask.sum())]
            if piece.end == item.length:
                del outputs[piece.item]  # its last token is computed in this step
        return embeds

    @staticmethod
    def _item_slices(scheduled: list[ScheduledRequest]) -> list[_ItemSlice]:
        slices, row = [], 0
        for entry in scheduled:
            request, prompt = entry.request, entry.request.multimodal
            start, end = request.num_computed_tokens, request.num_computed_tokens + entry.num_new_tokens
            for number, item in enumerate(prompt.items if prompt is not None else ()):
                first, last = max(start, item.offset), min(end, item.end)
                if first < last:
                    slices.append(_ItemSlice(row + first - start, request, number, first - item.offset, last - item.offset))
            row += entry.num_new_tokens
        return slices

    def _encode_missing(self, slices: list[_ItemSlice], device: torch.device) -> None:
        """One vision-tower run for the step's images and videos not encoded yet; equal ones (the
        n completions of a prompt, an image given twice) are encoded once."""
        missing = list(dict.fromkeys((s.request, s.item) for s in slices if s.item not in s.request.encoder_outputs))
        if not missing:
            return
        items = {}  # content hash -> item, in order of appearance
        for request, number in missing:
            item = request.multimodal.items[number]
            items.setdefault(item.content_hash, item)
        pixel_values = torch.cat([item.pixel_values for item in items.values()]).to(device)
        outputs = dict(zip(items, self.model.encode_images(pixel_values, [item.grid for item in items.values()])))
        for request, number in missing:
            request.encoder_outputs[number] = outputs[request.multimodal.items[number].content_hash]
        self.items_encoded += len(items)
