"""sensor_msgs Image / CompressedImage -> RGB uint8 (h, w, 3) with numpy and OpenCV (no cv_bridge).

Raw images become zero-copy views of the message buffer (rows padded to ``step`` included):
channel reordering and alpha removal are views too, and the policy copies the frame once when
it batches it. Every failure raises ``BadImage`` with a ``kind`` the node counts by
(encoding, size, empty, decode). Messages are duck-typed, so these functions need no ROS.
"""

from __future__ import annotations

import cv2
import numpy as np

RAW_ENCODINGS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}
# A 4K JPEG at maximum quality is ~10 MB; anything far beyond that is not a camera frame.
MAX_COMPRESSED_BYTES = 32 * 1024 * 1024


class BadImage(ValueError):
    """An image message that cannot be used; ``kind`` names the failure class for counters."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def image_msg_to_rgb(msg) -> np.ndarray:
    """sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8) -> RGB view (h, w, 3) uint8."""
    encoding = msg.encoding.lower()
    channels = RAW_ENCODINGS.get(encoding)
    if channels is None:
        raise BadImage("encoding", f"image encoding {msg.encoding!r} is not supported, expected one of "
                                   f"{sorted(RAW_ENCODINGS)}")
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    data = np.frombuffer(msg.data, dtype=np.uint8)  # zero-copy over the message's array('B')
    if height == 0 or width == 0 or data.size == 0:
        raise BadImage("empty", f"{encoding} image is empty ({width}x{height}, {data.size} data bytes)")
    row_bytes = width * channels
    if step < row_bytes or data.size != step * height:
        raise BadImage("size", f"{encoding} {width}x{height}: expected step >= {row_bytes} and step*height "
                               f"data bytes, got step {step} and {data.size} bytes")
    # (h, step) rows, padding cut off: still a view of the message buffer.
    pixels = data.reshape(height, step)[:, :row_bytes].reshape(height, width, channels)
    if encoding == "rgb8":
        return pixels
    if encoding == "bgr8":
        return pixels[:, :, ::-1]
    if encoding == "rgba8":
        return pixels[:, :, :3]
    if encoding == "bgra8":
        return pixels[:, :, 2::-1]
    return np.broadcast_to(pixels, (height, width, 3))  # mono8: one channel read three times


def compressed_msg_to_rgb(msg) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg or png) -> RGB (h, w, 3) uint8."""
    fmt = msg.format.lower()
    if "compresseddepth" in fmt:
        raise BadImage("encoding", f"compressed format {msg.format!r} is a depth image, expected jpeg or png")
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size == 0:
        raise BadImage("empty", f"compressed image ({msg.format!r}) has no data")
    if data.size > MAX_COMPRESSED_BYTES:
        raise BadImage("size", f"compressed image of {data.size} bytes exceeds {MAX_COMPRESSED_BYTES} bytes")
    try:
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    except cv2.error:
        bgr = None
    if bgr is None:
        raise BadImage("decode", f"compressed image ({msg.format!r}, {data.size} bytes) is not a decodable "
                                 f"jpeg or png")
    return bgr[:, :, ::-1]
