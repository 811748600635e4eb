"""sensor_msgs Image / CompressedImage <-> RGB uint8 arrays with numpy and OpenCV (no cv_bridge)."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

RAW_ENCODINGS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}
COMPRESSED_FORMATS = ("jpeg", "png")


class ImageDecodeError(ValueError):
    """An image message cannot be decoded; the caller adds bag and topic."""


def resize_to(image: np.ndarray, size_hw: tuple[int, int] | None) -> np.ndarray:
    """Resize to (height, width) with INTER_AREA; None keeps the image as is."""
    if size_hw is None or (image.shape[0] == size_hw[0] and image.shape[1] == size_hw[1]):
        return image
    return cv2.resize(image, (int(size_hw[1]), int(size_hw[0])), interpolation=cv2.INTER_AREA)


def raw_image_to_rgb(
    data: Any, height: int, width: int, encoding: str, step: int, size_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """Decode a sensor_msgs/Image payload to RGB uint8 (h, w, 3), honouring row padding in `step`.

    Resizing (when `size_hw` is given) happens before the channel shuffle so it runs on fewer bytes.
    """
    channels = RAW_ENCODINGS.get(encoding.lower())
    if channels is None:
        raise ImageDecodeError(f"unknown encoding {encoding!r}, expected one of {sorted(RAW_ENCODINGS)}")
    encoding = encoding.lower()
    if height <= 0 or width <= 0:
        raise ImageDecodeError(f"empty image {width}x{height}, expected positive width and height")
    row_bytes = width * channels
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
    if step < row_bytes or buf.size < step * height:
        raise ImageDecodeError(
            f"{encoding} {width}x{height}: expected step >= {row_bytes} and {step}*{height} data bytes, "
            f"got step {step} and {buf.size} bytes"
        )
    # Rows may be padded to `step` bytes: view (h, step), then cut the padding off.
    image = buf[: step * height].reshape(height, step)[:, :row_bytes].reshape(height, width, channels)
    if channels == 1:
        image = image[:, :, 0]
    if not image.flags.c_contiguous:
        image = np.ascontiguousarray(image)
    image = resize_to(image, size_hw)
    if encoding == "rgb8":
        out = image
    elif encoding == "bgr8":
        out = image[:, :, ::-1]
    elif encoding == "rgba8":
        out = image[:, :, :3]
    elif encoding == "bgra8":
        out = image[:, :, 2::-1]
    else:  # mono8
        out = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(out)


def compressed_image_to_rgb(data: Any, fmt: str, size_hw: tuple[int, int] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode a JPEG/PNG sensor_msgs/CompressedImage payload; returns (RGB image, source (h, w))."""
    fmt_lower = fmt.lower()
    if not any(name in fmt_lower for name in ("jpeg", "jpg", "png")) or "compresseddepth" in fmt_lower:
        raise ImageDecodeError(f"unknown compressed format {fmt!r}, expected jpeg or png")
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if bgr is None:
        raise ImageDecodeError(f"format {fmt!r}: {buf.size} bytes are not a decodable jpeg/png image")
    source_hw = (int(bgr.shape[0]), int(bgr.shape[1]))
    bgr = resize_to(bgr, size_hw)
    return np.ascontiguousarray(bgr[:, :, ::-1]), source_hw


def rgb_to_raw(image: np.ndarray, encoding: str) -> tuple[np.ndarray, int]:
    """Convert an RGB uint8 (h, w, 3) image to a raw encoding; returns (contiguous array, step)."""
    if encoding == "rgb8":
        out = image
    elif encoding == "bgr8":
        out = image[:, :, ::-1]
    elif encoding == "rgba8":
        out = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=2)
    elif encoding == "bgra8":
        out = np.concatenate([image[:, :, ::-1], np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=2)
    elif encoding == "mono8":
        out = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    else:
        raise ValueError(f"image encoding {encoding!r}: expected one of {sorted(RAW_ENCODINGS)}")
    out = np.ascontiguousarray(out)
    return out, int(image.shape[1]) * RAW_ENCODINGS[encoding]


def rgb_to_compressed(image: np.ndarray, fmt: str, jpeg_quality: int = 95) -> np.ndarray:
    """Encode an RGB uint8 image as JPEG or PNG bytes (uint8 array)."""
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    if fmt == "jpeg":
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
    elif fmt == "png":
        ok, buf = cv2.imencode(".png", bgr)
    else:
        raise ValueError(f"compressed format {fmt!r}: expected one of {list(COMPRESSED_FORMATS)}")
    if not ok:
        raise ValueError(f"OpenCV failed to encode a {image.shape} image as {fmt}")
    return buf.reshape(-1)
