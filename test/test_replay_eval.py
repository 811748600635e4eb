"""Rosbag replay evaluation end to end: real bags (mcap and sqlite3), real policy_node subprocesses,
real Fast DDS over loopback, tiny untrained policies with one and with two cameras.

The metric is checked against values computed here: a bag whose recorded actions are the
teacher's own outputs must give (near) zero teacher error, and a bag with shuffled actions
must give exactly the error between the shuffled and the true actions. With two cameras, a zero
error also proves that every chunk came from the right frame of each camera: a stale or swapped
camera frame gives an error far above it.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from ros_harness import (REPO_ROOT, RosSide, load_router_stats_type, node_environment, require_rclpy, reserve_domain,
                         start_policy_node, wait_until)

require_rclpy()  # skips on a machine without ROS 2; fails instead with ACTDISTILL_REQUIRE_ROS=1

from actdistill_ros.data import TopicConfig, write_episode_bag  # noqa: E402
from actdistill_ros.policy import Policy, create_untrained_policy  # noqa: E402
from actdistill_ros.replay_report import PLOTS, REPORT_JSON, REPORT_MD  # noqa: E402
from actdistill_ros.ros.launch_arguments import camera_topic_flags, camera_topics  # noqa: E402
from actdistill_ros.ros.replay import cli as replay_cli  # noqa: E402
from actdistill_ros.ros.replay.bag_inspection import header_stamp_ns  # noqa: E402

FRAMES = 12
INSTRUCTION = "push the puck to the goal"
NO_STATE = TopicConfig(state_topic=None)
LAUNCH_FILE = REPO_ROOT / "launch" / "replay_eval.launch.py"
SCENE, WRIST = "/cam/scene", "/cam/wrist"  # the two-camera policies' camera_names, in their order
TWO_CAMERAS = TopicConfig(cameras=[SCENE, WRIST], state_topic=None)


@pytest.fixture(scope="module")
def policies(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("policies")
    return {
        "student": create_untrained_policy(root / "student", size="tiny", student=True, keep=0.5, state_dim=0),
        "teacher": create_untrained_policy(root / "teacher", size="tiny", student=False, state_dim=0, seed=1),
        "student_with_state": create_untrained_policy(root / "student_state", size="tiny", student=True, state_dim=4),
    }


@pytest.fixture(scope="module")
def teacher(policies) -> Policy:
    return Policy.load(policies["teacher"], device="cpu")


@pytest.fixture(scope="module")
def two_camera_policies(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("two_camera_policies")
    cameras = [SCENE, WRIST]
    return {
        "student": create_untrained_policy(root / "student", size="tiny", student=True, keep=0.5, state_dim=0,
                                           camera_names=cameras),
        "teacher": create_untrained_policy(root / "teacher", size="tiny", student=False, state_dim=0, seed=1,
                                           camera_names=cameras),
    }


@pytest.fixture(scope="module")
def two_camera_teacher(two_camera_policies) -> Policy:
    return Policy.load(two_camera_policies["teacher"], device="cpu")


def _frames(seed: int, height: int = 48, width: int = 64) -> np.ndarray:
    # Very different frames (dark / bright / noisy halves) so that the policy's outputs differ.
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (FRAMES, height, width, 3), dtype=np.uint8)
    frames[::3] //= 4
    frames[1::3, : height // 2] = 255
    return frames


def _first_steps(policy: Policy, images) -> np.ndarray:
    """Step 0 of the policy's chunk at each frame; ``images``: T frames, or T per-camera lists of frames."""
    return np.stack([policy.predict(image, INSTRUCTION).actions[0] for image in images]).astype(np.float64)


def _frame_sets(*cameras: np.ndarray) -> list[list[np.ndarray]]:
    return [list(frames) for frames in zip(*cameras)]


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a - b) ** 2).mean())


def _replay(args: list, work: Path, timeout: float = 120.0) -> subprocess.CompletedProcess:
    env = node_environment(reserve_domain(), work / "ros_log")
    return subprocess.run([sys.executable, "-m", "actdistill_ros.ros.replay.cli", *map(str, args)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _report(result: subprocess.CompletedProcess, out: Path) -> dict:
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == sorted([REPORT_JSON, REPORT_MD, *PLOTS.values()])
    for name in PLOTS.values():
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 2000, name
    assert "camera-to-action p95" in (out / REPORT_MD).read_text()
    report = json.loads((out / REPORT_JSON).read_text())
    for section in report["policies"].values():
        assert {"frames_published", "chunks_received", "frames_dropped", "messages_per_s", "latency_ms",
                "action_error", "executed_fraction", "layer_usage"} <= set(section)
        latency = section["latency_ms"]["camera_to_action"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
        # The node ran the chunks (its own camera-to-action is measured), though the bag's stamps lie in
        # the past: a replay's node judges input ages by receipt.
        assert section["latency_ms"]["node_camera_to_action"]["p50"] > 0
        assert section["frames_dropped"] == section["frames_published"] - section["chunks_received"]
        bag_cameras = [c["topic"] for c in report["bags"][0]["cameras"]]
        assert list(section["cameras"]) == bag_cameras  # per camera, in the policy's order
        for camera in section["cameras"].values():
            assert camera["frames_published"] == camera["frames_used"] + camera["frames_dropped"]
    assert not [p for p in out.parent.iterdir() if ".partial" in p.name]
    return report


def test_teacher_recorded_bag_gives_zero_teacher_error_with_rate_max(policies, teacher, tmp_path):
    images = _frames(0)
    actions = _first_steps(teacher, images)  # the recording IS the teacher's output at every frame
    bag = write_episode_bag(tmp_path / "teacher_mcap", images=images, instruction=INSTRUCTION, states=None,
                            actions=actions, topics=NO_STATE, storage="mcap", image_format="rgb8",
                            action_names=teacher.card.action_space.names)
    out = tmp_path / "report"
    result = _replay([bag, "--weights", policies["student"], "--teacher", policies["teacher"], "--rate", "max",
                      "--out", out, "--device", "cpu"], tmp_path)
    report = _report(result, out)
    student, teacher_section = report["policies"]["student"], report["policies"]["teacher"]
    assert report["rate"] == "max" and report["bags"][0]["cameras"][0]["encoding"] == "rgb8"
    for section in (student, teacher_section):
        assert section["frames_published"] == FRAMES and section["chunks_received"] == FRAMES  # max: none dropped
        assert section["action_error"]["frames_compared"] == FRAMES
    for name, dim in teacher_section["action_error"]["per_dimension"].items():
        assert dim["mse"] < 1e-6 and dim["mae"] < 1e-3, (name, dim)
    assert teacher_section["executed_fraction"]["min"] == 1.0 and teacher_section["layer_usage"] == [1.0] * 4
    assert 0.0 < student["executed_fraction"]["mean"] < 1.0 and len(student["layer_usage"]) == 4
    # Recording == teacher, so the student's error vs the recording is its disagreement with the teacher.
    agreement = report["student_vs_teacher"]
    assert agreement["frames_compared"] == FRAMES
    assert agreement["overall"]["mse"] == pytest.approx(student["action_error"]["overall"]["mse"], rel=1e-4)
    assert agreement["overall"]["mse"] > 1e-6
    # The bag is 64x48, the policy takes 32x32: one warning, naming bag and topic.
    assert result.stderr.count("the node resizes every frame") == 1
    assert "teacher_mcap topic /camera/image_raw: frames are 64x48" in result.stderr


def test_sqlite_jpeg_bag_with_shuffled_actions_gives_the_true_error(policies, teacher, tmp_path):
    images = _frames(1)
    topics = TopicConfig(camera_topic="/camera/image_raw/compressed", state_topic=None)
    encoded = [cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1] for image in images]
    decoded = np.stack([cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1] for buf in encoded])  # what the node sees
    true_actions = _first_steps(teacher, decoded)
    shuffled = true_actions[np.roll(np.arange(FRAMES), 5)]
    bag = write_episode_bag(tmp_path / "shuffled_sqlite", images=images, instruction=INSTRUCTION, states=None,
                            actions=shuffled, topics=topics, storage="sqlite3", image_format="jpeg",
                            jpeg_quality=95, action_names=teacher.card.action_space.names)
    out = tmp_path / "report"
    result = _replay([bag, "--weights", policies["teacher"], "--camera-topic", topics.camera_topic,
                      "--rate", "max", "--out", out, "--device", "cpu"], tmp_path)
    report = _report(result, out)
    section = report["policies"]["student"]  # --weights is the evaluated policy, whatever its kind
    assert section["kind"] == "teacher" and report["bags"][0]["storage"] == "sqlite3"
    assert report["bags"][0]["cameras"][0]["type"] == "sensor_msgs/msg/CompressedImage"
    assert section["chunks_received"] == FRAMES
    expected_mse = ((shuffled - true_actions) ** 2).mean(axis=0)
    expected_mae = np.abs(shuffled - true_actions).mean(axis=0)
    names = teacher.card.action_space.names
    for i, name in enumerate(names):
        dim = section["action_error"]["per_dimension"][name]
        assert dim["mse"] == pytest.approx(expected_mse[i], rel=1e-3, abs=1e-9)
        assert dim["mae"] == pytest.approx(expected_mae[i], rel=1e-3, abs=1e-9)
    assert section["action_error"]["overall"]["mse"] > 1e-4  # far above the near-zero of the true recording


def test_other_setup_bgr8_other_size_renamed_topics_state_and_recorded_timing(policies, tmp_path):
    topics = TopicConfig(camera_topic="/cam/front", command_topic="/task", state_topic="/robot/joints",
                         action_topic="/robot/action")
    rng = np.random.default_rng(2)
    images = _frames(2, height=30, width=40)
    states = rng.normal(size=(FRAMES, 4))
    actions = rng.uniform(-1, 1, size=(FRAMES, 4))
    bag = write_episode_bag(tmp_path / "other_setup", images=images, instruction=INSTRUCTION, states=states,
                            actions=actions, topics=topics, storage="mcap", image_format="bgr8", fps=10.0,
                            state_names=["hand_x", "hand_y", "hand_z", "gripper_opening"],
                            action_names=["delta_x", "delta_y", "delta_z", "gripper"])
    out = tmp_path / "report"
    started = time.monotonic()
    result = _replay([bag, "--weights", policies["student_with_state"], "--camera-topic", "/cam/front",
                      "--command-topic", "/task", "--state-topic", "/robot/joints", "--action-topic",
                      "/robot/action", "--remap", "/cam/front:=/front_camera", "--rate", "1.0", "--out", out,
                      "--device", "cpu"], tmp_path)
    report = _report(result, out)
    section = report["policies"]["student"]
    camera, = report["bags"][0]["cameras"]
    assert report["rate"] == 1.0 and camera["encoding"] == "bgr8" and camera["resolution"] == "40x30"
    assert camera["topic"] == "/cam/front" and camera["frames"] == FRAMES
    assert section["cameras"]["/cam/front"]["frames_published"] == FRAMES
    assert section["frames_published"] == FRAMES
    assert section["messages_published"] == FRAMES * 2 + 1  # frames, states, one latched command
    # Recorded timing: 12 frames at 10 Hz take about 1.1 s of replay, not the milliseconds of --rate max.
    assert section["replay_seconds"] >= 1.0
    assert section["chunks_received"] >= FRAMES // 2 and section["action_error"]["frames_compared"] > 0
    assert section["action_error"]["overall"]["mse"] > 0.05  # uniform random recording vs an untrained policy
    assert "frames are 40x30" in result.stderr
    assert time.monotonic() - started < 60


def test_two_camera_bag_gives_a_chunk_per_frame_set_from_the_right_frames(two_camera_policies, two_camera_teacher,
                                                                          tmp_path):
    """mcap, raw frames of two sizes, cameras from the cards' camera_names, student and teacher nodes."""
    scene, wrist = _frames(6), _frames(7, height=40, width=40)
    actions = _first_steps(two_camera_teacher, _frame_sets(scene, wrist))  # the recording IS the teacher's output
    # What a node that paired the wrong frames would answer: the cameras swapped, or the wrist frame one behind.
    swapped = _first_steps(two_camera_teacher, _frame_sets(wrist, scene))
    stale = _first_steps(two_camera_teacher, _frame_sets(scene[1:], wrist[:-1]))
    wrong = min(_mse(swapped, actions), _mse(stale, actions[1:]))
    assert wrong > 1e-9
    bag = write_episode_bag(tmp_path / "two_cameras_mcap", images=[scene, wrist], instruction=INSTRUCTION, states=None,
                            actions=actions, topics=TWO_CAMERAS, storage="mcap", image_format="rgb8",
                            action_names=two_camera_teacher.card.action_space.names)
    out = tmp_path / "report"
    result = _replay([bag, "--weights", two_camera_policies["student"], "--teacher", two_camera_policies["teacher"],
                      "--rate", "max", "--out", out, "--device", "cpu"], tmp_path)
    report = _report(result, out)
    assert [(c["topic"], c["resolution"], c["frames"]) for c in report["bags"][0]["cameras"]] == [
        (SCENE, "64x48", FRAMES), (WRIST, "40x40", FRAMES)]
    for role in ("student", "teacher"):
        section = report["policies"][role]
        assert section["frames_published"] == FRAMES and section["chunks_received"] == FRAMES  # a chunk per frame set
        for camera in (SCENE, WRIST):
            assert section["cameras"][camera] == {"frames_published": FRAMES, "frames_used": FRAMES,
                                                  "frames_dropped": 0, "older_frame_used": 0}, (role, camera)
        assert f"{role}: {FRAMES} frames" in result.stdout
    assert f"(cameras: {SCENE} {FRAMES}/{FRAMES} used, {WRIST} {FRAMES}/{FRAMES} used)" in result.stdout
    # Zero error at every frame: each chunk came from that frame set's scene AND wrist frames.
    teacher_error = report["policies"]["teacher"]["action_error"]
    assert teacher_error["frames_compared"] == FRAMES
    assert teacher_error["overall"]["mse"] < 1e-3 * wrong
    markdown = (out / REPORT_MD).read_text()
    assert f"| two_cameras_mcap | {SCENE} | Image | rgb8 | 64x48 | {FRAMES} |" in markdown
    assert f"| {WRIST} | {FRAMES} / {FRAMES} / 0 / 0 | {FRAMES} / {FRAMES} / 0 / 0 |" in markdown
    # Both cameras are resized by the node, each named once.
    assert "topic /cam/scene: frames are 64x48" in result.stderr and "topic /cam/wrist: frames are 40x40" in result.stderr


def test_two_camera_sqlite_jpeg_bag_with_other_topic_names_and_a_remap(two_camera_policies, two_camera_teacher,
                                                                       tmp_path):
    """sqlite3, CompressedImage, the bag's camera topics given with --camera-topic (the card names others)."""
    front, hand = "/robot/front/compressed", "/robot/hand/compressed"
    scene, wrist = _frames(8), _frames(9, height=36, width=36)
    encoded = [[cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1] for image in frames]
               for frames in (scene, wrist)]
    decoded = [np.stack([cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1] for buf in bufs]) for bufs in encoded]
    actions = _first_steps(two_camera_teacher, _frame_sets(*decoded))  # what the node sees
    stale = _first_steps(two_camera_teacher, _frame_sets(decoded[0][1:], decoded[1][:-1]))
    bag = write_episode_bag(tmp_path / "two_cameras_sqlite", images=[scene, wrist], instruction=INSTRUCTION,
                            states=None, actions=actions, topics=TopicConfig(cameras=[front, hand], state_topic=None),
                            storage="sqlite3", image_format="jpeg", jpeg_quality=95,
                            action_names=two_camera_teacher.card.action_space.names)
    out = tmp_path / "report"
    result = _replay([bag, "--weights", two_camera_policies["teacher"], "--camera-topic", front, "--camera-topic", hand,
                      "--remap", f"{hand}:=/gripper_camera/compressed", "--rate", "max", "--out", out,
                      "--device", "cpu"], tmp_path)
    report = _report(result, out)
    bag_info = report["bags"][0]
    assert bag_info["storage"] == "sqlite3"
    assert [c["type"] for c in bag_info["cameras"]] == ["sensor_msgs/msg/CompressedImage"] * 2
    assert [c["topic"] for c in bag_info["cameras"]] == [front, hand]
    assert all("jpeg" in c["encoding"] for c in bag_info["cameras"])  # the CompressedImage format field
    section = report["policies"]["student"]
    assert section["chunks_received"] == FRAMES
    assert [c["frames_used"] for c in section["cameras"].values()] == [FRAMES, FRAMES]
    assert section["action_error"]["overall"]["mse"] < 1e-3 * _mse(stale, actions[1:])


def test_rate_max_sends_a_frame_set_again_when_the_node_paired_an_older_frame(two_camera_policies, two_camera_teacher,
                                                                             tmp_path, monkeypatch, capsys):
    """The wrist camera's transport is slow (its frames arrive 30 ms late, after the scene frame that starts
    the inference): the node pairs scene frame t with wrist frame t-1, RouterStats.source_stamps show it, and
    --rate max sends the scene frame again until the pairing is right."""
    from actdistill_ros.ros.replay.player import Player

    scene, wrist = _frames(12), _frames(13, height=40, width=40)
    actions = _first_steps(two_camera_teacher, _frame_sets(scene, wrist))
    stale = _first_steps(two_camera_teacher, _frame_sets(scene[1:], wrist[:-1]))
    bag = write_episode_bag(tmp_path / "slow_wrist", images=[scene, wrist], instruction=INSTRUCTION, states=None,
                            actions=actions, topics=TWO_CAMERAS, action_names=two_camera_teacher.card.action_space.names)
    publish = Player._publish
    late = []

    def slow_wrist(self, plan, topic, raw):
        if topic == WRIST:
            timer = threading.Timer(0.03, publish, (self, plan, topic, raw))
            late.append(timer)
            timer.start()
        else:
            publish(self, plan, topic, raw)

    monkeypatch.setattr(Player, "_publish", slow_wrist)
    for key in ("ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_LOG_DIR", "FASTRTPS_DEFAULT_PROFILES_FILE",
                "FASTDDS_DEFAULT_PROFILES_FILE"):  # set by the replay in this process: restored afterwards
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.delenv(key, raising=False)
    out = tmp_path / "report"
    code = replay_cli.main([str(bag), "--weights", str(two_camera_policies["teacher"]), "--rate", "max", "--out",
                            str(out), "--device", "cpu"])
    for timer in late:
        timer.join()
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    section = json.loads((out / REPORT_JSON).read_text())["policies"]["student"]
    assert section["chunks_received"] == FRAMES
    assert section["frame_sets_resent"] >= FRAMES // 2  # the late wrist frames were noticed ...
    assert section["cameras"][WRIST]["older_frame_used"] == 0  # ... and every frame set ended up paired right
    assert section["action_error"]["overall"]["mse"] < 1e-3 * _mse(stale, actions[1:])
    assert "| frame sets resent |" in (out / REPORT_MD).read_text()


def test_resolve_topics_cameras_come_from_the_flags_then_the_card_then_the_topics_yaml(two_camera_policies, policies,
                                                                                      tmp_path):
    from actdistill_ros.weights import load_card

    topics_yaml = tmp_path / "topics.yaml"
    topics_yaml.write_text("cameras:\n  - /yaml/left\n  - /yaml/right\ncommand_topic: /task\nstate_topic: null\n")
    two = load_card(two_camera_policies["student"])
    one_unnamed = load_card(policies["student"])  # a card without camera_names

    def resolve(card, *argv):
        args = replay_cli.build_parser().parse_args(["bag", "--weights", "w", *map(str, argv)])
        return replay_cli.resolve_topics(args, [card])

    assert resolve(two).cameras == [SCENE, WRIST]
    assert resolve(two, "--camera-topic", "/a", "--camera-topic", "/b").cameras == ["/a", "/b"]
    assert resolve(two, "--topics", topics_yaml).cameras == [SCENE, WRIST]  # the card wins over the YAML
    assert resolve(two, "--topics", topics_yaml).command_topic == "/task"
    assert resolve(one_unnamed).cameras == ["/camera/image_raw"]
    with pytest.raises(ValueError, match=r"the cameras of .*topics.yaml \['/yaml/left', '/yaml/right'\]: 2 camera\(s\), "
                                         r"but w takes 1 camera image\(s\)"):
        resolve(one_unnamed, "--topics", topics_yaml)


def _one_line_failure(capfd, argv: list, code: int = 2) -> str:
    result = replay_cli.main([str(a) for a in argv])
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert result == code and len(lines) == 1, lines
    return lines[0]


def test_a_bag_missing_a_camera_or_too_few_camera_topics_fail_with_one_line(two_camera_policies, tmp_path, capfd):
    scene_only = write_episode_bag(tmp_path / "scene_only", images=_frames(3), instruction=INSTRUCTION, states=None,
                                   actions=np.zeros((FRAMES, 4)), topics=TopicConfig(camera_topic=SCENE, state_topic=None))
    out = tmp_path / "report"
    line = _one_line_failure(capfd, [scene_only, "--weights", two_camera_policies["student"], "--out", out])
    assert str(scene_only) in line and f"topic '{WRIST}': not in bag" in line and SCENE in line  # lists what is there
    line = _one_line_failure(capfd, [scene_only, "--weights", two_camera_policies["student"], "--camera-topic", SCENE,
                                     "--out", out])
    assert f"--camera-topic ['{SCENE}']: 1 camera(s), but" in line and "takes 2 camera image(s)" in line
    assert "give --camera-topic once per camera" in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [scene_only.name]


def _missing_topic_bag(tmp_path: Path) -> tuple[Path, str]:
    bag = write_episode_bag(tmp_path / "no_camera", images=_frames(3), instruction=INSTRUCTION, states=None,
                            actions=np.zeros((FRAMES, 4)), topics=TopicConfig(camera_topic="/other_camera",
                                                                                state_topic=None))
    return bag, "topic '/camera/image_raw': not in bag"


def _corrupt_bag(tmp_path: Path) -> tuple[Path, str]:
    bag = write_episode_bag(tmp_path / "corrupt", images=_frames(3), instruction=INSTRUCTION, states=None,
                            actions=np.zeros((FRAMES, 4)), topics=NO_STATE)
    storage = next(bag.glob("*.mcap"))
    data = storage.read_bytes()
    storage.write_bytes(data[: len(data) // 2])  # a copy cut off halfway
    return bag, "expected an intact rosbag2"


@pytest.mark.parametrize("make_bag", [_missing_topic_bag, _corrupt_bag], ids=["missing-topic", "corrupt"])
def test_unusable_bag_fails_with_one_line_and_writes_nothing(policies, tmp_path, capfd, make_bag):
    bag, expected = make_bag(tmp_path)
    out = tmp_path / "report"
    code = replay_cli.main([str(bag), "--weights", str(policies["student"]), "--out", str(out)])
    stderr = capfd.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code != 0
    assert len(lines) == 1 and str(bag) in lines[0] and expected in lines[0], lines
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [bag.name]


def _listen_only_replay(weights: Path, bag: Path, tmp_path: Path, after_frame=None,
                        cameras: tuple[str, ...] = ("/camera/image_raw",)):
    """What the launch file does with `ros2 bag play`: node + replay_eval --listen-only, a third process (this
    one) plays the bag in its recorded order. ``after_frame(player, frame_index, raw)`` runs after each
    first-camera frame is published. Returns (replay_eval's CompletedProcess, the ActionChunks seen on the
    node's topic)."""
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from rosbags.rosbag2 import Reader
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import String

    from actdistill_ros.ros.launch_arguments import bag_camera_transports, bag_topic_types, replay_node_parameters

    domain = reserve_domain()
    # The node as replay_eval.launch.py starts it: a dry run, each camera's transport from the bag.
    node = start_policy_node(weights, domain, tmp_path / "node", params=replay_node_parameters(
        str(weights), "cpu", list(cameras), bag_camera_transports(bag, list(cameras)), "/instruction", "/joint_states"))
    camera_class = {topic: CompressedImage if msgtype.endswith("CompressedImage") else Image
                    for topic, msgtype in bag_topic_types(bag).items()}
    out = tmp_path / "report"
    env = node_environment(domain, tmp_path / "replay_log")
    stderr_path = tmp_path / "replay_stderr.txt"
    with stderr_path.open("w") as stderr:
        replay = subprocess.Popen([sys.executable, "-m", "actdistill_ros.ros.replay.cli", str(bag), "--weights",
                                   str(weights), "--listen-only", "--attach", "policy_node", "--out",
                                   str(out), "--idle-timeout", "2.0", "--startup-timeout", "60",
                                   *camera_topic_flags(cameras)], cwd=REPO_ROOT,
                                  env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    player = RosSide(domain, "player")
    chunks = player.record(load_action_chunk_type(), "/policy_node/action_chunk", QoSProfile(
        depth=50, reliability=ReliabilityPolicy.RELIABLE))
    try:
        assert wait_until(lambda: "listening on" in stderr_path.read_text() or replay.poll() is not None, 60.0)
        assert replay.poll() is None, stderr_path.read_text()[-3000:]
        publishers = {topic: player.node.create_publisher(camera_class[topic], topic, QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE)) for topic in cameras}
        command = player.node.create_publisher(String, "/instruction", QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        publishers["/instruction"] = command
        # Every camera has two readers: the node and replay_eval.
        assert wait_until(lambda: all(publishers[t].get_subscription_count() >= 2 for t in cameras), 30.0)
        # This side seeing the subscriptions does not mean the best-effort readers have matched this
        # writer yet; like the launch file's play_delay, give discovery a moment before playing.
        time.sleep(1.0)
        with Reader(bag) as reader:  # raw CDR at the recorded timing, as ros2 bag play does
            start_wall, start_bag, frame_index = time.monotonic(), None, 0
            for conn, stamp, raw in reader.messages():
                start_bag = stamp if start_bag is None else start_bag
                time.sleep(max(0.0, start_wall + (stamp - start_bag) / 1e9 - time.monotonic()))
                if conn.topic in publishers:
                    publishers[conn.topic].publish(bytes(raw))
                if conn.topic == cameras[0]:
                    if after_frame is not None:
                        after_frame(player, frame_index, bytes(raw))
                    frame_index += 1
        stdout, _ = replay.communicate(timeout=60)
    finally:
        if replay.poll() is None:
            replay.kill()
        player.close()
        node.stop()
    return subprocess.CompletedProcess(replay.args, replay.returncode, stdout, stderr_path.read_text()), \
        chunks.messages()


def test_listen_only_records_what_another_player_publishes(policies, teacher, tmp_path):
    """What the launch file does with `ros2 bag play`: node + replay_eval --listen-only, a third process plays."""
    images = _frames(4)
    actions = _first_steps(teacher, images)
    bag = write_episode_bag(tmp_path / "played", images=images, instruction=INSTRUCTION, states=None,
                            actions=actions, topics=NO_STATE, fps=10.0, action_names=teacher.card.action_space.names)
    result, chunks = _listen_only_replay(policies["teacher"], bag, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = _report(result, tmp_path / "report")
    section = report["policies"]["student"]
    assert report["mode"] == "listen-only"
    assert section["frames_published"] >= FRAMES - 2 and section["chunks_received"] >= FRAMES // 2
    # The node runs the teacher the recording came from: chunks it answered match the recording.
    assert section["action_error"]["frames_compared"] >= FRAMES // 2
    assert section["action_error"]["overall"]["mse"] < 1e-6
    assert section["malformed_chunks"] == 0 and section["callback_errors"] == 0
    # The node's ActionChunk as published: camera header, the card's names and units, the whole chunk.
    chunk = chunks[-1]
    space = teacher.card.action_space
    assert chunk.header.frame_id == "camera" and chunk.header.stamp.sec > 0
    assert list(chunk.names) == space.names and list(chunk.units) == space.units
    assert (chunk.chunk_size, chunk.action_dim) == (teacher.card.chunk_size, space.dim)
    assert len(chunk.actions) == chunk.chunk_size * chunk.action_dim
    assert chunk.threshold == pytest.approx(0.5) and chunk.executed_fraction == 1.0


def test_listen_only_records_two_cameras_that_another_player_publishes(two_camera_policies, two_camera_teacher,
                                                                      tmp_path):
    """--attach reads the node's topics.cameras; every camera is listened to and counted."""
    scene, wrist = _frames(10), _frames(11, height=40, width=40)
    bag = write_episode_bag(tmp_path / "played_two", images=[scene, wrist], instruction=INSTRUCTION, states=None,
                            actions=_first_steps(two_camera_teacher, _frame_sets(scene, wrist)), topics=TWO_CAMERAS,
                            fps=10.0, action_names=two_camera_teacher.card.action_space.names)
    result, chunks = _listen_only_replay(two_camera_policies["teacher"], bag, tmp_path, cameras=(SCENE, WRIST))
    assert result.returncode == 0, result.stderr[-3000:]
    report = _report(result, tmp_path / "report")
    section = report["policies"]["student"]
    assert report["mode"] == "listen-only" and section["chunks_received"] >= FRAMES // 2
    assert f"listening on {SCENE}, {WRIST}" in result.stderr
    for camera in (SCENE, WRIST):
        usage = section["cameras"][camera]
        assert usage["frames_published"] >= FRAMES - 2 and usage["frames_used"] >= FRAMES // 2, (camera, usage)
    # The player sends the frames in the bag's order, as ros2 bag play does: the node (an inference on each
    # scene frame) may pair a scene frame with the previous wrist frame; the report counts how often.
    assert 0 <= section["cameras"][WRIST]["older_frame_used"] <= section["frames_published"]
    assert section["cameras"][SCENE]["older_frame_used"] == 0
    assert chunks and all(c.header.frame_id == "camera" for c in chunks)  # stamped with the first camera's frame


def test_malformed_action_chunks_are_counted_and_the_replay_goes_on(policies, teacher, tmp_path):
    """ActionChunks that cannot be read as (chunk_size, action_dim) arrive for frames the node has yet to answer."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    action_chunk = load_action_chunk_type()
    space, chunk_size = teacher.card.action_space, teacher.card.chunk_size
    malformed = [  # (chunk_size, action_dim, actions) on the frames 0, 1, 2
        (chunk_size, space.dim, [0.1] * (chunk_size * space.dim - 1)),  # one value short
        (0, space.dim, []),  # an empty chunk
        (chunk_size, space.dim, [float("nan")] * (chunk_size * space.dim)),
    ]
    images = _frames(5)
    bag = write_episode_bag(tmp_path / "played", images=images, instruction=INSTRUCTION, states=None,
                            actions=_first_steps(teacher, images), topics=NO_STATE, fps=10.0,
                            action_names=space.names)
    publisher = {}

    def publish_malformed(player, frame_index: int, raw: bytes) -> None:
        if "chunks" not in publisher:
            publisher["chunks"] = player.node.create_publisher(action_chunk, "/policy_node/action_chunk", QoSProfile(
                depth=10, reliability=ReliabilityPolicy.RELIABLE))
            # This process's own recorder and replay_eval's subscription.
            assert wait_until(lambda: publisher["chunks"].get_subscription_count() >= 2, 10.0)
        if frame_index < len(malformed):
            size, dim, values = malformed[frame_index]
            stamp = header_stamp_ns(raw)
            msg = action_chunk(names=space.names, units=space.units, chunk_size=size, action_dim=dim, actions=values)
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
            publisher["chunks"].publish(msg)

    result, _ = _listen_only_replay(policies["teacher"], bag, tmp_path, after_frame=publish_malformed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "malformed ActionChunk" in result.stderr and "expected chunk_size x action_dim" in result.stderr
    section = _report(result, tmp_path / "report")["policies"]["student"]
    assert section["malformed_chunks"] == len(malformed) and section["callback_errors"] == 0
    assert f"{len(malformed)} malformed chunks" in result.stdout
    # The node's own chunks, before and after the malformed ones, are all still recorded and compared.
    assert section["frames_published"] >= FRAMES - 2 and section["chunks_received"] >= FRAMES // 2
    assert section["action_error"]["frames_compared"] >= FRAMES // 2
    assert section["action_error"]["overall"]["mse"] < 1e-6


def test_background_ros_logs_a_failing_callback_and_keeps_spinning(caplog):
    """One callback that raises must not end the spin thread (every later message would be lost)."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from std_msgs.msg import String

    from actdistill_ros.ros.ros_process import BackgroundRos

    received = []

    def on_message(msg) -> None:
        if msg.data == "bad":
            raise ValueError("cannot reshape array of size 7 into shape (2,4)")
        received.append(msg.data)

    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    with BackgroundRos("callback_failure_test", reserve_domain()) as ros:
        ros.node.create_subscription(String, "/words", on_message, qos)
        publisher = ros.node.create_publisher(String, "/words", qos)
        assert wait_until(lambda: publisher.get_subscription_count() >= 1, 10.0)
        for word in ("first", "bad", "after"):
            publisher.publish(String(data=word))
        assert wait_until(lambda: received == ["first", "after"], 10.0), received
        assert ros.callback_errors == 1
    assert "callback failed, still spinning: ValueError: cannot reshape" in caplog.text


def load_action_chunk_type():
    load_router_stats_type()  # makes the built messages importable (or skips / fails)
    from actdistill_ros.msg import ActionChunk
    return ActionChunk


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and getattr(n.func, "id", getattr(n.func, "attr", None)) == name]


def _launch_call(tree: ast.AST, function: str) -> ast.Call:
    (call,) = _calls(tree, function)
    return call


def test_launch_file_runs_replay_eval_as_a_node_beside_ros2_bag_play_of_the_inputs_only():
    """replay_eval is a launch_ros Node (launch's SIGINT reaches it; `ros2 run` did not pass it on), in
    --listen-only mode attached to the dry-run policy node; ros2 bag play plays only what the policy takes."""
    from actdistill_ros.ros.launch_arguments import bag_play_command, policy_input_topics, replay_eval_arguments

    tree = ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))
    constants = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)}
    declared = {ast.literal_eval(call.args[0]) for call in _calls(tree, "DeclareLaunchArgument")}
    used = {ast.literal_eval(call.args[0]) for name in ("LaunchConfiguration", "value") for call in _calls(tree, name)
            if isinstance(call.args[0], ast.Constant)}
    assert declared == used and {"camera_topics", "command_topic", "state_topic", "action_topic"} <= declared
    assert "transport" not in declared  # each camera's transport comes from the bag
    nodes = {ast.literal_eval(next(k.value for k in call.keywords if k.arg == "executable")): call
             for call in _calls(tree, "Node")}
    assert set(nodes) == {"policy_node", "replay_eval"}
    assert not [c for c in _calls(tree, "ExecuteProcess") if "'run'" in ast.unparse(c)], "no `ros2 run` process"
    arguments = next(k.value for k in nodes["replay_eval"].keywords if k.arg == "arguments")
    assert isinstance(arguments, ast.Call) and arguments.func.id == "replay_eval_arguments"
    assert ast.unparse(arguments.args[-1]) == "NODE_NAME" and constants["NODE_NAME"] == "policy_node"
    # What that call gives, through replay_eval's own parser.
    cameras = [SCENE, WRIST]
    argv = replay_eval_arguments("/bags/b", "/w", "/out", cameras, "/task", "/robot/joints", "/robot/action",
                                 constants["NODE_NAME"])
    args = replay_cli.build_parser().parse_args(argv)
    assert args.listen_only and args.attach == "policy_node" and args.camera_topic == cameras
    assert (args.command_topic, args.state_topic, args.action_topic) == ("/task", "/robot/joints", "/robot/action")
    assert args.bags == [Path("/bags/b")] and args.weights == Path("/w") and args.out == Path("/out")
    # ros2 bag play: --topics, built from the policy's inputs.
    play = next(k.value for k in _launch_call(tree, "ExecuteProcess").keywords if k.arg == "cmd")
    assert isinstance(play, ast.Call) and play.func.id == "bag_play_command"
    topics = play.args[2]
    assert isinstance(topics, ast.Call) and topics.func.id == "policy_input_topics"
    assert ast.unparse(topics.args[-1]) == "card_state_dim(weights)"
    without_state = policy_input_topics(cameras, "/task", "/robot/joints", 0)
    with_state = policy_input_topics(cameras, "/task", "/robot/joints", 4)
    assert without_state == [SCENE, WRIST, "/task"] and with_state == [SCENE, WRIST, "/task", "/robot/joints"]
    command = bag_play_command("/bags/b", "0.5", with_state)
    assert command == ["ros2", "bag", "play", "/bags/b", "--rate", "0.5", "--topics", *with_state]
    assert "/robot/action" not in command and "/action" not in command
    with pytest.raises(ValueError, match="launch argument state_topic: the policy takes a robot state"):
        policy_input_topics(cameras, "/task", "", 4)
    # The policy node: a dry run with the bag's transports (replay_node_parameters, checked below).
    parameters = next(k.value for k in nodes["policy_node"].keywords if k.arg == "parameters")
    assert [getattr(e.func, "id", None) for e in parameters.elts] == ["LaunchConfiguration", "replay_node_parameters"]
    transports = parameters.elts[1].args[3]
    assert ast.unparse(transports) == "bag_camera_transports(bag, cameras)"


def _mixed_transport_bag(path: Path, raw_bag: Path, compressed_topic: str, storage: str) -> Path:
    """``raw_bag`` with the frames of ``compressed_topic`` as sensor_msgs/CompressedImage (jpeg, like an
    image_transport compressed republisher), everything else (stamps, timing, other topics) unchanged."""
    from rosbags.rosbag2 import StoragePlugin, Reader, Writer

    from actdistill_ros.data.bag_writer import jazzy_typestore

    store = jazzy_typestore()
    compressed_type = "sensor_msgs/msg/CompressedImage"
    with Reader(raw_bag) as reader, Writer(path, version=9, storage_plugin=StoragePlugin.SQLITE3 if storage == "sqlite3"
                                           else StoragePlugin.MCAP) as writer:
        connections = {}
        for conn in reader.connections:
            msgtype = compressed_type if conn.topic == compressed_topic else conn.msgtype
            connections[conn.topic] = writer.add_connection(conn.topic, msgtype, typestore=store)
        for conn, stamp, raw in reader.messages():
            if conn.topic == compressed_topic:
                image = store.deserialize_cdr(raw, conn.msgtype)
                rgb = image.data.reshape(image.height, image.width, 3)
                jpeg = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].reshape(-1)
                msg = store.types[compressed_type](header=image.header, format="rgb8; jpeg compressed bgr8", data=jpeg)
                raw = store.serialize_cdr(msg, compressed_type)
            writer.write(connections[conn.topic], stamp, raw)
    return path


def _decoded_jpeg(frames: np.ndarray) -> np.ndarray:
    """What the node sees of frames sent as jpeg (quality 95)."""
    return np.stack([cv2.imdecode(cv2.imencode(".jpg", f[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1],
                                  cv2.IMREAD_COLOR)[:, :, ::-1] for f in frames])


@pytest.fixture
def mixed_bag(tmp_path, two_camera_teacher) -> tuple[Path, np.ndarray, float]:
    """A raw scene camera and a compressed wrist camera (sqlite3); the recording is the teacher's output at
    each frame set as the node decodes it. Returns (bag, actions, the error a wrong pairing gives)."""
    scene, wrist = _frames(14), _frames(15, height=40, width=40)
    actions = _first_steps(two_camera_teacher, _frame_sets(scene, _decoded_jpeg(wrist)))
    stale = _first_steps(two_camera_teacher, _frame_sets(scene[1:], _decoded_jpeg(wrist)[:-1]))
    raw_bag = write_episode_bag(tmp_path / "raw_two", images=[scene, wrist], instruction=INSTRUCTION, states=None,
                                actions=actions, topics=TWO_CAMERAS, storage="mcap", image_format="rgb8", fps=10.0,
                                action_names=two_camera_teacher.card.action_space.names)
    bag = _mixed_transport_bag(tmp_path / "mixed_transports", raw_bag, WRIST, "sqlite3")
    return bag, actions, _mse(stale, actions[1:])


def test_bag_camera_transports_come_from_each_cameras_message_type(mixed_bag, tmp_path):
    from actdistill_ros.ros.launch_arguments import bag_camera_transports, bag_topic_types

    bag, _, _ = mixed_bag
    assert bag_topic_types(bag)[WRIST] == "sensor_msgs/msg/CompressedImage"
    assert bag_camera_transports(bag, [SCENE, WRIST]) == ["raw", "compressed"]
    assert bag_camera_transports(bag, [WRIST, SCENE]) == ["compressed", "raw"]  # in the order asked for
    with pytest.raises(ValueError, match=r"camera topic '/cam/other' is not in the bag, expected sensor_msgs/msg/Image "
                                         r"or sensor_msgs/msg/CompressedImage; topics present: /action, /cam/scene"):
        bag_camera_transports(bag, [SCENE, "/cam/other"])
    with pytest.raises(ValueError, match=r"camera topic '/instruction' has type std_msgs/msg/String"):
        bag_camera_transports(bag, ["/instruction"])
    with pytest.raises(ValueError, match="no metadata.yaml, expected a rosbag2 directory"):
        bag_camera_transports(tmp_path / "nothing", [SCENE])


def test_dry_run_action_scale_only_for_cards_without_physical_units(policies):
    from actdistill_ros.ros.launch_arguments import card_dry_run_action_scale, dry_run_action_scale, \
        replay_node_parameters

    # The shipped Meta-World card: normalized units; the node needs a scale to start, a dry run takes 1.0.
    assert dry_run_action_scale(["normalized"] * 4, 3) == {"action.scale": [1.0, 1.0, 1.0, 1.0]}
    # Physical arm units: the node takes them as they are; a gripper in its own unit does not count.
    assert dry_run_action_scale(["m/s", "m/s", "m/s", "rad/s", "rad/s", "rad/s", "normalized"], 6) == {}
    assert dry_run_action_scale(["rad"] * 7, None) == {}
    assert dry_run_action_scale(["rad", "rad", "deg"], None) == {"action.scale": [1.0, 1.0, 1.0]}
    from actdistill_ros.weights import load_card

    card = load_card(policies["student_with_state"])
    expected = dry_run_action_scale(card.action_space.units, card.action_space.gripper_index)
    assert card_dry_run_action_scale(policies["student_with_state"]) == expected
    params = replay_node_parameters(str(policies["student_with_state"]), "cpu", [SCENE, WRIST], ["raw", "compressed"],
                                    "/task", "/robot/joints")
    assert params["enable_output"] is False and params["camera.transports"] == ["raw", "compressed"]
    assert params["state.enabled"] is True and params["topics.state"] == "/robot/joints"
    assert {k: v for k, v in params.items() if k == "action.scale"} == expected
    assert replay_node_parameters(str(policies["student"]), "cpu", [SCENE], ["raw"], "/task", "/s")["state.enabled"] \
        is False


def test_bag_with_a_compressed_and_a_raw_camera_replays(two_camera_policies, mixed_bag, tmp_path):
    """A raw scene camera and a compressed wrist camera through a two-camera policy: the node is started with
    camera.transports [raw, compressed] from the bag, and each chunk came from that frame set's two frames."""
    bag, actions, wrong = mixed_bag
    out = tmp_path / "report"
    result = _replay([bag, "--weights", two_camera_policies["teacher"], "--rate", "max", "--out", out,
                      "--device", "cpu"], tmp_path)
    report = _report(result, out)
    assert [(c["topic"], c["type"], c["frames"]) for c in report["bags"][0]["cameras"]] == [
        (SCENE, "sensor_msgs/msg/Image", FRAMES), (WRIST, "sensor_msgs/msg/CompressedImage", FRAMES)]
    section = report["policies"]["student"]
    assert section["chunks_received"] == FRAMES
    assert [c["frames_used"] for c in section["cameras"].values()] == [FRAMES, FRAMES]
    assert section["action_error"]["overall"]["mse"] < 1e-3 * wrong
    markdown = (out / REPORT_MD).read_text()
    assert f"| mixed_transports | {SCENE} | Image | rgb8 |" in markdown
    assert f"| {WRIST} | CompressedImage |" in markdown


def test_listen_only_replay_of_a_bag_with_a_compressed_and_a_raw_camera(two_camera_policies, mixed_bag, tmp_path):
    """The launch file's path: the node's transports from the bag, replay_eval listening to each camera with
    its own message type."""
    bag, _, _ = mixed_bag
    result, chunks = _listen_only_replay(two_camera_policies["teacher"], bag, tmp_path, cameras=(SCENE, WRIST))
    assert result.returncode == 0, result.stderr[-3000:]
    section = _report(result, tmp_path / "report")["policies"]["student"]
    assert section["chunks_received"] >= FRAMES // 2 and chunks
    for camera in (SCENE, WRIST):
        assert section["cameras"][camera]["frames_published"] >= FRAMES - 2, camera


def test_camera_topics_launch_argument(two_camera_policies, policies):
    assert camera_topics("/cam/scene,/cam/wrist") == camera_topics("[/cam/scene, /cam/wrist]") == [SCENE, WRIST]
    assert camera_topics("", str(two_camera_policies["teacher"])) == [SCENE, WRIST]  # the card's camera_names
    assert camera_topics("", str(policies["teacher"])) == ["/camera/image_raw"]  # a card without them
    assert camera_topics("/only") == ["/only"]
    with pytest.raises(ValueError, match="launch argument camera_topics: expected absolute topic names"):
        camera_topics("cam/scene,/cam/wrist")


def test_replay_publishes_only_the_policy_inputs_never_the_actions(policies, tmp_path):
    """replay_eval's own player, attached to a node on this test's domain, on a bag that also recorded the
    robot's state and actions: during the whole replay its node publishes the camera and the command only
    (the policy takes no state), and no message at all reaches the action topic."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image, JointState

    images = np.concatenate([_frames(16)] * 3)  # 3.6 s at the recorded timing: time to watch the graph
    topics = TopicConfig()  # /camera/image_raw, /instruction, /joint_states, /action (JointState)
    bag = write_episode_bag(tmp_path / "full_recording", images=images, instruction=INSTRUCTION,
                            states=np.zeros((len(images), 4)), actions=np.zeros((len(images), 4)), topics=topics,
                            fps=10.0, action_names=["a0", "a1", "a2", "a3"])
    from actdistill_ros.ros.launch_arguments import replay_node_parameters

    domain = reserve_domain()
    params = replay_node_parameters(str(policies["student"]), "cpu", [topics.camera_topic], ["raw"],
                                    topics.command_topic, topics.state_topic)
    node = start_policy_node(policies["student"], domain, tmp_path / "node", params={
        **params, "topics.action": "/node/action"})  # the node's own output elsewhere: /action is only the bag's
    watcher = RosSide(domain, "watcher")
    best_effort = QoSProfile(depth=50, reliability=ReliabilityPolicy.BEST_EFFORT)
    actions = watcher.record(JointState, topics.action_topic, best_effort)
    states = watcher.record(JointState, topics.state_topic, best_effort)
    frames = watcher.record(Image, topics.camera_topic, best_effort)
    out = tmp_path / "report"
    replay = subprocess.Popen([sys.executable, "-m", "actdistill_ros.ros.replay.cli", str(bag), "--weights",
                               str(policies["student"]), "--attach", "policy_node", "--rate", "1.0", "--out", str(out),
                               "--startup-timeout", "60"], cwd=REPO_ROOT, env=node_environment(domain, tmp_path / "log"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    from rclpy.node import NodeNameNonExistentError

    published: set[str] = set()
    seen_node = False
    try:
        while replay.poll() is None:  # every topic replay_eval's node publishes, for as long as it runs
            for name, namespace in watcher.node.get_node_names_and_namespaces():
                if name == f"replay_eval_{replay.pid}":
                    seen_node = True
                    try:
                        published |= {t for t, _ in watcher.node.get_publisher_names_and_types_by_node(name, namespace)}
                    except NodeNameNonExistentError:  # it left the graph between the two calls
                        pass
            time.sleep(0.05)
        stdout, stderr = replay.communicate(timeout=30)
    finally:
        if replay.poll() is None:
            replay.kill()
        node.stop()
    try:
        assert replay.returncode == 0, stderr[-3000:]
        assert _report(subprocess.CompletedProcess(replay.args, 0, stdout, stderr), out)
        assert seen_node, "replay_eval's node never appeared in the ROS graph"
        assert published - {"/rosout", "/parameter_events"} == {topics.camera_topic, topics.command_topic}
        assert len(frames.messages()) >= FRAMES // 2  # the watcher hears what is played ...
        assert actions.messages() == [] and states.messages() == []  # ... and nothing on /action or /joint_states
    finally:
        watcher.close()


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize("signum", [2, 15], ids=["SIGINT", "SIGTERM"])
def test_a_replay_stopped_by_a_signal_exits_cleanly_and_stops_its_node(policies, tmp_path, signum):
    """Ctrl-C (SIGINT; `ros2 launch` escalates to SIGTERM): exit 0, one info line, no traceback, no report,
    and the node it spawned is gone too."""
    images = _frames(17)
    bag = write_episode_bag(tmp_path / "long", images=np.concatenate([images] * 10), instruction=INSTRUCTION,
                            states=None, actions=np.zeros((FRAMES * 10, 4)), topics=NO_STATE, fps=10.0)
    out = tmp_path / "report"
    replay = subprocess.Popen([sys.executable, "-m", "actdistill_ros.ros.replay.cli", str(bag), "--weights",
                               str(policies["student"]), "--rate", "1.0", "--out", str(out), "--device", "cpu"],
                              cwd=REPO_ROOT, env=node_environment(reserve_domain(), tmp_path / "log"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Playing (the first chunk came back): the spawned node is a child of replay_eval.
        stderr_lines = []
        for line in replay.stderr:
            stderr_lines.append(line)
            if "first ActionChunk" in line:
                break
        children = _children(replay.pid)
        assert children, "".join(stderr_lines)[-3000:]
        time.sleep(0.5)
        replay.send_signal(signum)
        stdout, rest = replay.communicate(timeout=30)
    finally:
        if replay.poll() is None:
            replay.kill()
    stderr = "".join(stderr_lines) + rest
    name = {2: "SIGINT", 15: "SIGTERM"}[signum]
    assert replay.returncode == 0, stderr[-3000:]
    assert f"INFO actdistill_ros.replay_eval: stopped by {name} before the end of the replay; no report written" in stderr
    assert "Traceback" not in stderr and "ERROR" not in stderr and ": error:" not in stderr, stderr[-3000:]
    assert not out.exists() and "report:" not in stdout
    assert wait_until(lambda: not any(Path(f"/proc/{c}").exists() for c in children), 10.0), children


def _signal_handled(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``signum`` (SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signum - 1) & 1)


@pytest.mark.parametrize("raised", ["stop", "stop inside an import", "other error"])
def test_a_stop_that_an_import_turned_into_an_import_error_is_still_a_clean_stop(monkeypatch, tmp_path, raised):
    """A SIGTERM landing while rclpy's C extension is imported comes back as an ImportError chained to the
    stop: still a clean exit (0), where any other error still fails the run."""
    def run(_args):
        if raised == "other error":
            raise ImportError("initialization failed")
        try:
            replay_cli._raise_stopped(signal.SIGTERM, None)
        except replay_cli.Stopped as stop:
            if raised == "stop":
                raise
            raise ImportError("initialization failed") from stop

    monkeypatch.setattr(replay_cli, "run", run)
    argv = [str(tmp_path / "bag"), "--weights", str(tmp_path / "weights")]
    if raised == "other error":
        with pytest.raises(ImportError):
            replay_cli.main(argv)
    else:
        assert replay_cli.main(argv) == 0


def test_a_re_executed_replay_passes_the_stop_on_to_its_child(policies, tmp_path):
    """Without the built messages on the paths replay_eval runs itself again as a child with them; a stop
    for the parent (what launch signals) reaches the child, which exits cleanly, and so does the parent."""
    from actdistill_ros.ros.env import built_messages_path

    images = _frames(18)
    bag = write_episode_bag(tmp_path / "bag", images=images, instruction=INSTRUCTION, states=None,
                            actions=np.zeros((FRAMES, 4)), topics=NO_STATE)
    env = node_environment(reserve_domain(), tmp_path / "log")
    env["PYTHONPATH"] = os.pathsep.join(p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                        if p and p != str(built_messages_path()))
    # Attached to a node that never comes: the child waits for it (--startup-timeout) until stopped.
    replay = subprocess.Popen([sys.executable, "-m", "actdistill_ros.ros.replay.cli", str(bag), "--weights",
                               str(policies["student"]), "--attach", "absent_node", "--startup-timeout", "120",
                               "--out", str(tmp_path / "report"), "-v"], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        child = wait_until(lambda: next(iter(_children(replay.pid)), None), 30.0)
        assert child, replay.stderr.read() if replay.poll() is not None else "no child started"
        assert wait_until(lambda: _signal_handled(child, signal.SIGTERM), 60.0)  # the child's main() is running
        replay.send_signal(signal.SIGTERM)
        _, stderr = replay.communicate(timeout=30)
    finally:
        if replay.poll() is None:
            replay.kill()
    assert replay.returncode == 0, stderr[-3000:]
    # The parent passes the stop on and returns the child's exit code; the one "stopped" line is the child's.
    assert f"passing SIGTERM on to the replay child {child}" in stderr
    assert stderr.count("stopped by SIGTERM before the end of the replay; no report written") == 1
    assert not Path(f"/proc/{child}").exists() and not (tmp_path / "report").exists()


def test_bags_that_differ_in_a_cameras_transport_fail_with_one_line(two_camera_policies, mixed_bag, tmp_path, capfd):
    """Cameras of one bag may differ; bags of one run may not (one node, one camera.transports, serves them)."""
    bag, _, _ = mixed_bag
    raw_bag = tmp_path / "raw_two"  # the same recording with both cameras raw (written by mixed_bag)
    out = tmp_path / "report"
    line = _one_line_failure(capfd, [raw_bag, bag, "--weights", two_camera_policies["student"], "--out", out])
    assert line.startswith("replay_eval: error: bags differ in camera transports")
    assert f"{raw_bag}: ['raw', 'raw']; {bag}: ['raw', 'compressed']" in line and "separate runs" in line
    assert not out.exists()
