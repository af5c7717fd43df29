"""Images in OpenAI chat requests for minimind.serve.api: `image_url` content parts (data: URLs with base64;
http(s) URLs only when the server allows them) become our `<image>` placeholders in order, and their images
the vision model's pixel values. `messages, pixels = request_images(model, messages, ImageLimits())`."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from minimind import MiniMindError
from minimind.chat import IMAGE
from minimind.data.vision import MAX_IMAGE_PIXELS, data_url_bytes, load_image, preprocess
from minimind.serve.schemas import APIError

DEFAULT_MAX_IMAGE_BYTES = 8 << 20  # an encoded image; a photo from a phone is 2-5 MB


@dataclass(frozen=True)
class ImageLimits:
    """allow_remote: fetch http(s) image URLs (off by default: the server would fetch whatever a client names,
    e.g. addresses only it can reach). max_bytes: an encoded image's size (a data URL's decoded bytes or a
    download); max_pixels: its width x height, read from the header before the pixels are decoded."""

    allow_remote: bool = False
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = MAX_IMAGE_PIXELS
    timeout: float = 10.0  # seconds for a whole download


def _refuse(where: str, message: str, code: str = "invalid_image") -> APIError:
    return APIError(400, f"{where}: {message}", param=where, code=code)


def split_images(messages: list[Any], vision: bool) -> tuple[list[Any], list[tuple[str, str]]]:
    """The messages with each `image_url` part turned into an `<image>` text part where it stands (on its own
    line: MiniMind-V's data writes `<image>\\nquestion`), and (param, url) of each image in order. A text-only
    model given an image, an image outside a user message, or (for a vision model) `<image>` typed into a user
    message's text is a 400."""
    out, found = [], []
    for i, m in enumerate(messages):
        content, role = (m.get("content"), m.get("role")) if isinstance(m, dict) else (None, None)
        parts = content if isinstance(content, list) else [content]
        for j, part in enumerate(parts):
            text = part if isinstance(part, str) else part.get("text") if isinstance(part, dict) else None
            if vision and role == "user" and isinstance(text, str) and IMAGE in text:
                where = f"messages.{i}.content" + (f".{j}" if isinstance(content, list) else "")
                raise _refuse(where, f"{IMAGE} in the text: this vision model reserves it for images; send "
                              "images as image_url content parts", code="invalid_value")
        if not isinstance(content, list) or not any(_is_image(p) for p in content):
            out.append(m)
            continue
        new_parts = []
        for j, part in enumerate(content):
            if not _is_image(part):
                new_parts.append(part)
                continue
            where = f"messages.{i}.content.{j}"
            if not vision:
                raise _refuse(where, "this model has no vision tower, so it cannot read images",
                              code="unsupported_by_model")
            if role != "user":
                raise _refuse(where, f"images are read in user messages only, not in a {role!r} one")
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise _refuse(where, 'expected {"type": "image_url", "image_url": {"url": "data:image/...;base64,'
                              '..."}}')
            found.append((where, url))
            before = "\n" if j > 0 and not _is_image(content[j - 1]) else ""
            new_parts.append({"type": "text", "text": before + IMAGE + ("\n" if j < len(content) - 1 else "")})
        out.append({**m, "content": new_parts})
    return out, found


def _is_image(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "image_url"


def load_request_image(where: str, url: str, limits: ImageLimits) -> Image.Image:
    """One image of a request, by its URL: a data: URL, or an http(s) one when the limits allow it. Every
    failure is a 400 naming `where` (the message and part)."""
    if url.startswith("data:"):
        payload = len(url) - url.find(",") - 1
        if payload * 3 // 4 > limits.max_bytes + 2:  # base64's size, known before decoding
            raise _too_big(where, payload * 3 // 4, limits)
        try:
            data = data_url_bytes(url, "the data URL")
        except MiniMindError as e:
            raise _refuse(where, str(e)) from None
    elif re.match(r"(?i)https?://", url):
        if not limits.allow_remote:
            raise _refuse(where, "remote image URLs are refused by this server; send the image as a data: URL "
                          "with base64 (or start the server with --allow-remote-images)", code="remote_image_refused")
        data = _download(where, url, limits)
    else:
        raise _refuse(where, f"unsupported image URL {url[:40]!r} (a data: URL with base64 or an http(s) URL)")
    if len(data) > limits.max_bytes:
        raise _too_big(where, len(data), limits)
    try:
        return load_image(data, max_pixels=limits.max_pixels)
    except MiniMindError as e:
        raise _refuse(where, str(e).replace("image bytes: ", "")) from None


def _too_big(where: str, size: int, limits: ImageLimits) -> APIError:
    return _refuse(where, f"the image has {size:,} bytes, over this server's limit of {limits.max_bytes:,} "
                   "(--max-image-bytes)", code="image_too_large")


# Only http(s), redirects included: no file:, ftp: or data: redirect targets, no proxies from the environment.
_OPENER = urllib.request.OpenerDirector()
for _handler in (urllib.request.HTTPHandler, urllib.request.HTTPSHandler, urllib.request.HTTPRedirectHandler,
                 urllib.request.HTTPErrorProcessor, urllib.request.HTTPDefaultErrorHandler):
    _OPENER.add_handler(_handler())


def _download(where: str, url: str, limits: ImageLimits) -> bytes:
    """At most max_bytes + 1 bytes of `url`, within `timeout` seconds in all."""
    deadline = time.monotonic() + limits.timeout
    chunks, size = [], 0
    try:
        with _OPENER.open(urllib.request.Request(url, headers={"User-Agent": "minimind"}),
                          timeout=limits.timeout) as r:
            while size <= limits.max_bytes:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not done in {limits.timeout:g} s")
                chunk = r.read(min(1 << 16, limits.max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except (OSError, ValueError, urllib.error.URLError) as e:  # HTTPError, timeouts, refused, bad URLs
        raise _refuse(where, f"could not fetch the image ({e})", code="image_fetch_failed") from None
    return b"".join(chunks)


def request_images(model, messages: list[Any], limits: ImageLimits) -> tuple[list[Any], torch.Tensor | None]:
    """A chat request's messages with `<image>` placeholders, and its images as the model's pixel values
    [N, 3, S, S] in order (None without images). Run off the event loop: it decodes and may download."""
    from minimind.vision.model import VisionLanguageModel

    vision = isinstance(model, VisionLanguageModel)
    messages, found = split_images(messages, vision)
    if not found:
        return messages, None
    images = [load_request_image(where, url, limits) for where, url in found]
    v = model.vision
    return messages, preprocess(images, size=v.image_size, mean=v.image_mean, std=v.image_std)
