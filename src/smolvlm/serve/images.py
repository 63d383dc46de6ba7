"""`image_url` parts -> PIL images, refusing anything that could exhaust the server.

The dangerous inputs are small files that decode to huge images (decompression bombs: a 20000x20000
PNG of one colour is a few kB), so the pixel count is read from the header and checked before any
pixel is decoded. Only common raster formats are opened, which keeps Pillow's rarer parsers out of reach.
"""

from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image, ImageOps, UnidentifiedImageError

from smolvlm.serve.protocol import APIError, Limits

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                      re.ASCII)


def is_remote(url: str) -> bool:
    return url[:8].lower().startswith(("http://", "https://"))


def data_url_bytes(url: str, limits: Limits, param: str) -> bytes:
    """The bytes of a base64 `data:` URL; anything else about the URL is the caller's business."""
    m = DATA_URL.match(url)
    if m is None:
        raise APIError(400, f"{param}: not a data: URL; send images as data:image/png;base64,... "
                            "(or as http(s) URLs if the server allows remote images)", param=param,
                       code="invalid_image_url")
    if not m.group("b64"):
        raise APIError(400, f"{param}: the data: URL is not base64-encoded; use data:<type>;base64,<data>",
                       param=param, code="invalid_image_url")
    payload = url[m.end():]
    # base64 is 4/3 of the bytes; refuse before decoding a payload that cannot fit
    if len(payload) > limits.max_image_bytes * 4 // 3 + 4:
        raise APIError(400, f"{param}: the image is larger than {limits.max_image_bytes} bytes", param=param,
                       code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: the data: URL holds invalid base64", param=param,
                       code="invalid_base64") from None


def open_image_bytes(data: bytes, limits: Limits, param: str) -> Image.Image:
    """Decode one image fully (so a truncated file fails here), upright by its EXIF orientation."""
    if len(data) > limits.max_image_bytes:
        raise APIError(400, f"{param}: the image is larger than {limits.max_image_bytes} bytes", param=param,
                       code="image_too_large")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:  # Pillow's own guard, far above ours
        raise APIError(400, f"{param}: the image has too many pixels; this server accepts at most "
                            f"{limits.max_image_pixels}; downscale it", param=param, code="image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise APIError(400, f"{param}: the bytes are not a {'/'.join(FORMATS)} image", param=param,
                       code="invalid_image") from None
    w, h = img.size
    if w * h > limits.max_image_pixels:
        raise APIError(400, f"{param}: the image is {w}x{h} = {w * h} pixels; this server accepts at most "
                            f"{limits.max_image_pixels}; downscale it", param=param, code="image_too_large")
    if w < 1 or h < 1:
        raise APIError(400, f"{param}: the image is empty ({w}x{h})", param=param, code="invalid_image")
    try:
        img.load()  # for animations, the first frame
        img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise APIError(400, f"{param}: the image is corrupt or truncated ({e})", param=param,
                       code="invalid_image") from None
    return img


async def fetch_remote(url: str, limits: Limits, param: str) -> bytes:
    """Download an http(s) image, stopping as soon as it exceeds the byte limit."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=limits.remote_timeout, follow_redirects=True,
                                     max_redirects=3) as client, client.stream("GET", url) as response:
            if response.status_code != 200:
                raise APIError(400, f"{param}: fetching the image gave HTTP {response.status_code}",
                               param=param, code="image_fetch_failed")
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limits.max_image_bytes:
                    raise APIError(400, f"{param}: the image is larger than {limits.max_image_bytes} bytes",
                                   param=param, code="image_too_large")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as e:
        raise APIError(400, f"{param}: could not fetch the image ({type(e).__name__}: {e})", param=param,
                       code="image_fetch_failed") from None
