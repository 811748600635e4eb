"""What the policy node does with each incoming message before the model sees it: image
conversion (raw and compressed), instruction checks (no DDS needed)."""

from __future__ import annotations

import types

import cv2
import numpy as np
import pytest

from actdistill_ros.data.images import ImageDecodeError, compressed_msg_to_rgb, image_msg_to_rgb


# ---------------------------------------------------------------- images
def _image(frame: np.ndarray, encoding: str, step: int | None = None, data: bytes | None = None):
    channels = frame.shape[2] if frame.ndim == 3 else 1
    step = step if step is not None else frame.shape[1] * channels
    if data is None:
        rows = frame.reshape(frame.shape[0], -1)
        data = np.pad(rows, ((0, 0), (0, step - rows.shape[1]))).tobytes()
    import array
    return types.SimpleNamespace(height=frame.shape[0], width=frame.shape[1], encoding=encoding, step=step,
                                 data=array.array("B", data))


@pytest.fixture
def rgb():
    return np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
@pytest.mark.parametrize("padding", [0, 7])
def test_raw_encodings_convert_to_rgb(rgb, encoding, padding):
    source = rgb[:, :, ::-1] if encoding.startswith("bgr") else rgb
    if encoding.endswith("a8"):
        source = np.concatenate([source, np.full(rgb.shape[:2] + (1,), 9, np.uint8)], axis=2)
    msg = _image(np.ascontiguousarray(source), encoding, step=source.shape[1] * source.shape[2] + padding)
    out = image_msg_to_rgb(msg)
    np.testing.assert_array_equal(out, rgb)
    assert np.shares_memory(out, np.frombuffer(msg.data, np.uint8))  # a view: no copy


def test_mono8_becomes_three_equal_channels():
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5)
    out = image_msg_to_rgb(_image(gray, "mono8"))
    assert out.shape == (4, 5, 3) and all((out[:, :, c] == gray).all() for c in range(3))


@pytest.mark.parametrize("change, kind", [
    (dict(encoding="16UC1"), "encoding"), (dict(encoding="yuv422"), "encoding"),
    (dict(step=14), "size"), (dict(data=b"\x00" * 89), "size"), (dict(data=b"\x00" * 91), "size"),
    (dict(data=b""), "empty"), (dict(height=0), "empty"),
])
def test_bad_raw_images_raise_with_a_kind(rgb, change, kind):
    msg = _image(rgb, "rgb8")
    for key, value in change.items():
        if key == "data":
            import array
            value = array.array("B", value)
        setattr(msg, key, value)
    with pytest.raises(ImageDecodeError) as err:
        image_msg_to_rgb(msg)
    assert err.value.kind == kind and str(err.value)


def test_compressed_images_decode_and_refuse_garbage(rgb):
    png = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))[1].tobytes()
    out = compressed_msg_to_rgb(types.SimpleNamespace(format="png", data=png))
    np.testing.assert_array_equal(out, rgb)  # png is lossless
    jpeg = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]))[1].tobytes()
    assert compressed_msg_to_rgb(types.SimpleNamespace(format="rgb8; jpeg compressed bgr8", data=jpeg)).shape == (6, 5, 3)
    for fmt, data, kind in [("jpeg", b"", "empty"), ("jpeg", b"\xff\xd8 not a jpeg", "decode"),
                            ("jpeg", jpeg[: len(jpeg) // 3], "decode"), ("16UC1; compressedDepth", png, "encoding")]:
        with pytest.raises(ImageDecodeError) as err:
            compressed_msg_to_rgb(types.SimpleNamespace(format=fmt, data=data))
        assert err.value.kind == kind


# ---------------------------------------------------------------- commands
def test_command_checks():
    from actdistill_ros.ros.policy.inputs import MAX_COMMAND_BYTES, check_instruction

    assert check_instruction("pick up the red block\n") is None
    assert check_instruction("öffne die Schublade") is None
    assert check_instruction("x" * (MAX_COMMAND_BYTES + 1))[0] == "command_size"
    assert check_instruction("ü" * (MAX_COMMAND_BYTES // 2 + 1))[0] == "command_size"  # bytes, not chars
    kind, reason = check_instruction("open the \ufffd drawer")
    assert kind == "command_text" and "UTF-8" in reason
    assert check_instruction("open\x1b[2J")[0] == "command_text"
