"""Rosbag2 demo reading/writing on real mcap and sqlite3 bags written in tmp_path."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from rosbags.rosbag2 import StoragePlugin, Writer

from actdistill_ros.data import BagDataError, TopicConfig, list_bags, read_episode, read_episodes, write_episode_bag
from actdistill_ros.data.bag_writer import DEFAULT_START_NS, jazzy_typestore
from actdistill_ros.data.images import resize_rgb

STORAGES = ["mcap", "sqlite3"]
CONFIG_YAML = Path(__file__).resolve().parents[1] / "config" / "topics.yaml"
H, W = 24, 32
MS = 1_000_000


def smooth_frames(num: int, height: int = H, width: int = W, seed: int = 0) -> np.ndarray:
    """Gradients with a per-frame shift: distinct frames that JPEG keeps close."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    frames = []
    for t in range(num):
        phase = rng.uniform(0, 6.28, 3)
        rgb = [127 + 100 * np.sin(xx / 6.0 + yy / 9.0 + phase[c] + t * 0.3) for c in range(3)]
        frames.append(np.stack(rgb, axis=2).astype(np.uint8))
    return np.stack(frames)


def demo_arrays(num: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return smooth_frames(num, seed=seed), rng.normal(size=(num, 4)), rng.normal(size=(num, 4))


def write_demo(path: Path, num: int = 12, seed: int = 0, **kwargs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images, states, actions = demo_arrays(num, seed)
    kwargs.setdefault("state_names", ["hand_x", "hand_y", "hand_z", "gripper_opening"])
    kwargs.setdefault("action_names", ["delta_x", "delta_y", "delta_z", "gripper"])
    write_episode_bag(path, images=images, instruction="push the puck", states=states, actions=actions, **kwargs)
    return images, states, actions


# --- low-level bag construction for cases the episode writer refuses to produce ---------------

def stamp_header(stamp_ns: int, frame_id: str = "camera"):
    store = jazzy_typestore()
    time = store.types["builtin_interfaces/msg/Time"](sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9)
    return store.types["std_msgs/msg/Header"](stamp=time, frame_id=frame_id)


def image_msg(stamp_ns: int, image: np.ndarray, encoding: str = "rgb8", step: int | None = None, data=None):
    height, width = image.shape[:2]
    channels = 1 if image.ndim == 2 else image.shape[2]
    return jazzy_typestore().types["sensor_msgs/msg/Image"](
        header=stamp_header(stamp_ns), height=height, width=width, encoding=encoding, is_bigendian=0,
        step=width * channels if step is None else step,
        data=np.ascontiguousarray(image).reshape(-1) if data is None else data)


def compressed_msg(stamp_ns: int, data: np.ndarray, fmt: str = "jpeg"):
    return jazzy_typestore().types["sensor_msgs/msg/CompressedImage"](header=stamp_header(stamp_ns), format=fmt, data=data)


def joint_msg(stamp_ns: int, values, names=None):
    values = np.asarray(values, dtype=np.float64)
    names = names or [f"j{i}" for i in range(values.size)]
    empty = np.zeros(0)
    return jazzy_typestore().types["sensor_msgs/msg/JointState"](
        header=stamp_header(stamp_ns, "base"), name=names, position=values, velocity=empty, effort=empty)


def string_msg(text: str):
    return jazzy_typestore().types["std_msgs/msg/String"](data=text)


def write_raw_bag(path: Path, storage: str, messages: list[tuple[str, str, int, object]], extra_topics=()) -> Path:
    """messages: (topic, msgtype, receive_ns, msg). extra_topics: (topic, msgtype) with no messages."""
    store = jazzy_typestore()
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        conns = {}
        for topic, msgtype in [(m[0], m[1]) for m in messages] + list(extra_topics):
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=store)
        for topic, msgtype, receive_ns, msg in sorted(messages, key=lambda m: m[2]):
            writer.write(conns[topic], receive_ns, store.serialize_cdr(msg, msgtype))
    return path


def standard_messages(num: int = 6, *, image_fn=None, action_fn=None, state_fn=None, period_ms: int = 100):
    """A valid episode as raw messages; *_fn(t, stamp) may return a replacement message."""
    images = smooth_frames(num)
    msgs = [("/instruction", "std_msgs/msg/String", DEFAULT_START_NS, string_msg("open the drawer"))]
    for t in range(num):
        stamp = DEFAULT_START_NS + t * period_ms * MS
        cam = image_fn(t, stamp) if image_fn else image_msg(stamp, images[t])
        msgs.append(("/camera/image_raw", cam.__msgtype__, stamp, cam))
        msgs.append(("/joint_states", "sensor_msgs/msg/JointState", stamp,
                     state_fn(t, stamp) if state_fn else joint_msg(stamp, [t, 0.5, 0.25, 1.0])))
        msgs.append(("/action", "sensor_msgs/msg/JointState", stamp,
                     action_fn(t, stamp) if action_fn else joint_msg(stamp, [0.1 * t, 0, 0, -1])))
    return msgs


# --- config ----------------------------------------------------------------------------------

def test_topic_config_yaml_defaults_overrides_and_errors(tmp_path):
    assert TopicConfig.from_yaml(CONFIG_YAML) == TopicConfig()
    cfg = TopicConfig.from_yaml(CONFIG_YAML, action_topic="/cmd", action_type="TwistStamped", state_topic=None)
    assert cfg.action_topic == "/cmd" and cfg.action_type == "geometry_msgs/msg/TwistStamped"
    assert cfg.state_topic == "/joint_states"  # None overrides (unset CLI flags) leave the file's value
    bad = tmp_path / "topics.yaml"
    bad.write_text("camera_topic: /cam\ncamera_topik: /oops\n")
    with pytest.raises(ValueError, match=r"topics\.yaml.*unknown keys \['camera_topik'\]"):
        TopicConfig.from_yaml(bad)
    bad.write_text("action_type: sensor_msgs/msg/Imu\n")
    with pytest.raises(ValueError, match="action_type"):
        TopicConfig.from_yaml(bad)
    bad.write_text("state_topic: null\nsync_tolerance_ms: 20\n")
    cfg = TopicConfig.from_yaml(bad)
    assert cfg.state_topic is None and cfg.sync_tolerance_ns == 20 * MS
    with pytest.raises(ValueError, match="on_size_mismatch"):
        TopicConfig(on_size_mismatch="crop")


# --- round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("image_format", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "png"])
def test_round_trip_lossless_encodings(tmp_path, storage, image_format):
    bag = tmp_path / f"ep_{storage}_{image_format}"
    images, states, actions = write_demo(bag, storage=storage, image_format=image_format)
    assert not list(tmp_path.glob(".*partial*"))
    meta = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert meta["version"] == 9 and meta["storage_identifier"] == storage

    ep = read_episode(bag, TopicConfig())
    if image_format == "mono8":
        gray = np.stack([cv2.cvtColor(im, cv2.COLOR_RGB2GRAY) for im in images])
        images = np.repeat(gray[..., None], 3, axis=3)
    assert ep.images.dtype == np.uint8 and ep.images.shape == (12, 1, H, W, 3)  # (T, cameras, h, w, 3)
    np.testing.assert_array_equal(ep.images[:, 0], images)
    np.testing.assert_array_equal(ep.actions, actions.astype(np.float32))
    np.testing.assert_array_equal(ep.states, states.astype(np.float32))
    assert ep.actions.dtype == np.float32 and ep.states.dtype == np.float32 and ep.stamps_ns.dtype == np.int64
    np.testing.assert_array_equal(ep.stamps_ns, DEFAULT_START_NS + np.arange(12) * 100 * MS)
    assert ep.instructions == ["push the puck"] * 12
    assert ep.action_names == ["delta_x", "delta_y", "delta_z", "gripper"]
    assert ep.state_names == ["hand_x", "hand_y", "hand_z", "gripper_opening"]
    assert ep.key == bag.name and ep.num_dropped == 0 and ep.source_image_size == (H, W)


@pytest.mark.parametrize("storage", STORAGES)
def test_round_trip_jpeg_is_close_and_resize_matches_inter_area(tmp_path, storage):
    topics = TopicConfig(camera_topic="/camera/image_raw/compressed")
    images, _, actions = write_demo(tmp_path / "ep", storage=storage, image_format="jpeg", topics=topics)
    ep = read_episode(tmp_path / "ep", topics)
    assert ep.images.shape == (12, 1, H, W, 3)
    assert np.abs(ep.images[:, 0].astype(int) - images).mean() < 6.0
    np.testing.assert_array_equal(ep.actions, actions.astype(np.float32))

    small = read_episode(tmp_path / "ep", topics, image_size=16)
    assert small.images.shape == (12, 1, 16, 16, 3) and small.source_image_size == (H, W)
    expected = cv2.resize(ep.images[3, 0], (16, 16), interpolation=cv2.INTER_AREA)
    assert np.abs(small.images[3, 0].astype(int) - expected).max() <= 1


def test_raw_resize_and_geometry_action_types(tmp_path):
    images, _, actions = write_demo(tmp_path / "raw", num=5)
    ep = read_episode(tmp_path / "raw", image_size=16)
    np.testing.assert_array_equal(ep.images[2, 0], cv2.resize(images[2], (16, 16), interpolation=cv2.INTER_AREA))

    rng = np.random.default_rng(1)
    for action_type, dim, names in [("geometry_msgs/msg/TwistStamped", 6, "linear_x"),
                                    ("geometry_msgs/msg/PoseStamped", 7, "orientation_w")]:
        topics = TopicConfig(action_type=action_type, state_topic=None)
        acts = rng.normal(size=(5, dim))
        bag = tmp_path / action_type.rsplit("/", 1)[-1]
        write_episode_bag(bag, images=smooth_frames(5), instruction="go", states=None, actions=acts,
                          topics=topics, storage="sqlite3")
        ep = read_episode(bag, topics)
        np.testing.assert_array_equal(ep.actions, acts.astype(np.float32))
        assert ep.states is None and ep.state_dim == 0 and names in ep.action_names and len(ep.action_names) == dim


@pytest.mark.parametrize("storage", STORAGES)
def test_alignment_with_jitter_tolerance_drops_and_instruction_changes(tmp_path, storage):
    images = smooth_frames(10)
    cam = DEFAULT_START_NS + np.arange(10) * 100 * MS
    jitter = np.array([0, 20, -30, 45, -45, 10, 0, -20, 30, 0]) * MS
    msgs = [("/instruction", "std_msgs/msg/String", int(cam[2] - 1 * MS), string_msg("first")),
            ("/instruction", "std_msgs/msg/String", int(cam[6]), string_msg("second"))]
    for t in range(10):
        # Frame 0's header stamp is zero: its bag receive time is the clock.
        msgs.append(("/camera/image_raw", "sensor_msgs/msg/Image", int(cam[t]), image_msg(0 if t == 0 else int(cam[t]), images[t])))
        if t != 4:  # frame 4: nearest action is 55+ ms away -> dropped
            msgs.append(("/action", "sensor_msgs/msg/JointState", int(cam[t] + 7 * MS), joint_msg(int(cam[t] + jitter[t]), [t, -t])))
        if t != 8:  # frame 8: no state within 50 ms -> dropped
            msgs.append(("/joint_states", "sensor_msgs/msg/JointState", int(cam[t]), joint_msg(int(cam[t] - jitter[t] // 2), [10 * t])))
    bag = write_raw_bag(tmp_path / "jittered", storage, msgs)

    ep = read_episode(bag)
    kept = [0, 1, 2, 3, 5, 6, 7, 9]
    np.testing.assert_array_equal(ep.stamps_ns, cam[kept])
    np.testing.assert_array_equal(ep.actions, np.array([[t, -t] for t in kept], np.float32))
    np.testing.assert_array_equal(ep.states[:, 0], np.array([10 * t for t in kept], np.float32))
    np.testing.assert_array_equal(ep.images[:, 0], images[kept])
    assert ep.dropped_frames == {"duplicate_stamp": 0, "no_camera_within_tolerance": 0, "no_action_within_tolerance": 1,
                                 "no_state_within_tolerance": 1}
    # Frames before the first command take the first; later frames the newest at or before them.
    assert ep.instructions == ["first", "first", "first", "first", "first", "second", "second", "second"]

    strict = read_episode(bag, TopicConfig(sync_tolerance_ms=25))
    assert strict.stamps_ns.tolist() == cam[[0, 1, 5, 6, 7, 9]].tolist()  # |jitter| <= 20 ms (state: half of it)
    assert strict.dropped_frames["no_action_within_tolerance"] == 4


def test_image_step_with_row_padding_decodes(tmp_path):
    images = smooth_frames(3)
    pad = 8

    def padded(t, stamp):
        rows = np.zeros((H, W * 3 + pad), np.uint8)
        rows[:, : W * 3] = images[t].reshape(H, W * 3)
        rows[:, W * 3:] = 255  # padding bytes must not leak into the picture
        return image_msg(stamp, images[t], "rgb8", step=W * 3 + pad, data=rows.reshape(-1))

    bag = write_raw_bag(tmp_path / "padded", "mcap", standard_messages(3, image_fn=padded))
    np.testing.assert_array_equal(read_episode(bag).images[:, 0], images)


def test_stable_keys_across_reads_and_locations(tmp_path):
    write_demo(tmp_path / "a" / "episode_007", num=4, storage="sqlite3")
    first = read_episode(tmp_path / "a" / "episode_007").sample_keys()
    shutil.copytree(tmp_path / "a" / "episode_007", tmp_path / "b" / "episode_007")
    assert read_episode(tmp_path / "b" / "episode_007").sample_keys() == first
    assert first[1] == f"episode_007//camera/image_raw@{DEFAULT_START_NS + 100 * MS}"


def test_list_bags_and_read_episodes_over_directory(tmp_path):
    root = tmp_path / "demos"
    for i, storage in enumerate(["mcap", "sqlite3", "mcap"]):
        write_demo(root / f"ep_{2 - i}", num=3 + i, seed=i, storage=storage)
    (root / ".ep_9.partial").mkdir()  # an unfinished write is never a bag
    (root / "notes").mkdir()
    bags = list_bags(root)
    assert [b.name for b in bags] == ["ep_0", "ep_1", "ep_2"]
    assert list_bags([root / "ep_1", root / "ep_0"]) == [root / "ep_1", root / "ep_0"]
    episodes = read_episodes(root, image_size=8, progress=False)
    assert [len(e) for e in episodes] == [5, 4, 3] and episodes[0].images.shape[1:] == (1, 8, 8, 3)
    with pytest.raises(BagDataError, match="no rosbag2 directories"):
        list_bags(root / "notes")
    write_demo(tmp_path / "other" / "ep_0", num=3)
    with pytest.raises(BagDataError, match=r"ep_0.*unique bag names"):
        read_episodes([root, tmp_path / "other"], progress=False)


def test_writer_is_atomic_and_refuses_overwrite(tmp_path):
    bag = tmp_path / "ep"
    write_demo(bag, num=4, command_repeat_hz=20.0)
    meta = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    counts = {t["topic_metadata"]["name"]: t["message_count"] for t in meta["topics_with_message_count"]}
    assert counts == {"/instruction": 7, "/camera/image_raw": 4, "/joint_states": 4, "/action": 4}
    with pytest.raises(FileExistsError):
        write_demo(bag, num=4)

    class FailingFrames(list):
        """Frames whose 3rd read during writing fails, like a camera buffer going away."""

        def __getitem__(self, index):
            if index == 2:
                raise OSError("frame source lost")
            return list.__getitem__(self, index)

    images, states, actions = demo_arrays(4, seed=5)
    for target, overwrite in [(tmp_path / "new", False), (bag, True)]:
        with pytest.raises(OSError, match="frame source lost"):
            write_episode_bag(target, images=FailingFrames(images), instruction="x", states=states,
                              actions=actions, overwrite=overwrite)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ep"]  # no partial bag anywhere
    assert len(read_episode(bag)) == 4  # the old bag survived the failed overwrite
    write_episode_bag(bag, images=images[:2], instruction="x", states=states[:2], actions=actions[:2], overwrite=True)
    assert len(read_episode(bag)) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["ep"]
    with pytest.raises(ValueError, match="finite"):
        write_episode_bag(tmp_path / "nan", images=images, instruction="x", states=states,
                          actions=np.full((4, 4), np.nan))
    assert not (tmp_path / "nan").exists()


# --- bad data: one-line BagDataError naming bag and topic ----------------------------------------

def _nan_action(t, stamp):
    return joint_msg(stamp, [0.0, np.nan if t == 3 else 0.0])


def _inf_state(t, stamp):
    return joint_msg(stamp, [np.inf if t == 2 else 0.0])


def _mixed_sizes(t, stamp):
    return image_msg(stamp, smooth_frames(1, H, W + (8 if t == 4 else 0))[0])


def _unknown_encoding(t, stamp):
    return image_msg(stamp, np.zeros((H, W, 2), np.uint8), "16UC1")


def _short_data(t, stamp):
    return image_msg(stamp, smooth_frames(1)[0], "rgb8", data=np.zeros(H * W * 3 - 5, np.uint8))


def _small_step(t, stamp):
    return image_msg(stamp, smooth_frames(1)[0], "rgb8", step=W * 3 - 3)


def _bad_jpeg(t, stamp):
    return compressed_msg(stamp, np.frombuffer(b"\xff\xd8\xff not really a jpeg", np.uint8))


def _tiff(t, stamp):
    return compressed_msg(stamp, np.zeros(10, np.uint8), "tiff")


BAD_MESSAGE_CASES = {
    "nan_action": (dict(action_fn=_nan_action), "/action", "NaN/inf"),
    "inf_state": (dict(state_fn=_inf_state), "/joint_states", "NaN/inf"),
    "unknown_encoding": (dict(image_fn=_unknown_encoding), "/camera/image_raw", "encoding '16UC1' is not supported"),
    "short_data": (dict(image_fn=_short_data), "/camera/image_raw", "expected step >= 96"),
    "small_step": (dict(image_fn=_small_step), "/camera/image_raw", "expected step >= 96"),
    "bad_jpeg": (dict(image_fn=_bad_jpeg), "/camera/image_raw", "not a decodable jpeg or png"),
    "unknown_compressed_format": (dict(image_fn=_tiff), "/camera/image_raw", "expected jpeg or png"),
    "mixed_sizes": (dict(image_fn=_mixed_sizes), "/camera/image_raw", "expected 32x24 like the first frame"),
}


def assert_one_line_error(excinfo, bag: Path, topic: str | None, needle: str) -> None:
    text = str(excinfo.value)
    assert "\n" not in text and bag.name in text and needle in text, text
    if topic is not None:
        assert repr(topic) in text, text


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("case", sorted(BAD_MESSAGE_CASES))
def test_bad_messages_raise_bag_data_error(tmp_path, storage, case):
    kwargs, topic, needle = BAD_MESSAGE_CASES[case]
    bag = write_raw_bag(tmp_path / f"bad_{case}", storage, standard_messages(6, **kwargs))
    with pytest.raises(BagDataError) as excinfo:
        read_episode(bag, TopicConfig(on_size_mismatch="error"))
    assert_one_line_error(excinfo, bag, topic, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == [bag.name]  # the reader wrote nothing


def test_mixed_sizes_are_resized_by_default(tmp_path):
    bag = write_raw_bag(tmp_path / "mixed", "mcap", standard_messages(6, image_fn=_mixed_sizes))
    ep = read_episode(bag)
    assert ep.images.shape == (6, 1, H, W, 3) and len(ep) == 6
    bigger = tmp_path / "bigger"
    write_demo(bigger / "ep_b", num=3, seed=2)
    write_episode_bag(bigger / "ep_c", images=smooth_frames(3, 16, 16), instruction="x",
                      states=np.zeros((3, 4)), actions=np.zeros((3, 4)), action_names=["delta_x", "delta_y", "delta_z", "gripper"])
    assert read_episodes(bigger, progress=False)[1].images.shape == (3, 1, H, W, 3)
    with pytest.raises(BagDataError) as excinfo:
        read_episodes(bigger, TopicConfig(on_size_mismatch="error"), progress=False)
    assert_one_line_error(excinfo, bigger / "ep_c", "/camera/image_raw", "expected 32x24 like bag 'ep_b'")


@pytest.mark.parametrize("storage", STORAGES)
def test_missing_wrong_and_empty_topics(tmp_path, storage):
    msgs = [m for m in standard_messages(4) if m[0] != "/action"]
    bag = write_raw_bag(tmp_path / "no_action", storage, msgs)
    with pytest.raises(BagDataError) as excinfo:
        read_episode(bag)
    assert_one_line_error(excinfo, bag, "/action", "topics present: /camera/image_raw (sensor_msgs/msg/Image), /instruction")

    bag = write_raw_bag(tmp_path / "twist_expected", storage, standard_messages(4))
    with pytest.raises(BagDataError) as excinfo:
        read_episode(bag, TopicConfig(action_type="TwistStamped"))
    assert_one_line_error(excinfo, bag, "/action", "expected geometry_msgs/msg/TwistStamped")

    bag = write_raw_bag(tmp_path / "empty", storage, [], extra_topics=[
        ("/camera/image_raw", "sensor_msgs/msg/Image"), ("/instruction", "std_msgs/msg/String"),
        ("/joint_states", "sensor_msgs/msg/JointState"), ("/action", "sensor_msgs/msg/JointState")])
    with pytest.raises(BagDataError) as excinfo:
        read_episode(bag)
    assert_one_line_error(excinfo, bag, "/camera/image_raw", "no messages")

    bag = write_raw_bag(tmp_path / "nothing", storage, [])
    with pytest.raises(BagDataError) as excinfo:
        read_episode(bag)
    assert_one_line_error(excinfo, bag, "/camera/image_raw", "topics present: none")

    far = [m if m[0] != "/action" else (m[0], m[1], m[2], joint_msg(m[2] + 500 * MS, [0.0])) for m in standard_messages(4)]
    bag = write_raw_bag(tmp_path / "no_overlap", storage, far)
    with pytest.raises(BagDataError) as excinfo:
        read_episode(bag)
    assert_one_line_error(excinfo, bag, "/action", "within 50 ms")


@pytest.mark.parametrize("storage", STORAGES)
def test_damaged_bags_raise_bag_data_error(tmp_path, storage):
    bag = tmp_path / "damaged"
    write_demo(bag, num=6, storage=storage)
    storage_file = next(p for p in bag.iterdir() if p.suffix in (".mcap", ".db3"))
    intact = storage_file.read_bytes()
    damages = {"cut_in_half": intact[: len(intact) // 2], "garbage": b"\x13\x37" * (len(intact) // 2), "empty": b""}
    for name, content in damages.items():
        storage_file.write_bytes(content)
        with pytest.raises(BagDataError) as excinfo:
            read_episode(bag)
        assert_one_line_error(excinfo, bag, None, "expected an intact rosbag2")
    storage_file.write_bytes(intact)
    assert len(read_episode(bag)) == 6

    meta = bag / "metadata.yaml"
    text = meta.read_text()
    meta.write_text(text.replace("message_count: 6", "message_count: 9"))  # metadata promises more than storage holds
    with pytest.raises(BagDataError) as excinfo:
        read_episode(bag)
    assert_one_line_error(excinfo, bag, "/camera/image_raw", "truncated")
    meta.unlink()
    with pytest.raises(BagDataError) as excinfo:
        read_episode(bag)
    assert_one_line_error(excinfo, bag, None, "metadata.yaml is missing")
    with pytest.raises(BagDataError) as excinfo:  # a storage file without metadata still counts as a (broken) bag
        read_episodes(tmp_path, progress=False)
    assert_one_line_error(excinfo, bag, None, "metadata.yaml is missing")
    with pytest.raises(BagDataError, match="does not exist"):
        read_episode(tmp_path / "nope")


# --- several cameras ---------------------------------------------------------------------------

CAMERAS = ["/cam/scene", "/cam/wrist"]


def test_topic_config_cameras_list_and_the_single_camera_key(tmp_path):
    config = tmp_path / "topics.yaml"
    config.write_text("cameras: [/cam/scene, /cam/wrist]\nstate_topic: null\n")
    cfg = TopicConfig.from_yaml(config)
    assert cfg.cameras == CAMERAS and cfg.camera_topic == "/cam/scene" and cfg.num_cameras == 2
    assert TopicConfig.from_yaml(config, cameras=["/cam/top"]).cameras == ["/cam/top"]  # CLI flags replace the list
    assert TopicConfig.from_dict(cfg.to_dict()) == cfg
    config.write_text("camera_topic: /cam/front\n")  # the older single-camera key is one camera
    assert TopicConfig.from_yaml(config).cameras == ["/cam/front"]
    assert TopicConfig.from_yaml(config, cameras=CAMERAS).cameras == CAMERAS
    assert TopicConfig(camera_topic="/x").cameras == ["/x"] and TopicConfig().cameras == ["/camera/image_raw"]
    for bad, needle in [("cameras: /cam/scene\n", "expected a non-empty list"), ("cameras: []\n", "non-empty list"),
                        ("cameras: [/a, b]\n", r"cameras\[1\]"), ("cameras: [/a, /a]\n", "distinct"),
                        ("camera_topic: /a\ncameras: [/b]\n", "disagree")]:
        config.write_text(bad)
        with pytest.raises(ValueError, match=needle) as excinfo:
            TopicConfig.from_yaml(config)
        assert "topics.yaml" in str(excinfo.value) and "\n" not in str(excinfo.value)


def write_two_camera_demo(path: Path, storage: str, num: int = 6, offsets_ms=(0, 0), **kwargs):
    """Camera 0 at H x W, camera 1 at 40 x 40 (another sensor), both raw rgb8."""
    scene = smooth_frames(num, seed=1)
    wrist = smooth_frames(num, 40, 40, seed=2)
    rng = np.random.default_rng(0)
    write_episode_bag(path, images=[scene, wrist], instruction="stack the cups", states=rng.normal(size=(num, 4)),
                      actions=rng.normal(size=(num, 4)), topics=TopicConfig(cameras=CAMERAS), storage=storage,
                      camera_offsets_ns=[int(o * MS) for o in offsets_ms], **kwargs)
    return scene, wrist


@pytest.mark.parametrize("storage", STORAGES)
def test_two_cameras_round_trip_aligned_to_the_first_camera(tmp_path, storage):
    bag = tmp_path / "two"
    scene, wrist = write_two_camera_demo(bag, storage, offsets_ms=(0, 30))  # the wrist camera stamps 30 ms late
    meta = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert {t["topic_metadata"]["name"] for t in meta["topics_with_message_count"]} >= set(CAMERAS)

    topics = TopicConfig(cameras=CAMERAS)
    ep = read_episode(bag, topics)
    assert ep.camera_topics == CAMERAS and ep.images.shape == (6, 2, H, W, 3)  # the first camera's size
    assert ep.source_image_sizes == [(H, W), (40, 40)] and ep.num_dropped == 0
    np.testing.assert_array_equal(ep.stamps_ns, DEFAULT_START_NS + np.arange(6) * 100 * MS)  # camera 0's stamps
    np.testing.assert_array_equal(ep.images[:, 0], scene)
    np.testing.assert_array_equal(ep.images[:, 1], [resize_rgb(f, (H, W)) for f in wrist])
    assert ep.sample_key(1) == f"two//cam/scene@{DEFAULT_START_NS + 100 * MS}"

    small = read_episode(bag, topics, image_size=16)  # the training path: one resize per frame, to the model size
    assert small.images.shape == (6, 2, 16, 16, 3)
    np.testing.assert_array_equal(small.images[:, 1], [resize_rgb(f, 16) for f in wrist])
    # The order of `cameras` is the order of the images.
    swapped = read_episode(bag, TopicConfig(cameras=CAMERAS[::-1]), image_size=16)
    np.testing.assert_array_equal(swapped.images[:, 0], small.images[:, 1])


@pytest.mark.parametrize("storage", STORAGES)
def test_missing_or_unaligned_camera_is_one_line_naming_bag_and_topic(tmp_path, storage):
    one = tmp_path / "one_camera"
    write_demo(one, num=4, storage=storage, topics=TopicConfig(camera_topic=CAMERAS[0]))
    with pytest.raises(BagDataError) as excinfo:
        read_episode(one, TopicConfig(cameras=CAMERAS))
    assert_one_line_error(excinfo, one, "/cam/wrist", "not in bag, expected sensor_msgs/msg/Image or")

    late = tmp_path / "late_wrist"
    write_two_camera_demo(late, storage, offsets_ms=(0, 80), fps=5.0)  # 200 ms apart: wrist 80 ms from any scene frame
    with pytest.raises(BagDataError) as excinfo:
        read_episode(late, TopicConfig(cameras=CAMERAS))
    assert_one_line_error(excinfo, late, "/cam/wrist", "within 50 ms")
    assert len(read_episode(late, TopicConfig(cameras=CAMERAS, sync_tolerance_ms=90))) == 6


def test_a_frame_without_the_other_camera_is_dropped_and_counted(tmp_path):
    wrist = smooth_frames(6, 40, 40, seed=2)
    msgs = standard_messages(6)
    msgs += [("/cam/wrist", "sensor_msgs/msg/Image", DEFAULT_START_NS + t * 100 * MS,
              image_msg(DEFAULT_START_NS + t * 100 * MS + 5 * MS, wrist[t])) for t in range(6) if t != 3]
    bag = write_raw_bag(tmp_path / "gap", "mcap", msgs)
    ep = read_episode(bag, TopicConfig(cameras=["/camera/image_raw", "/cam/wrist"]), image_size=16)
    kept = [0, 1, 2, 4, 5]
    np.testing.assert_array_equal(ep.stamps_ns, DEFAULT_START_NS + np.array(kept) * 100 * MS)
    np.testing.assert_array_equal(ep.images[:, 1], [resize_rgb(wrist[t], 16) for t in kept])
    assert ep.dropped_frames["no_camera_within_tolerance"] == 1 and ep.num_dropped == 1


def test_writer_refuses_a_camera_count_or_length_mismatch(tmp_path):
    images = smooth_frames(3)
    topics = TopicConfig(cameras=CAMERAS)
    for frames, needle in [([images], "one frame sequence per camera"), ([images, images[:2]], "expected 3 frames")]:
        with pytest.raises(ValueError, match=needle):
            write_episode_bag(tmp_path / "bad", images=frames, instruction="x", states=np.zeros((3, 4)),
                              actions=np.zeros((3, 4)), topics=topics)
    assert not (tmp_path / "bad").exists()
