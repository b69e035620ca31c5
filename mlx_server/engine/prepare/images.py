"""Client images (base64, data URLs, allowed http(s) URLs) turned into checked RGB Pillow images.

This runs in the preparation worker threads, so it never imports MLX. Every image comes from the network, so each
step refuses before it spends: the image count first, the base64 length before decoding, the canvas size from the
header before any pixel is decoded (Image.open is lazy), and only then the pixels. Every refusal is a BadRequest
naming the image by its 1-based index; nothing here touches state shared with other requests.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import re
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence
from urllib.parse import urlsplit

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from mlx_server.contract.errors import BadRequest

# Pillow warns (rather than raises) between MAX_IMAGE_PIXELS and twice that; the header check below refuses those
# sizes anyway, so raising only moves the refusal earlier and keeps bombs out of the log. Set once at import: calling
# filterwarnings per request would reset every module's once-only warning registry each time.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

# Above Pillow's own limit a server wants a lower one: decoding 8192x8192 RGBA is already 256 MB per image.
HARD_MAX_PIXELS = 8192 * 8192
FETCH_TIMEOUT_S = 10.0
MAX_REDIRECTS = 3

ACCEPTED = ("png", "jpeg", "webp", "gif")
# Only these parsers ever see client bytes; MPO is how Pillow names the multi-picture JPEGs many phones write.
_PILLOW_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
_FORMAT_NAMES = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "WEBP": "webp", "GIF": "gif"}

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")  # base64 has no ':', so a colon means a URL
_WHITESPACE = " \t\r\n"
_DROP_WHITESPACE = str.maketrans("", "", _WHITESPACE)
_URL_REFUSED = (
    "only base64 data URLs are accepted for images (the server does not fetch image URLs; "
    "server.fetch_image_urls lists hosts it may fetch)"
)


@dataclass(frozen=True)
class ImageLimits:
    max_images: int = 8  # per request
    max_image_bytes: int = 20 * 2**20  # decoded bytes of one image
    max_pixels: int = 1024 * 1024  # larger images are scaled down (aspect kept) to at most this many pixels
    fetch_hosts: tuple[str, ...] = ()  # hosts whose http(s) URLs may be fetched; empty: none

    def __post_init__(self) -> None:
        if self.max_images < 0 or self.max_image_bytes < 0 or self.max_pixels < 1:
            raise ValueError(f"invalid image limits: {self}")


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, EXIF orientation applied, scaled to max_pixels
    digest: str  # sha256 hex of the original encoded bytes: the cache key of this image
    format: str  # one of ACCEPTED
    width: int  # of `image`
    height: int


def decode_images(
    sources: Sequence[str], limits: ImageLimits, *, fetch: Optional[Callable[[str, int], bytes]] = None
) -> list[DecodedImage]:
    """Decode and check every image of one request, in order; the first bad one raises BadRequest."""
    if len(sources) > limits.max_images:
        raise BadRequest(
            f"this request has {_count(len(sources), 'image')}; "
            f"the server accepts at most {limits.max_images} (server.max_images)"
        )
    return [
        _decode(index, _source_bytes(index, source, limits, fetch), limits)
        for index, source in enumerate(sources, start=1)
    ]


def fetch_url(url: str, max_bytes: int) -> bytes:
    """GET an http(s) URL: at most max_bytes, FETCH_TIMEOUT_S in all, redirects only within the same host."""
    deadline = time.monotonic() + FETCH_TIMEOUT_S
    # identity: a compressed body would be inflated before the size cap could see it.
    headers = {"Accept-Encoding": "identity", "Accept": "image/*"}
    try:
        host = urlsplit(url).hostname
        with httpx.Client(timeout=FETCH_TIMEOUT_S, follow_redirects=False, headers=headers) as client:
            for _ in range(MAX_REDIRECTS + 1):
                with client.stream("GET", url) as response:
                    if response.is_redirect:
                        target = response.url.join(response.headers["location"])
                        if target.scheme not in ("http", "https") or target.host != host:
                            raise BadRequest(f"could not fetch {url}: it redirects to another host ({target.host})")
                        url = str(target)
                        continue
                    if not response.is_success:
                        raise BadRequest(f"could not fetch {url}: HTTP {response.status_code}")
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > max_bytes:
                        raise BadRequest(f"could not fetch {url}: {declared} bytes, more than {max_bytes}")
                    body = bytearray()
                    for chunk in response.iter_raw():
                        body += chunk
                        if len(body) > max_bytes:
                            raise BadRequest(f"could not fetch {url}: more than {max_bytes} bytes")
                        if time.monotonic() > deadline:
                            raise BadRequest(f"could not fetch {url}: took longer than {FETCH_TIMEOUT_S:g} s")
                    return bytes(body)
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
        raise BadRequest(f"could not fetch {url}: {exc or type(exc).__name__}") from None
    raise BadRequest(f"could not fetch {url}: more than {MAX_REDIRECTS} redirects")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _source_bytes(index: int, source: str, limits: ImageLimits, fetch: Optional[Callable[[str, int], bytes]]) -> bytes:
    if not isinstance(source, str):
        raise BadRequest(f"image {index}: expected a base64 string or a data: or http(s) URL")
    source = source.strip()
    scheme_match = _SCHEME.match(source, 0, 64)  # a scheme is short: never scan a long base64 payload
    if scheme_match is None:
        return _base64_bytes(index, source, 0, limits)
    scheme = scheme_match.group(1).lower()
    if scheme == "data":
        comma = source.find(",")
        if comma < 0 or "base64" not in source[5:comma].lower().split(";")[1:]:
            raise BadRequest(f"image {index}: a data URL must be base64-encoded (data:image/png;base64,...)")
        # The declared media type is ignored: the bytes say what the image is.
        return _base64_bytes(index, source, comma + 1, limits)
    if scheme not in ("http", "https"):
        raise BadRequest(f'image {index}: unsupported URL scheme "{scheme}:"; send base64 image data or a data URL')
    try:
        host = urlsplit(source).hostname
    except ValueError:
        raise BadRequest(f"image {index}: invalid URL") from None
    if host is None or host not in {h.lower() for h in limits.fetch_hosts}:
        raise BadRequest(f"image {index}: {_URL_REFUSED}")
    try:
        data = (fetch or fetch_url)(source, limits.max_image_bytes)
    except BadRequest as exc:
        raise BadRequest(f"image {index}: {exc.message}") from None
    _check_size(index, len(data), limits)
    return data


def _base64_bytes(index: int, text: str, start: int, limits: ImageLimits) -> bytes:
    # Sized from the string itself (no copy yet), so a huge payload is refused before anything is allocated for it.
    length = len(text) - start - sum(text.count(c, start) for c in _WHITESPACE)
    padding = 2 if text.endswith("==") else 1 if text.endswith("=") else 0
    _check_size(index, max(0, length * 3 // 4 - padding), limits)
    payload = text[start:]
    if len(payload) != length:
        payload = payload.translate(_DROP_WHITESPACE)
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
        raise BadRequest(f"image {index} is not valid base64") from None
    _check_size(index, len(data), limits)
    return data


def _check_size(index: int, size: int, limits: ImageLimits) -> None:
    if size > limits.max_image_bytes:
        raise BadRequest(
            f"image {index} is {size} bytes; the server accepts at most {limits.max_image_bytes} bytes "
            "per image (server.max_image_bytes)"
        )


def _decode(index: int, data: bytes, limits: ImageLimits) -> DecodedImage:
    try:
        img = Image.open(io.BytesIO(data), formats=_PILLOW_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadRequest(f"image {index} declares more pixels than the server decodes ({exc})") from None
    except UnidentifiedImageError:
        other = _sniff(data)
        if other is None:
            raise BadRequest(f"image {index} is not a valid image") from None
        raise _unsupported(index, other) from None
    except Exception:  # noqa: BLE001 - Pillow's header parsers raise many types on malformed input
        raise BadRequest(f"image {index} is not a valid image") from None
    with img:
        width, height = img.size
        limit = _pixel_limit()
        # Checked on the header alone: nothing has been decoded and no canvas allocated yet.
        if width * height > limit:
            raise BadRequest(
                f"image {index} declares {width}x{height} pixels, more than the {limit} the server decodes"
            )
        fmt = _FORMAT_NAMES.get(img.format or "", "")
        if not fmt:
            raise _unsupported(index, (img.format or "unknown").lower())
        if fmt == "jpeg" and width * height > limits.max_pixels:
            # JPEG can decode at 1/2, 1/4 or 1/8 scale directly: a large photo never needs its full canvas.
            img.draft("RGB", _fit(width, height, limits.max_pixels))
        try:
            img.load()  # the first frame only, for animated GIF and WebP
            ImageOps.exif_transpose(img, in_place=True)
            rgb = _to_rgb(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise BadRequest(f"image {index} declares more pixels than the server decodes ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt data fails inside the decoders, in many types
            raise BadRequest(f"image {index} is truncated or corrupt: {exc or type(exc).__name__}") from None
        out = _scaled(rgb, limits.max_pixels)
        if out is img:
            out = img.copy()  # detached from the file object, whose image close() is about to drop
    return DecodedImage(out, hashlib.sha256(data).hexdigest(), fmt, out.width, out.height)


def _unsupported(index: int, fmt: str) -> BadRequest:
    return BadRequest(
        f"image {index} is in {fmt} format, which the server does not accept; accepted formats: {', '.join(ACCEPTED)}"
    )


def _pixel_limit() -> int:
    pillow = Image.MAX_IMAGE_PIXELS
    return HARD_MAX_PIXELS if pillow is None else min(int(pillow), HARD_MAX_PIXELS)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        # Vision processors expect RGB; transparent areas read as white, as a browser on a white page shows them.
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if img.mode.startswith("I"):
        # 16-bit grayscale PNG: Pillow's conversion clips at 255 rather than scaling, which would read as white.
        img = img.convert("I").point(lambda v: v / 256).convert("L")
    return img if img.mode == "RGB" else img.convert("RGB")


def _fit(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    # A side raised to 1 (extreme aspect ratios) leaves the other side only what the budget still allows.
    w = min(w, max_pixels // h)
    h = min(h, max_pixels // w)
    return w, h


def _scaled(img: Image.Image, max_pixels: int) -> Image.Image:
    size = _fit(img.width, img.height, max_pixels)
    return img if size == img.size else img.resize(size, Image.Resampling.BICUBIC)


# Enough to name what clients commonly send instead; their parsers are never run on client bytes.
_MAGIC = (
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"BM", "bmp"),
    (b"\x00\x00\x01\x00", "ico"),
    (b"8BPS", "psd"),
    (b"qoif", "qoi"),
    (b"%PDF", "pdf"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg2000"),
    (b"\xff\x4f\xff\x51", "jpeg2000"),
)
_FTYP_BRANDS = {b"heic": "heic", b"heix": "heic", b"hevc": "heic", b"mif1": "heif", b"avif": "avif", b"avis": "avif"}


def _sniff(data: bytes) -> Optional[str]:
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[4:8] == b"ftyp" and data[8:12] in _FTYP_BRANDS:
        return _FTYP_BRANDS[data[8:12]]
    head = data[:1024].lstrip()
    if head.startswith((b"<svg", b"<?xml")) and b"<svg" in head:
        return "svg"
    return None


__all__ = ["ACCEPTED", "HARD_MAX_PIXELS", "DecodedImage", "ImageLimits", "decode_images", "fetch_url"]
