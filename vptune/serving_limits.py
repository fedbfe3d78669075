"""The input side of ``vptune serve``: its settings and limits (:class:`ServeConfig`), the error every
guard answers with (:class:`ApiError`) and the guarded image decoding (:func:`decode_upload`: accepted
content types, the pixel limit checked from the header before decoding, corrupt input -> 400).

:mod:`vptune.serve` re-exports all of it."""

# (no "from __future__ import annotations", as in vptune.serve)

import io
from dataclasses import dataclass, field

from vptune.errors import VptuneError

IMAGE_TYPES = {
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/pjpeg": "JPEG",
    "image/png": "PNG",
    "image/webp": "WEBP",
    "image/bmp": "BMP",
    "image/x-ms-bmp": "BMP",
    "image/gif": "GIF",
    "image/tiff": "TIFF",
}
MULTIPART_SLACK = 64 * 1024  # multipart framing and small fields on top of the image bytes


@dataclass
class ServeConfig:
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    request_timeout_s: float = 30.0
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    image_types: dict[str, str] = field(default_factory=lambda: dict(IMAGE_TYPES))
    default_top_k: int = 5
    allow_task_loading: bool = True
    task_root: str | None = None  # POST /v1/tasks may only load folders under it (None: anywhere)

    def validate(self) -> None:
        if self.max_batch_size < 1:
            raise VptuneError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_wait_ms < 0:
            raise VptuneError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_upload_bytes < 1 or self.max_pixels < 1 or self.max_queue < 1:
            raise VptuneError("max_upload_bytes, max_pixels and max_queue must be >= 1")


class ApiError(Exception):
    """An error answered as ``{"error": ...}`` with ``status``."""

    def __init__(self, status: int, message: str, type_: str = "") -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.type = type_ or {
            400: "bad_request",
            403: "forbidden",
            404: "not_found",
            409: "conflict",
            413: "payload_too_large",
            415: "unsupported_media_type",
            422: "unprocessable",
            503: "unavailable",
            504: "timeout",
        }.get(status, "error")


# --- image decoding ---------------------------------------------------------------------------------
def decode_upload(data: bytes, content_type: str | None, cfg: ServeConfig):  # -> PIL.Image.Image (RGB)
    """Bytes of an uploaded image -> RGB PIL image, or :class:`ApiError` 415/413/400."""
    from PIL import Image, UnidentifiedImageError

    from vptune.data.transforms import to_rgb

    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype not in cfg.image_types:
        raise ApiError(
            415,
            f"image content type {ctype or '(none)'!r} is not accepted; send one of "
            f"{', '.join(sorted(cfg.image_types))}",
        )
    if not data:
        raise ApiError(400, "the image part is empty")
    formats = sorted(set(cfg.image_types.values()))
    try:
        with Image.open(io.BytesIO(data), formats=formats) as img:
            w, h = img.size
            if w * h > cfg.max_pixels:
                raise ApiError(413, f"image is {w}x{h} = {w * h} pixels; the limit is {cfg.max_pixels}")
            if w < 1 or h < 1:
                raise ApiError(400, f"image has an empty size {w}x{h}")
            img.load()
            return to_rgb(img)
    except ApiError:
        raise
    except Image.DecompressionBombError as e:
        raise ApiError(413, f"image refused as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise ApiError(400, f"cannot decode the image: not a valid {'/'.join(formats)} file") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, MemoryError) as e:
        raise ApiError(400, f"cannot decode the image (corrupt or truncated): {e}") from None
