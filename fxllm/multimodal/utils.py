"""Loading images from URLs as vLLM scripts do (``vllm.multimodal.utils``), without a network:
``data:`` URLs and local files only."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

DEFAULT_IMAGE_FORMAT = "PNG"


def fetch_image(image_url: str, *, image_mode: str = "RGB") -> Any:
    """The image a ``data:`` URL holds or a local path (``file://`` or plain) names."""
    from PIL import Image

    from fxllm.multimodal.image import convert_image_mode

    if image_url.startswith("data:"):
        _, _, payload = image_url.partition(",")
        image = Image.open(io.BytesIO(base64.b64decode(payload)))
    elif image_url.startswith(("http://", "https://")):
        raise ValueError(f"fxllm does not download images ({image_url}): pass a data: URL or a local path")
    else:
        path = Path(image_url.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no image file at {path}")
        image = Image.open(path)
    image.load()
    return convert_image_mode(image, image_mode)


def encode_image_base64(image: Any, *, format: str = DEFAULT_IMAGE_FORMAT) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return base64.b64encode(buffer.getvalue()).decode()


def encode_image_url(image: Any, *, format: str = DEFAULT_IMAGE_FORMAT) -> str:
    """A ``data:`` URL of ``image`` (what chat() image_url parts take)."""
    return f"data:image/{format.lower()};base64,{encode_image_base64(image, format=format)}"
