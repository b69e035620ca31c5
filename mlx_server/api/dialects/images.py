"""Images in each dialect's shape, turned into the engine contract's: a list of strings and tags in the text.

The contract (contract/requests.py, ChatMessage.images / GenerateRequest.images): an image is a string, base64
(a `data:image/...;base64,` prefix allowed) or an http(s) URL; in a message's content, `[img]` marks where that
message's next image goes, and Ollama's `[img-N]` (N across the whole request) is honoured too. The engine decodes,
checks, fetches (only hosts in server.fetch_image_urls) and places them, and refuses images for a text model. So
nothing here decodes or refuses a URL: the dialects only check the JSON shape and keep each image where it was.
"""

from __future__ import annotations

from typing import Any, Optional

from mlx_server.contract.errors import BadRequest

IMAGE_TAG = "[img]"  # where the message's next image goes (the engine strips it)


def image_list(value: Any, where: str) -> Optional[list[str]]:
    """Ollama's `images`: a list of strings (None and [] mean none), else a 400 naming the field."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
        raise BadRequest(f'invalid value for field "{where}": expected an array of base64-encoded image strings')
    return list(value) or None


def openai_image(part: dict[str, Any], where: str) -> str:
    """The image of an `image_url` part ({"url": ...}, or the legacy bare string) or a Responses-style
    `input_image` part (`image_url` a string, or an object like image_url's)."""
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    if isinstance(url, str) and url:
        return url
    if part.get("type") == "input_image" and part.get("file_id") is not None:
        raise BadRequest(f"{where}: input_image by file_id is not supported; send the image as a data URL")
    raise BadRequest(f"{where}: an {part.get('type')} part needs image_url.url, a data URL or an http(s) URL")


def anthropic_image(block: dict[str, Any], where: str) -> str:
    """The image of an Anthropic `image` block: base64 source → a data URL, url source → the URL as sent."""
    source = block.get("source")
    if not isinstance(source, dict):
        raise BadRequest(f"{where}.source: expected an object")
    kind = source.get("type")
    if kind == "base64":
        media, data = source.get("media_type"), source.get("data")
        if not isinstance(media, str) or not media or not isinstance(data, str) or not data:
            raise BadRequest(f"{where}.source: a base64 image needs a media_type and data (strings)")
        return f"data:{media};base64,{data}"
    if kind == "url":
        url = source.get("url")
        if not isinstance(url, str) or not url:
            raise BadRequest(f"{where}.source.url: expected a string")
        return url
    raise BadRequest(f"{where}.source.type: expected base64 or url")


__all__ = ["IMAGE_TAG", "anthropic_image", "image_list", "openai_image"]
