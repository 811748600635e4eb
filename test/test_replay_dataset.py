"""`actdistill replay-eval` of LeRobotDataset v3 episodes: a dataset written here (two cameras of
different sizes, three episodes sharing one parquet file and one video per camera, AV1 where this
PyAV has it), a tiny teacher trained on it by `actdistill train-teacher`, real policy_node
subprocesses over Fast DDS on loopback.

The episode's frames go out as a robot's drivers would publish them, through the bags' player, node
and report. The report's action error is checked against the one computed here: the policy run in
this process on the episode's frames (whose positions in the video are read back from their pixels,
so a frame published at the wrong time would not match), its state and its task, clamped as the node
clamps; with two cameras and a state, a zero mismatch also proves that every chunk came from the
right frame of each camera and the right state. Without a node, the messages of an episode of a
dataset LeRobot itself recorded (a video camera and an image camera) are decoded back and compared
with its frames, state, task and timestamps.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ros_harness import REPO_ROOT, node_environment, require_rclpy, reserve_domain

require_rclpy()  # skips on a machine without ROS 2; fails instead with ACTDISTILL_REQUIRE_ROS=1

from lerobot_dataset_writer import CAMERAS, frame_number, write_lerobot_dataset  # noqa: E402

from actdistill_ros.cli import main as cli  # noqa: E402
from actdistill_ros.data import TopicConfig  # noqa: E402
from actdistill_ros.data.bag_writer import jazzy_typestore  # noqa: E402
from actdistill_ros.data.lerobot_dataset import LeRobotDatasetReader  # noqa: E402
from actdistill_ros.lerobot_card import camera_topic  # noqa: E402
from actdistill_ros.policy import Policy, create_untrained_policy  # noqa: E402
from actdistill_ros.replay_report import PLOTS, REPORT_JSON, REPORT_MD  # noqa: E402
from actdistill_ros.ros.replay import cli as replay_cli  # noqa: E402
from actdistill_ros.ros.replay import dataset_episode  # noqa: E402
from actdistill_ros.weights import ActionSpace, load_card  # noqa: E402

LENGTHS = (10, 12, 14)
FPS = 10
# Recorded by LeRobot 0.4.4 itself; its wrist camera is stored as PNG images in the data file, the top one as video.
LEROBOT_MADE_IMAGES = Path(__file__).parent / "fixtures" / "lerobot_dataset_v3_image"
# A tiny SmolVLA made by LeRobot itself (random weights; cameras top 40x24 and wrist 50x72, state 5,
# action 6) and the tokenizer/processor files of its VLM.
LEROBOT_SMOLVLA = Path(__file__).parent / "fixtures" / "lerobot" / "cross_attn" / "policy"
SMOLVLA_PROCESSOR = Path(__file__).parent / "fixtures" / "lerobot" / "processor"
TOP, WRIST = CAMERAS  # observation.images.top (64x48), observation.images.wrist (40x32)
# As LeRobot's arms record them: the state and the action name the same joints. The policy node, in
# joint_state mode for a joint card, takes the measured arm joints from the state's JointState by these names.
JOINTS = ["shoulder_pan.pos", "shoulder_lift.pos", "elbow_flex.pos", "gripper.pos"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("lerobot") / "tiny_arm_demos"
    return root, write_lerobot_dataset(root, LENGTHS, fps=FPS, action_names=JOINTS, state_names=JOINTS)


@pytest.fixture(scope="module")
def teacher_dir(dataset, tmp_path_factory) -> Path:
    """A tiny teacher trained on the dataset: its card names the dataset's cameras, state and actions."""
    out = tmp_path_factory.mktemp("teacher_run")
    assert cli(["train-teacher", "--data", str(dataset[0]), "--out", str(out), "--size", "tiny", "--steps", "6",
                "--batch-size", "8", "--val-fraction", "0.34", "--checkpoint-every", "100", "--device", "cpu"]) == 0
    return out / "teacher"


@pytest.fixture(scope="module")
def student_dir(teacher_dir, tmp_path_factory) -> Path:
    """A routed student that takes what the teacher takes (untrained: only its routing matters here)."""
    card = Policy.load(teacher_dir, device="cpu").card
    return create_untrained_policy(tmp_path_factory.mktemp("student") / "student", size="tiny", student=True,
                                   keep=0.5, action_space=card.action_space, state_dim=len(JOINTS),
                                   camera_names=[TOP, WRIST])


def _replay(args: list, work: Path, timeout: float = 180.0) -> subprocess.CompletedProcess:
    env = node_environment(reserve_domain(), work / "ros_log")
    return subprocess.run([sys.executable, "-m", "actdistill_ros.cli", "replay-eval", *map(str, args)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _report(result: subprocess.CompletedProcess, out: Path) -> dict:
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == sorted([REPORT_JSON, REPORT_MD, *PLOTS.values()])
    for name in PLOTS.values():
        assert (out / name).read_bytes().startswith(b"\x89PNG"), name
    assert "LeRobotDataset episodes" in (out / REPORT_MD).read_text()
    return json.loads((out / REPORT_JSON).read_text())


def _expected_first_steps(policy: Policy, root: Path, written: dict, episode: int) -> np.ndarray:
    """Step 0 of the policy's chunk at each frame of ``episode``, from the frames at the dataset's own size
    (the node resizes them as Policy.predict does), the recorded state and the task, clamped like the node."""
    reader = LeRobotDatasetReader(root)
    entry = reader.episode(episode)
    timestamps = reader.read_rows(entry)["timestamps"]
    views = [reader.decode_video(key, entry, timestamps) for key in (TOP, WRIST)]
    start = written["starts"][episode]
    for view in views:  # each frame is the one recorded at its timestamp (its position in the video file)
        assert [frame_number(image) for image in view] == list(range(start, start + LENGTHS[episode]))
    space = policy.card.action_space
    states, task = written["states"][episode], written["tasks"][episode]
    return np.stack([np.clip(policy.predict([views[0][t], views[1][t]], task, states[t]).actions[0], space.low,
                             space.high) for t in range(LENGTHS[episode])]).astype(np.float64)


def _check_error(section: dict, expected: np.ndarray, recorded: np.ndarray, names: list[str]) -> None:
    error = section["action_error"]
    assert error["frames_compared"] == len(expected)
    expected_mse = ((expected - recorded) ** 2).mean(axis=0)
    expected_mae = np.abs(expected - recorded).mean(axis=0)
    for i, name in enumerate(names):
        assert error["per_dimension"][name]["mse"] == pytest.approx(expected_mse[i], rel=1e-5, abs=1e-9), name
        assert error["per_dimension"][name]["mae"] == pytest.approx(expected_mae[i], rel=1e-5, abs=1e-9), name


def test_an_episode_replays_frame_by_frame_with_the_action_error_computed_here(dataset, teacher_dir, tmp_path):
    root, written = dataset
    episode = 1
    out = tmp_path / "report"
    result = _replay([root, "--episode", episode, "--weights", teacher_dir, "--rate", "max", "--out", out,
                      "--device", "cpu"], tmp_path)
    report = _report(result, out)
    frames = LENGTHS[episode]
    entry, = report["bags"]
    topics = ["/top/image_raw", "/wrist/image_raw"]  # observation.images.<name> -> /<name>/image_raw
    assert [camera_topic(key) for key in CAMERAS] == topics
    assert (entry["path"], entry["episode"], entry["tasks"]) == (str(root), episode, [written["tasks"][episode]])
    assert entry["storage"] == "LeRobotDataset v3.0" and entry["frames_with_recorded_action"] == frames
    assert [(c["topic"], c["feature"], c["type"], c["encoding"], c["resolution"], c["frames"]) for c in entry["cameras"]] \
        == [(topics[0], TOP, "sensor_msgs/msg/Image", "rgb8", "64x48", frames),
            (topics[1], WRIST, "sensor_msgs/msg/Image", "rgb8", "40x32", frames)]
    assert entry["state_topic"] == "/joint_states"  # the teacher takes the state

    section = report["policies"]["student"]
    assert section["frames_published"] == section["chunks_received"] == frames  # --rate max: none dropped
    for topic in topics:
        assert section["cameras"][topic] == {"frames_published": frames, "frames_used": frames, "frames_dropped": 0,
                                             "older_frame_used": 0}, topic
    # A chunk per frame, the command once (one task), a state and two images per frame.
    assert section["messages_published"] == frames * 3 + 1
    assert section["latency_ms"]["node_camera_to_action"]["p50"] > 0
    assert section["executed_fraction"] == {"mean": 1.0, "min": 1.0, "max": 1.0}  # a teacher runs every layer
    assert f"student: {frames} frames, {frames} chunks" in result.stdout
    assert "is not measured" not in result.stderr  # the state names the arm joints

    policy = Policy.load(teacher_dir, device="cpu")
    assert policy.card.state_names == JOINTS  # the node picks the state from JointState by these names
    expected = _expected_first_steps(policy, root, written, episode)
    _check_error(section, expected, written["actions"][episode].astype(np.float64), JOINTS)
    assert section["action_error"]["overall"]["mse"] > 1e-3  # an untrained-enough teacher: the check can fail


def test_two_episodes_at_the_recorded_fps_on_given_camera_topics_with_a_teacher(dataset, teacher_dir, student_dir,
                                                                                tmp_path):
    root, written = dataset
    episodes, rate = [2, 0], 2.0
    topics = ["/arm/top_camera/image_raw", "/arm/wrist_camera/image_raw"]
    out = tmp_path / "report"
    started = time.monotonic()
    result = _replay([root, "--episode", episodes[0], "--episode", episodes[1], "--weights", student_dir,
                      "--teacher", teacher_dir, "--camera-topic", topics[0], "--camera-topic", topics[1],
                      "--command-topic", "/task", "--state-topic", "/arm/joint_states", "--rate", rate,
                      "--out", out, "--device", "cpu"], tmp_path)
    elapsed = time.monotonic() - started
    report = _report(result, out)
    assert [(b["episode"], [c["topic"] for c in b["cameras"]], b["state_topic"]) for b in report["bags"]] == [
        (e, topics, "/arm/joint_states") for e in episodes]
    assert report["rate"] == rate
    frames = sum(LENGTHS[e] for e in episodes)
    student, teacher = report["policies"]["student"], report["policies"]["teacher"]
    for section in (student, teacher):
        assert section["frames_published"] == frames and section["chunks_received"] > 0
        assert list(section["cameras"]) == topics
        assert all(c["frames_published"] == frames for c in section["cameras"].values())
        # Recorded timing: each episode lasts (length - 1) / fps s, played at twice the speed.
        assert section["replay_seconds"] >= sum((LENGTHS[e] - 1) / FPS for e in episodes) / rate * 0.95
    assert 0.0 < student["executed_fraction"]["mean"] < 1.0
    assert report["student_vs_teacher"]["frames_compared"] > 0
    assert elapsed < 150


def test_a_lerobot_smolvla_replays_an_episode_of_a_dataset_with_its_features(tmp_path):
    """The issue's command with a user's own LeRobot policy directory: replay-eval ROOT --episode N
    --weights <SmolVLA dir>, the card made from the directory's files, its cameras on /<name>/image_raw."""
    policy = tmp_path / "my_smolvla"
    shutil.copytree(LEROBOT_SMOLVLA, policy)
    shutil.copytree(SMOLVLA_PROCESSOR, policy / "vlm_processor")  # offline: the directory's own VLM processor
    root = tmp_path / "smolvla_demos"
    lengths = (6, 9)
    write_lerobot_dataset(root, lengths, fps=FPS, cameras={TOP: (24, 40), WRIST: (72, 50)},
                          action_names=[f"joint_{i}" for i in range(6)], state_names=[f"joint_{i}" for i in range(5)])
    out = tmp_path / "report"
    result = _replay([root, "--episode", 1, "--weights", policy, "--rate", "max", "--out", out, "--device", "cpu"],
                     tmp_path)
    report = _report(result, out)
    section = report["policies"]["student"]
    # Its card names the actions action_0..5 (no dataset named them): the node in joint_state mode finds no
    # measured joints of those names and holds; the replay says so, and reports no node figure.
    assert result.stderr.count("node_camera_to_action) is not measured") == 1
    assert section["latency_ms"]["node_camera_to_action"]["n"] == 0
    assert section["kind"] == "teacher" and section["frames_published"] == section["chunks_received"] == lengths[1]
    assert section["action_error"]["frames_compared"] == lengths[1]
    assert [(topic, c["frames_used"]) for topic, c in section["cameras"].items()] == [
        ("/top/image_raw", lengths[1]), ("/wrist/image_raw", lengths[1])]
    assert len(section["layer_usage"]) == 3 and section["executed_fraction"]["min"] == 1.0  # its 3 VLM text layers


def _one_line_failure(capfd, argv: list) -> str:
    capfd.readouterr()
    assert replay_cli.main([str(a) for a in argv]) == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, lines
    return lines[0]


def test_a_missing_episode_names_the_dataset_and_the_valid_range(dataset, teacher_dir, tmp_path, capfd):
    root, _ = dataset
    out = tmp_path / "report"
    line = _one_line_failure(capfd, [root, "--episode", 0, "--episode", 7, "--weights", teacher_dir, "--out", out])
    assert f"dataset {root}: no episode 7" in line and "indices 0..2" in line
    line = _one_line_failure(capfd, [root, "--weights", teacher_dir, "--out", out])
    assert f"dataset {root}" in line and "--episode" in line and "indices 0..2" in line
    assert not out.exists()


def test_a_dataset_the_policy_does_not_take_fails_with_one_line(dataset, teacher_dir, tmp_path, capfd):
    root, _ = dataset
    out = tmp_path / "report"
    other = create_untrained_policy(tmp_path / "six_actions", size="tiny", student=False, state_dim=len(JOINTS),
                                    camera_names=[TOP, WRIST],
                                    action_space=ActionSpace(kind="joint", names=[f"j{i}" for i in range(6)],
                                                             units=["rad"] * 6, low=[-1.0] * 6, high=[1.0] * 6))
    line = _one_line_failure(capfd, [root, "--episode", 0, "--weights", other, "--out", out])
    assert str(root / "meta" / "info.json") in line and "'action' has shape [4]" in line and "[6]" in line
    one_camera = create_untrained_policy(tmp_path / "one_camera", size="tiny", student=False, state_dim=len(JOINTS),
                                         action_space=Policy.load(teacher_dir, device="cpu").card.action_space)
    line = _one_line_failure(capfd, [root, "--episode", 0, "--weights", one_camera, "--out", out])
    assert "2 camera feature(s)" in line and "takes 1" in line
    swapped = create_untrained_policy(tmp_path / "wrist_first", size="tiny", student=False, state_dim=len(JOINTS),
                                      camera_names=[WRIST, TOP], action_space=Policy.load(teacher_dir).card.action_space)
    line = _one_line_failure(capfd, [root, "--episode", 0, "--weights", teacher_dir, "--teacher", swapped, "--out", out])
    assert f"{swapped} takes the cameras" in line and "separate runs" in line
    # Flags that only mean something for bags, and --camera-topic of the wrong count.
    line = _one_line_failure(capfd, [root, "--episode", 0, "--weights", teacher_dir, "--out", out,
                                     "--action-topic", "/action"])
    assert "--action-topic" in line and "rosbags only" in line
    line = _one_line_failure(capfd, [root, "--episode", 0, "--weights", teacher_dir, "--out", out,
                                     "--camera-topic", "/only/one"])
    assert "--camera-topic" in line and "2 camera(s)" in line
    assert not out.exists()


def test_an_episode_becomes_the_messages_a_robot_publishes(tmp_path, monkeypatch):
    """No node: the plan's messages, decoded back, are the episode's frames (a video camera and an image
    camera, decoded a few frames at a time), state and task at the episode's timestamps on the replay
    clock, in the policy's camera order, each frame set's first camera last."""
    root = LEROBOT_MADE_IMAGES
    reader = LeRobotDatasetReader(root)
    # The policy takes the wrist camera first and its actions in another order than the dataset's.
    names = ["gripper", "x", "y", "z"]
    weights = create_untrained_policy(tmp_path / "policy", size="tiny", student=False, state_dim=3,
                                      camera_names=[WRIST, TOP],
                                      action_space=ActionSpace(kind="joint", names=names, units=["rad"] * 4,
                                                               low=[-9.0] * 4, high=[9.0] * 4))
    monkeypatch.setattr(dataset_episode, "WINDOW_FRAMES", 4)  # several windows per episode
    origin = 1_800_000_000_000_000_000
    episodes = [2, 0]
    plans = dataset_episode.plan_dataset_episodes(root, episodes, [(weights, load_card(weights))], TopicConfig(),
                                                  None, origin_ns=origin)
    store = jazzy_typestore()
    types = {"/wrist/image_raw": "sensor_msgs/msg/Image", "/top/image_raw": "sensor_msgs/msg/Image",
             "/instruction": "std_msgs/msg/String", "/joint_states": "sensor_msgs/msg/JointState"}
    first_stamps = []
    for plan, index in zip(plans, episodes):
        entry = reader.episode(index)
        rows = reader.read_rows(entry)
        frames = {WRIST: reader.decode_images(WRIST, entry, rows["table"]),  # the whole episode at once
                  TOP: reader.decode_video(TOP, entry, rows["timestamps"])}
        stamps = origin + np.round(rows["timestamps"] * 1e6).astype(np.int64) * 1000
        if first_stamps:  # the second episode follows the first one, a second after its last frame
            stamps += plans[0].stamps_ns[-1] - origin + dataset_episode.EPISODE_GAP_NS
        first_stamps.append(int(stamps[0]))
        assert plan.camera_topics == ["/wrist/image_raw", "/top/image_raw"] and plan.camera_keys == [WRIST, TOP]
        np.testing.assert_array_equal(plan.recorded.stamps_ns, stamps)
        np.testing.assert_array_equal(plan.recorded.actions, rows["action"][:, [3, 0, 1, 2]])  # the policy's order
        messages = list(plan.messages())
        assert len(messages) == plan.message_count == entry.length * 3 + 1
        topic, _, raw = messages[0]
        assert topic == "/instruction" and store.deserialize_cdr(raw, types[topic]).data == entry.tasks[0]
        for t in range(entry.length):
            group = messages[1 + 3 * t: 4 + 3 * t]
            assert [m[0] for m in group] == ["/joint_states", "/top/image_raw", "/wrist/image_raw"]
            assert {m[1] for m in group} == {int(stamps[t])}  # published at the frame's time, stamped with it
            decoded = {topic: store.deserialize_cdr(raw, types[topic]) for topic, _, raw in group}
            state = decoded["/joint_states"]
            assert list(state.name) == reader.state_names
            np.testing.assert_array_equal(state.position, rows["state"][t])
            for topic, key in (("/wrist/image_raw", WRIST), ("/top/image_raw", TOP)):
                image = decoded[topic]
                assert image.header.stamp.sec * 1_000_000_000 + image.header.stamp.nanosec == stamps[t]
                assert (image.encoding, image.height, image.width, image.step) == (
                    "rgb8", *reader.features[key].image_hw, reader.features[key].image_hw[1] * 3)
                np.testing.assert_array_equal(np.asarray(image.data).reshape(frames[key][t].shape), frames[key][t])
    assert first_stamps[1] > plans[0].stamps_ns[-1]
