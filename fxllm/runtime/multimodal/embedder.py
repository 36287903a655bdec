"""A step's ``inputs_embeds[T, H]`` for a vision-language model, built outside the compiled graph.

Every token is embedded, then the image embeddings are written over the placeholder
tokens this step computes. A chunk may end inside an image (chunked prefill, or a
prefix-cache hit that stops mid-image): the whole image is encoded when its first
token is scheduled, kept on the request, sliced chunk by chunk, and dropped once its
last token is computed. So one image's embeddings always come from one encoder run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fxllm.runtime.request import Request
from fxllm.runtime.scheduler import ScheduledRequest


@dataclass(frozen=True)
class _ImageSlice:
    row: int  # first row of the step that takes it
    request: Request
    image: int  # index among the request's images
    start: int  # its embeddings [start, end) go there
    end: int


class MultiModalEmbedder:
    def __init__(self, model: nn.Module):
        self.model = model  # has embed_input_ids and encode_images
        self.images_encoded = 0  # for stats and tests

    def inputs_embeds(self, scheduled: list[ScheduledRequest], input_ids: torch.Tensor) -> torch.Tensor:
        """[T_padded, H] for the step's ``input_ids`` [T_padded] (padding rows embed the padding id)."""
        embeds = self.model.embed_input_ids(input_ids)
        slices = self._image_slices(scheduled)
        self._encode_missing(slices, input_ids.device)
        for piece in slices:
            outputs = piece.request.encoder_outputs
            embeds[piece.row : piece.row + piece.end - piece.start] = outputs[piece.image][piece.start : piece.end]
            if piece.end == piece.request.multimodal.images[piece.image].length:
                del outputs[piece.image]  # its last token is computed in this step
        return embeds

    @staticmethod
    def _image_slices(scheduled: list[ScheduledRequest]) -> list[_ImageSlice]:
        slices, row = [], 0
        for entry in scheduled:
            request, prompt = entry.request, entry.request.multimodal
            start, end = request.num_computed_tokens, request.num_computed_tokens + entry.num_new_tokens
            for number, image in enumerate(prompt.images if prompt is not None else ()):
                first, last = max(start, image.offset), min(end, image.end)
                if first < last:
                    slices.append(_ImageSlice(row + first - start, request, number, first - image.offset, last - image.offset))
            row += entry.num_new_tokens
        return slices

    def _encode_missing(self, slices: list[_ImageSlice], device: torch.device) -> None:
        """One vision-tower run for the step's images not encoded yet; equal images (the n
        completions of a prompt, an image given twice) are encoded once."""
        missing = list(dict.fromkeys((s.request, s.image) for s in slices if s.image not in s.request.encoder_outputs))
        if not missing:
            return
        images = {}  # content hash -> image, in order of appearance
        for request, number in missing:
            image = request.multimodal.images[number]
            images.setdefault(image.content_hash, image)
        pixel_values = torch.cat([image.pixel_values for image in images.values()]).to(device)
        outputs = dict(zip(images, self.model.encode_images(pixel_values, [image.grid for image in images.values()])))
        for request, number in missing:
            request.encoder_outputs[number] = outputs[request.multimodal.images[number].content_hash]
        self.images_encoded += len(images)
