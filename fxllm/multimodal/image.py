"""Image conversions (vLLM's ``vllm.multimodal.image``)."""

from __future__ import annotations

from typing import Any


def convert_image_mode(image: Any, to_mode: str) -> Any:
    """``image`` in PIL mode ``to_mode`` (e.g. "RGB"); an RGBA image is laid on white first, as
    dropping the alpha channel would turn transparent pixels black."""
    if image.mode == to_mode:
        return image
    if image.mode == "RGBA" and to_mode == "RGB":
        from PIL import Image

        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert(to_mode)
