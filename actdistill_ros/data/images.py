"""sensor_msgs Image / CompressedImage <-> RGB uint8 arrays with numpy and OpenCV (no cv_bridge).

One decoder for the bag reader and the policy node; torch- and ROS-free (messages are duck-typed).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

RAW_ENCODINGS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}
COMPRESSED_FORMATS = ("jpeg", "png")


# A 4K JPEG at maximum quality is ~10 MB; anything far beyond that is not a camera frame.
MAX_COMPRESSED_BYTES = 32 * 1024 * 1024


class ImageDecodeError(ValueError):
    """An image message that cannot be used. ``kind`` (encoding, size, empty, decode) is what the
    node counts bad messages by; the bag reader adds the bag and topic to the message."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def resize_rgb(frame: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """RGB uint8 (h, w, 3) -> contiguous (size, size, 3) uint8 with cv2 INTER_AREA.

    The one resize of the package: the bag reader (training data), the Policy and the node all
    call it, so a model sees the same pixels in training and at run time. ``size`` may also be
    (height, width). A frame already at that size is returned as is (made contiguous).
    """
    height, width = (int(size), int(size)) if np.ndim(size) == 0 else (int(size[0]), int(size[1]))
    if height <= 0 or width <= 0:
        raise ValueError(f"resize size: expected positive pixels, got {size!r}")
    if not (isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3):
        raise ValueError(f"image: expected an RGB uint8 (h, w, 3) array, got "
                         f"{getattr(frame, 'dtype', type(frame).__name__)} {getattr(frame, 'shape', '')}")
    frame = np.ascontiguousarray(frame)
    if frame.shape[:2] == (height, width):
        return frame
    return cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)


def raw_image_to_rgb(data: Any, height: int, width: int, encoding: str, step: int) -> np.ndarray:
    """sensor_msgs/Image payload (rgb8, bgr8, rgba8, bgra8, mono8) -> RGB (h, w, 3) uint8.

    A zero-copy view of ``data`` (rows padded to ``step`` included): channel reordering, alpha
    removal and mono broadcasting are views too. Copy it if the buffer will not outlive you.
    """
    name = encoding.lower()
    channels = RAW_ENCODINGS.get(name)
    if channels is None:
        raise ImageDecodeError("encoding", f"image encoding {encoding!r} is not supported, expected one of "
                                           f"{sorted(RAW_ENCODINGS)}")
    height, width, step = int(height), int(width), int(step)
    buf = data.reshape(-1) if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    if height <= 0 or width <= 0 or buf.size == 0:
        raise ImageDecodeError("empty", f"{name} image is empty ({width}x{height}, {buf.size} data bytes)")
    row_bytes = width * channels
    if step < row_bytes or buf.size != step * height:
        raise ImageDecodeError("size", f"{name} {width}x{height}: expected step >= {row_bytes} and step*height "
                                       f"data bytes, got step {step} and {buf.size} bytes")
    pixels = buf.reshape(height, step)[:, :row_bytes].reshape(height, width, channels)
    if name == "rgb8":
        return pixels
    if name == "bgr8":
        return pixels[:, :, ::-1]
    if name == "rgba8":
        return pixels[:, :, :3]
    if name == "bgra8":
        return pixels[:, :, 2::-1]
    return np.broadcast_to(pixels, (height, width, 3))  # mono8: one channel read three times


def compressed_image_to_rgb(data: Any, fmt: str) -> np.ndarray:
    """sensor_msgs/CompressedImage payload (jpeg or png) -> RGB (h, w, 3) uint8."""
    name = fmt.lower()
    if "compresseddepth" in name or not any(k in name for k in ("jpeg", "jpg", "png")):
        raise ImageDecodeError("encoding", f"compressed format {fmt!r} is not supported, expected jpeg or png")
    buf = data.reshape(-1) if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    if buf.size == 0:
        raise ImageDecodeError("empty", f"compressed image ({fmt!r}) has no data")
    if buf.size > MAX_COMPRESSED_BYTES:
        raise ImageDecodeError("size", f"compressed image of {buf.size} bytes exceeds {MAX_COMPRESSED_BYTES} bytes")
    try:
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error:
        bgr = None
    if bgr is None:
        raise ImageDecodeError("decode", f"compressed image ({fmt!r}, {buf.size} bytes) is not a decodable "
                                         f"jpeg or png")
    return bgr[:, :, ::-1]


def image_msg_to_rgb(msg) -> np.ndarray:
    """sensor_msgs/Image (rclpy or rosbags message; duck-typed) -> RGB view."""
    return raw_image_to_rgb(msg.data, msg.height, msg.width, msg.encoding, msg.step)


def compressed_msg_to_rgb(msg) -> np.ndarray:
    """sensor_msgs/CompressedImage (rclpy or rosbags message) -> RGB."""
    return compressed_image_to_rgb(msg.data, msg.format)


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
