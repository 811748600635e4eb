"""What the policy node checks in each incoming message before the model sees it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from actdistill_ros.data.images import compressed_msg_to_rgb, image_msg_to_rgb

MAX_COMMAND_BYTES = 1 << 20  # 1 MiB: an instruction is a sentence, not a document
# C0/C1 control characters other than tab and newlines; U+FFFD marks bytes that were not UTF-8.
_BAD_COMMAND_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd]")


def check_instruction(text: str) -> tuple[str, str] | None:
    """(kind, reason) when a command text is unusable, else None."""
    if len(text) > MAX_COMMAND_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_COMMAND_BYTES:
        return "command_size", f"command of {len(text.encode('utf-8', 'surrogatepass'))} bytes exceeds " \
                               f"{MAX_COMMAND_BYTES} bytes"
    match = _BAD_COMMAND_CHARS.search(text)
    if match:
        what = "invalid UTF-8" if match.group() == "\ufffd" else f"control character U+{ord(match.group()):04X}"
        return "command_text", f"command contains {what} at character {match.start()}, expected plain UTF-8 text"
    return None


def stamp_seconds(header) -> float:
    """A std_msgs/Header's stamp in seconds (0.0: unstamped)."""
    return header.stamp.sec + header.stamp.nanosec * 1e-9


def decode_frame(msg, transport: str) -> np.ndarray:
    """HxWx3 uint8 RGB from an Image (raw) or CompressedImage (compressed); ImageDecodeError when bad."""
    return image_msg_to_rgb(msg) if transport == "raw" else compressed_msg_to_rgb(msg)


@dataclass
class Frame:
    rgb: np.ndarray
    header: Any  # std_msgs/Header of the camera message
    stamp_s: float  # its effective stamp (controller clock; the receipt time when unstamped)
    received_s: float  # controller clock, in the callback
    received_ns: int  # system clock, when the middleware received it
    callback_ns: int  # system clock in the callback: received_ns -> callback_ns is executor delay
    seq: int
