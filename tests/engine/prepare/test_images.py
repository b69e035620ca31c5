"""Image decoding and its refusals, with real Pillow on images made in memory."""

from __future__ import annotations

import base64
import hashlib
import io
import resource
import struct
import threading
import tracemalloc
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from PIL import Image

from mlx_server.contract.errors import BadRequest
from mlx_server.engine.prepare import images
from mlx_server.engine.prepare.images import HARD_MAX_PIXELS, ImageLimits, decode_images, fetch_url

LIMITS = ImageLimits()
URL_REFUSED = (
    "only base64 data URLs are accepted for images (the server does not fetch image URLs; "
    "server.fetch_image_urls lists hosts it may fetch)"
)


def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def solid(color: tuple[int, ...] = (200, 30, 30), size: tuple[int, int] = (32, 24), mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, color)


PNG = encode(solid(), "PNG")


def refused(sources: list[str], limits: ImageLimits = LIMITS, **kw: Any) -> str:
    with pytest.raises(BadRequest) as info:
        decode_images(sources, limits, **kw)
    assert info.value.status == 400
    return info.value.message


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A real PNG that declares width x height RGB but carries only a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# --- good images ---


@pytest.mark.parametrize(("fmt", "name"), [("PNG", "png"), ("JPEG", "jpeg"), ("WEBP", "webp"), ("GIF", "gif")])
def test_each_accepted_format_decodes(fmt: str, name: str) -> None:
    data = encode(solid(), fmt)
    [out] = decode_images([b64(data)], LIMITS)
    assert (out.format, out.width, out.height, out.image.mode) == (name, 32, 24, "RGB")
    assert out.image.size == (32, 24)
    assert out.digest == hashlib.sha256(data).hexdigest()
    assert max(abs(a - b) for a, b in zip(out.image.getpixel((5, 5)), (200, 30, 30), strict=True)) < 12


def test_data_url_prefix_padding_and_whitespace_are_tolerated() -> None:
    plain = b64(PNG)
    wrapped = "\n".join(plain[i : i + 76] for i in range(0, len(plain), 76))
    sources = [
        f"data:image/png;base64,{plain}",
        f"  DATA:image/png;BASE64,{wrapped}\n",
        plain.rstrip("="),
        wrapped,
        f"data:image/jpeg;base64,{plain}",  # the declared type disagrees: the bytes win
    ]
    out = decode_images(sources, LIMITS)
    assert {o.digest for o in out} == {hashlib.sha256(PNG).hexdigest()}
    assert {o.format for o in out} == {"png"}


def test_digests_tell_images_apart() -> None:
    other = encode(solid((0, 0, 255)), "PNG")
    a, b, c = decode_images([b64(PNG), b64(other), b64(PNG)], LIMITS)
    assert a.digest == c.digest != b.digest


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs 90 degrees clockwise
    [out] = decode_images([b64(encode(img, "JPEG", exif=exif, quality=95))], LIMITS)
    assert (out.width, out.height) == (20, 40)
    top, bottom = out.image.getpixel((10, 5)), out.image.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the left (red) half ends up on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_transparency_is_composited_on_white() -> None:
    img = Image.new("RGBA", (3, 1), (0, 0, 0, 0))
    img.putpixel((1, 0), (255, 0, 0, 255))
    img.putpixel((2, 0), (0, 0, 0, 128))
    [out] = decode_images([b64(encode(img, "PNG"))], LIMITS)
    assert out.image.mode == "RGB"
    assert out.image.getpixel((0, 0)) == (255, 255, 255)
    assert out.image.getpixel((1, 0)) == (255, 0, 0)
    assert 120 <= out.image.getpixel((2, 0))[0] <= 135  # half black over white

    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 255, 0, 0, 0, 255])
    palette.putpixel((1, 0), 1)
    [gif] = decode_images([b64(encode(palette, "GIF", transparency=0))], LIMITS)
    assert gif.image.getpixel((0, 0)) == (255, 255, 255)
    assert gif.image.getpixel((1, 0)) == (0, 0, 255)

    [gray] = decode_images([b64(encode(solid(90, mode="L"), "PNG"))], LIMITS)
    assert gray.image.mode == "RGB" and gray.image.getpixel((0, 0)) == (90, 90, 90)
    [deep] = decode_images([b64(encode(solid(40_000, mode="I;16"), "PNG"))], LIMITS)
    assert deep.image.getpixel((0, 0)) == (156, 156, 156)  # 16-bit gray scaled to 8 bits, not clipped


def test_large_images_are_scaled_down_keeping_aspect() -> None:
    limits = ImageLimits(max_pixels=10_000)
    [wide] = decode_images([b64(encode(solid(size=(400, 100)), "PNG"))], limits)
    assert (wide.width, wide.height) == (200, 50) == wide.image.size
    [photo] = decode_images([b64(encode(solid(size=(800, 600)), "JPEG"))], limits)  # decoded at reduced scale
    assert photo.width * photo.height <= 10_000
    assert abs(photo.width / photo.height - 4 / 3) < 0.05
    [line] = decode_images([b64(encode(solid(size=(5000, 1)), "PNG"))], ImageLimits(max_pixels=100))
    assert (line.width, line.height) == (100, 1)
    [small] = decode_images([b64(PNG)], limits)
    assert small.image.size == (32, 24)


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [solid((255, 0, 0)), solid((0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    [out] = decode_images([b64(data)], LIMITS)
    assert out.image.getpixel((0, 0)) == (255, 0, 0)
    webp = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    [first] = decode_images([b64(webp)], LIMITS)
    assert first.image.getpixel((0, 0)) == (255, 0, 0)


# --- refusals ---


def test_too_many_images() -> None:
    assert refused([b64(PNG)] * 3, ImageLimits(max_images=2)) == (
        "this request has 3 images; the server accepts at most 2 (server.max_images)"
    )
    assert refused([b64(PNG)], ImageLimits(max_images=0)) == (
        "this request has 1 image; the server accepts at most 0 (server.max_images)"
    )


def test_invalid_base64_names_the_image() -> None:
    assert refused([b64(PNG), "not base64!!"]) == "image 2 is not valid base64"
    assert refused(["data:image/png;base64,QUJD$"]) == "image 1 is not valid base64"
    assert refused(["ÿÿÿÿ"]) == "image 1 is not valid base64"
    assert refused(["data:image/png,rawbytes"]).startswith("image 1: a data URL must be base64-encoded")


def test_oversized_images_are_refused() -> None:
    limits = ImageLimits(max_image_bytes=len(PNG))
    assert decode_images([b64(PNG)], limits)[0].format == "png"  # exactly at the limit
    message = refused([b64(PNG)], ImageLimits(max_image_bytes=len(PNG) - 1))
    assert message == (
        f"image 1 is {len(PNG)} bytes; the server accepts at most {len(PNG) - 1} bytes per image "
        "(server.max_image_bytes)"
    )


def test_a_huge_base64_string_is_refused_before_it_is_decoded() -> None:
    huge = "QUFB" * (10 * 2**20)  # 40 MiB of base64, 30 MiB decoded
    tracemalloc.start()
    try:
        message = refused([huge])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message.startswith("image 1 is 31457280 bytes; the server accepts at most 20971520 bytes")
    assert peak < 2**20


def test_bytes_that_are_not_an_image() -> None:
    assert refused([b64(b"hello, world")]) == "image 1 is not a valid image"
    assert refused([""]) == "image 1 is not a valid image"
    assert refused([f"data:image/tiff;base64,{b64(b'not a tiff at all')}"]) == "image 1 is not a valid image"
    assert refused([b64(PNG[:30])]) == "image 1 is not a valid image"  # cut inside the header
    assert refused([123]) == "image 1: expected a base64 string or a data: or http(s) URL"  # type: ignore[list-item]


@pytest.mark.parametrize(("fmt", "name"), [("TIFF", "tiff"), ("BMP", "bmp"), ("ICO", "ico")])
def test_unsupported_formats_are_named(fmt: str, name: str) -> None:
    message = refused([f"data:image/{name};base64,{b64(encode(solid(), fmt))}"])
    assert message == (
        f"image 1 is in {name} format, which the server does not accept; accepted formats: png, jpeg, webp, gif"
    )


def test_truncated_image_data_is_refused() -> None:
    noise = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
    for fmt in ("PNG", "JPEG"):
        data = encode(noise, fmt)
        message = refused([b64(data[: len(data) // 2])])
        assert message.startswith("image 1 is truncated or corrupt: "), message
    assert refused([b64(png_header(100, 100))]).startswith("image 1 is truncated or corrupt: ")


def test_a_decompression_bomb_is_refused_from_its_header_in_little_memory() -> None:
    bomb = b64(png_header(50_000, 50_000))
    assert len(bomb) < 200
    stats = Image.core.get_stats()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    try:
        message = refused([bomb])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message.startswith("image 1 declares more pixels than the server decodes"), message
    assert peak < 50 * 2**20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 50 * 2**10
    assert Image.core.get_stats()["new_count"] == stats["new_count"]  # no canvas was ever created


def test_canvases_past_the_hard_cap_are_refused_before_decoding() -> None:
    side = 8200  # over HARD_MAX_PIXELS, under Pillow's own limit: only the header check stands in the way
    assert HARD_MAX_PIXELS < side * side < Image.MAX_IMAGE_PIXELS  # type: ignore[operator]
    stats = Image.core.get_stats()
    message = refused([b64(png_header(side, side))])
    assert message == f"image 1 declares {side}x{side} pixels, more than the {HARD_MAX_PIXELS} the server decodes"
    assert Image.core.get_stats()["new_count"] == stats["new_count"]


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")  # what the module sets at import
def test_pillow_limit_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for size in ((32, 32), (40, 40), (100, 100)):  # our check, Pillow's warning, Pillow's error
        assert refused([b64(encode(solid(size=size), "PNG"))]).startswith("image 1 declares ")
    assert decode_images([b64(encode(solid(size=(30, 30)), "PNG"))], LIMITS)[0].width == 30


# --- URLs ---


def never_fetch(url: str, max_bytes: int) -> bytes:
    raise AssertionError(f"fetched {url}")


def test_urls_of_hosts_not_listed_are_never_fetched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "fetch_url", never_fetch)
    allowed = ImageLimits(fetch_hosts=("images.example.com",))
    for url, limits in [
        ("https://images.example.com/cat.png", LIMITS),
        ("http://other.example.com/cat.png", allowed),
        ("http://images.example.com@evil.example.com/cat.png", allowed),
        ("http://images.example.com.evil.example.com/cat.png", allowed),
    ]:
        assert refused([b64(PNG), url], limits) == f"image 2: {URL_REFUSED}"
        assert refused([url], limits, fetch=never_fetch) == f"image 1: {URL_REFUSED}"


def test_other_url_schemes_are_refused() -> None:
    allowed = ImageLimits(fetch_hosts=("localhost", ""))
    assert refused(["file:///etc/passwd"], allowed, fetch=never_fetch) == (
        'image 1: unsupported URL scheme "file:"; send base64 image data or a data URL'
    )
    assert refused(["ftp://localhost/a.png"], allowed, fetch=never_fetch).startswith(
        'image 1: unsupported URL scheme "ftp:"'
    )


def test_listed_hosts_are_fetched_through_fetch() -> None:
    calls: list[tuple[str, int]] = []

    def fake(url: str, max_bytes: int) -> bytes:
        calls.append((url, max_bytes))
        return PNG

    limits = ImageLimits(fetch_hosts=("images.example.com",), max_image_bytes=10_000)
    [out] = decode_images(["HTTPS://Images.Example.COM/cat.png"], limits, fetch=fake)
    assert out.digest == hashlib.sha256(PNG).hexdigest()
    assert calls == [("HTTPS://Images.Example.COM/cat.png", 10_000)]

    def failing(url: str, max_bytes: int) -> bytes:
        raise BadRequest(f"could not fetch {url}: HTTP 404")

    url = "https://images.example.com/gone.png"
    assert refused([url], limits, fetch=failing) == f"image 1: could not fetch {url}: HTTP 404"
    big = ImageLimits(fetch_hosts=("images.example.com",), max_image_bytes=len(PNG) - 1)
    assert refused([url], big, fetch=lambda u, n: PNG).startswith(f"image 1 is {len(PNG)} bytes")


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        port = self.server.server_address[1]
        if self.path == "/img.png":
            self.reply(200, PNG)
        elif self.path == "/same":
            self.reply(302, b"", Location="/img.png")
        elif self.path == "/other":
            self.reply(302, b"", Location=f"http://localhost:{port}/img.png")
        elif self.path == "/loop":
            self.reply(302, b"", Location="/loop")
        elif self.path == "/stream":  # no Content-Length: the body ends when the connection closes
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * 5000)
        else:
            self.reply(404, b"")

    def reply(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_fetch_url_against_a_real_server(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert fetch_url(f"{server}/img.png", 10_000) == PNG
    assert fetch_url(f"{server}/same", 10_000) == PNG
    for path, reason in [
        ("/missing", "HTTP 404"),
        ("/other", "it redirects to another host (localhost)"),
        ("/loop", "more than 3 redirects"),
        ("/img.png", f"{len(PNG)} bytes, more than 10"),
        ("/stream", "more than 1000 bytes"),
    ]:
        with pytest.raises(BadRequest) as info:
            fetch_url(f"{server}{path}", 10 if path == "/img.png" else 1000)
        assert info.value.message == f"could not fetch {server}{path}: {reason}"
    [out] = decode_images([f"{server}/img.png"], ImageLimits(fetch_hosts=("127.0.0.1",)))
    assert out.format == "png"


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError):
        ImageLimits(max_pixels=0)
