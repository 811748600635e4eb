"""Rosbag replay evaluation end to end: real bags (mcap and sqlite3), real policy_node subprocesses,
real Fast DDS over loopback, tiny untrained policies.

The metric is checked against values computed here: a bag whose recorded actions are the
teacher's own outputs must give (near) zero teacher error, and a bag with shuffled actions
must give exactly the error between the shuffled and the true actions.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
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
from actdistill_ros.ros import replay_eval  # noqa: E402

FRAMES = 12
INSTRUCTION = "push the puck to the goal"
NO_STATE = TopicConfig(state_topic=None)
LAUNCH_FILE = REPO_ROOT / "launch" / "replay_eval.launch.py"


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


def _frames(seed: int, height: int = 48, width: int = 64) -> np.ndarray:
    # Very different frames (dark / bright / noisy halves) so that the policy's outputs differ.
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (FRAMES, height, width, 3), dtype=np.uint8)
    frames[::3] //= 4
    frames[1::3, : height // 2] = 255
    return frames


def _first_steps(policy: Policy, images: np.ndarray) -> np.ndarray:
    return np.stack([policy.predict(image, INSTRUCTION).actions[0] for image in images]).astype(np.float64)


def _replay(args: list, work: Path, timeout: float = 120.0) -> subprocess.CompletedProcess:
    env = node_environment(reserve_domain(), work / "ros_log")
    return subprocess.run([sys.executable, "-m", "actdistill_ros.ros.replay_eval", *map(str, args)], cwd=REPO_ROOT,
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
        assert section["frames_dropped"] == section["frames_published"] - section["chunks_received"]
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
    assert report["rate"] == "max" and report["bags"][0]["encoding"] == "rgb8"
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
    assert report["bags"][0]["camera_type"] == "sensor_msgs/msg/CompressedImage"
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
    assert report["rate"] == 1.0 and report["bags"][0]["encoding"] == "bgr8"
    assert report["bags"][0]["resolution"] == "40x30"
    assert section["frames_published"] == FRAMES
    assert section["messages_published"] == FRAMES * 2 + 1  # frames, states, one latched command
    # Recorded timing: 12 frames at 10 Hz take about 1.1 s of replay, not the milliseconds of --rate max.
    assert section["replay_seconds"] >= 1.0
    assert section["chunks_received"] >= FRAMES // 2 and section["action_error"]["frames_compared"] > 0
    assert section["action_error"]["overall"]["mse"] > 0.05  # uniform random recording vs an untrained policy
    assert "frames are 40x30" in result.stderr
    assert time.monotonic() - started < 60


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
    code = replay_eval.main([str(bag), "--weights", str(policies["student"]), "--out", str(out)])
    stderr = capfd.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code != 0
    assert len(lines) == 1 and str(bag) in lines[0] and expected in lines[0], lines
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [bag.name]


def _listen_only_replay(weights: Path, bag: Path, tmp_path: Path, after_frame=None):
    """What the launch file does with `ros2 bag play`: node + replay_eval --listen-only, a third process (this
    one) plays the bag. ``after_frame(player, frame_index, raw)`` runs after each camera frame is published.
    Returns (replay_eval's CompletedProcess, the ActionChunks seen on the node's topic)."""
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from rosbags.rosbag2 import Reader
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    domain = reserve_domain()
    node = start_policy_node(weights, domain, tmp_path / "node",
                             params={"enable_output": False, "state.enabled": False})
    out = tmp_path / "report"
    env = node_environment(domain, tmp_path / "replay_log")
    stderr_path = tmp_path / "replay_stderr.txt"
    with stderr_path.open("w") as stderr:
        replay = subprocess.Popen([sys.executable, "-m", "actdistill_ros.ros.replay_eval", str(bag), "--weights",
                                   str(weights), "--listen-only", "--attach", "policy_node", "--out",
                                   str(out), "--idle-timeout", "2.0", "--startup-timeout", "60"], cwd=REPO_ROOT,
                                  env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    player = RosSide(domain, "player")
    chunks = player.record(load_action_chunk_type(), "/policy_node/action_chunk", QoSProfile(
        depth=50, reliability=ReliabilityPolicy.RELIABLE))
    try:
        assert wait_until(lambda: "listening on" in stderr_path.read_text() or replay.poll() is not None, 60.0)
        assert replay.poll() is None, stderr_path.read_text()[-3000:]
        camera = player.node.create_publisher(Image, "/camera/image_raw", QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE))
        command = player.node.create_publisher(String, "/instruction", QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        assert wait_until(lambda: camera.get_subscription_count() >= 2, 30.0)  # the node and replay_eval
        # This side seeing the subscriptions does not mean the best-effort readers have matched this
        # writer yet; like the launch file's play_delay, give discovery a moment before playing.
        time.sleep(1.0)
        with Reader(bag) as reader:  # raw CDR at the recorded timing, as ros2 bag play does
            start_wall, start_bag, frame_index = time.monotonic(), None, 0
            for conn, stamp, raw in reader.messages():
                start_bag = stamp if start_bag is None else start_bag
                time.sleep(max(0.0, start_wall + (stamp - start_bag) / 1e9 - time.monotonic()))
                if conn.topic == "/instruction":
                    command.publish(bytes(raw))
                elif conn.topic == "/camera/image_raw":
                    camera.publish(bytes(raw))
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
            stamp = replay_eval._header_stamp_ns(raw)
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


def test_launch_file_runs_listen_only_replay_beside_ros2_bag_play():
    tree = ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))
    constants = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)}
    declared = {ast.literal_eval(call.args[0]) for call in _calls(tree, "DeclareLaunchArgument")}
    used = {ast.literal_eval(call.args[0]) for call in _calls(tree, "LaunchConfiguration")}
    assert declared == used
    commands = []
    for call in _calls(tree, "ExecuteProcess"):
        cmd = next(k.value for k in call.keywords if k.arg == "cmd")
        # Launch arguments become placeholders; the rest of the command line is literal.
        commands.append([ast.literal_eval(e) if isinstance(e, ast.Constant) else constants.get(getattr(e, "id", None), "/x")
                         for e in cmd.elts])
    replay_cmd = next(c for c in commands if c[:4] == ["ros2", "run", "actdistill_ros", "replay_eval"])
    assert any(c[:3] == ["ros2", "bag", "play"] for c in commands)
    args = replay_eval.build_parser().parse_args(replay_cmd[4:])
    assert args.listen_only and args.attach == "policy_node"
    node = _calls(tree, "Node")[0]
    parameters = next(k.value for k in node.keywords if k.arg == "parameters")
    names = {ast.literal_eval(key) for d in parameters.elts if isinstance(d, ast.Dict) for key in d.keys}
    assert "enable_output" in names  # a replay never commands a robot
