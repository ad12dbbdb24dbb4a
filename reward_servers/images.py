"""Safe decoding of images that came from another process.

Only PNG and JPEG are accepted. The width and height are read from the file header (PNG IHDR,
JPEG SOFn) *before* any pixel is decoded, so a decompression bomb (a small file declaring a huge
canvas) is refused without allocating it. Decoding is OpenCV's (libpng / libjpeg-turbo; it
releases the GIL), the result is uint8 [H, W, 3] RGB whatever the source mode (grey, palette,
alpha and 16-bit images are converted).
"""

from __future__ import annotations

import struct

import cv2
import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR)  # OpenCV >= 4.10 decodes straight to RGB
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class ImageError(ValueError):
    """An image that cannot be used; ``kind`` is ``bad_image`` or ``image_too_large``."""

    def __init__(self, message: str, kind: str = "bad_image"):
        super().__init__(message)
        self.kind = kind


def image_header(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from the header of PNG or JPEG bytes, without decoding pixels."""
    if data[:8] == PNG_SIGNATURE:
        if len(data) < 33 or data[12:16] != b"IHDR":
            raise ImageError("truncated PNG (no IHDR chunk)")
        width, height = struct.unpack(">II", data[16:24])
        return "png", width, height
    if data[:2] == b"\xff\xd8":
        return ("jpeg", *_jpeg_size(data))
    if not data:
        raise ImageError("empty image bytes")
    raise ImageError("not a PNG or JPEG image (unrecognised signature)")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ImageError("corrupt JPEG (bad marker)")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in _JPEG_SOF:
            if i + 9 > n:
                break
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        if marker == 0xDA or length < 2:  # start of scan before any frame header
            raise ImageError("corrupt JPEG (no frame header before the scan)")
        i += 2 + length
    raise ImageError("truncated JPEG (no frame header)")


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 [H, W, 3] RGB. Raises :class:`ImageError` for anything else, for a
    truncated or corrupt file, and for images of more than ``max_pixels`` pixels (checked on the
    header, before decoding)."""
    fmt, width, height = image_header(data)
    if width == 0 or height == 0:
        raise ImageError(f"{fmt} header declares an empty image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"{fmt} image of {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}",
            kind="image_too_large",
        )
    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), _IMREAD_RGB)
    if arr is None:
        raise ImageError(f"{fmt} image could not be decoded (truncated or corrupt)")
    if arr.shape[:2] not in ((height, width), (width, height)):  # (w, h) swapped: JPEG EXIF rotation
        raise ImageError(f"{fmt} image decoded to {arr.shape[1]}x{arr.shape[0]}, header says {width}x{height}")
    return arr if _IMREAD_RGB != cv2.IMREAD_COLOR else cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def encode_png(image: np.ndarray, compression: int = 1) -> bytes:
    """uint8 [H, W, 3] RGB -> PNG bytes (what clients send)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3] RGB, got {image.dtype} {image.shape}")
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()
