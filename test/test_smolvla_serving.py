"""Serving a LeRobot SmolVLA: ``Policy.load`` on a LeRobot policy directory (the committed tiny
fixtures, made by LeRobot itself) gives exactly the actions ``actdistill predict`` gives on the same
inputs; the card made from the directory's files (cameras, units that force action.scale, bounds
from the statistics, a sidecar, the training dataset's names) is what the launch side reads too,
without torch; and a real policy node process serves the two-camera teacher over DDS: dry run with
ActionChunk and RouterStats, the router dial, then joint_state commands once enabled."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from actdistill_ros.cli import main as cli
from actdistill_ros.control.limits import ActionLimits, LimitSettings
from actdistill_ros.lerobot_card import camera_topic
from actdistill_ros.policy import Policy
from actdistill_ros.ros.launch_arguments import camera_topics, card_dry_run_action_scale, read_card_json
from actdistill_ros.weights import ActionSpace, WeightsError

FIXTURES = Path(__file__).parent / "fixtures" / "lerobot"
PROCESSOR = FIXTURES / "processor"
TASK = "pick up the red cube and place it in the bowl"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def served_dir(tmp_path: Path, case: str = "cross_attn") -> Path:
    """The fixture's LeRobot directory with the VLM's config and tokenizer in its vlm_processor/ (the
    node has no --vlm-processor; the Hugging Face cache would serve as well)."""
    info = json.loads((FIXTURES / case / "case.json").read_text())
    directory = tmp_path / case
    shutil.copytree(FIXTURES / case / "policy", directory)
    shutil.copytree(FIXTURES / info["vlm_processor"], directory / "vlm_processor")
    return directory


def frames_for(directory: Path, seed: int = 0) -> list[np.ndarray]:
    config = json.loads((directory / "config.json").read_text())
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (f["shape"][1], f["shape"][2], 3), dtype=np.uint8)
            for key, f in config["input_features"].items()
            if f["type"] == "VISUAL" and "empty_camera" not in key]


@pytest.mark.parametrize("case", ["cross_attn", "variants", "self_attn", "bf16_vlm"])
def test_policy_load_predicts_what_actdistill_predict_does(tmp_path, case):
    directory = served_dir(tmp_path, case)
    policy = Policy.load(directory, device="cpu")
    config = json.loads((directory / "config.json").read_text())
    frames = frames_for(directory)
    state = np.random.default_rng(1).normal(size=config["input_features"]["observation.state"]["shape"]).astype(
        np.float32)
    out = policy.predict(frames, TASK, state)
    # The same observation in LeRobot's raw conventions: float [0, 1] CHW at each camera's size.
    batch = {key: (np.asarray(frame, np.float32) / 255).transpose(2, 0, 1)[None]
             for key, frame in zip(policy.card.camera_names, frames)}
    batch["observation.state"] = state[None]
    import torch
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}, str(tmp_path / "in.safetensors"))
    assert cli(["predict", "--policy", str(directory), "--batch", str(tmp_path / "in.safetensors"), "--task", TASK,
                "--vlm-processor", str(directory / "vlm_processor"), "--out", str(tmp_path / "out.safetensors")]) == 0
    expected = load_file(str(tmp_path / "out.safetensors"))["action"][0].numpy()
    # The node executes LeRobot's n_action_steps of each chunk; the noise is predict's default seed 0.
    assert out.actions.shape == (config["n_action_steps"], config["output_features"]["action"]["shape"][0])
    np.testing.assert_array_equal(out.actions, expected[:config["n_action_steps"]])
    # Every routed layer runs for the teacher; the dial is accepted and changes nothing.
    assert policy.num_layers == config["num_vlm_layers"] - 1 and not policy.card.is_student
    assert out.executed_layers == list(range(policy.num_layers)) and out.executed_fraction == 1.0
    assert 0 < out.backbone_gflops == out.full_backbone_gflops < out.chunk_gflops
    policy.keep_fraction, policy.threshold = 0.5, 0.9
    again = policy.predict(frames, TASK, state)
    np.testing.assert_array_equal(again.actions, out.actions)  # a seeded generator per inference
    assert again.executed_fraction == 1.0
    other = policy.predict(frames_for(directory, seed=5), TASK, state)
    assert not np.array_equal(other.actions, out.actions)


def test_bad_frames_and_state_are_one_line(tmp_path):
    policy = Policy.load(served_dir(tmp_path), device="cpu")
    frames = frames_for(served_dir(tmp_path / "b"))
    with pytest.raises(ValueError, match=r"takes 2 camera image\(s\)"):
        policy.predict(frames[:1], TASK, np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="observation.images.top must be a uint8 RGB"):
        policy.predict([frames[0].astype(np.float32), frames[1]], TASK, np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="needs a robot state of 5 values"):
        policy.predict(frames, TASK, None)


def test_the_card_made_from_a_lerobot_directory(tmp_path):
    directory = served_dir(tmp_path, "self_attn")  # has an empty camera placeholder
    card = Policy.load(directory, device="cpu").card
    assert card.family == "smolvla" and card.kind == "teacher"
    assert card.camera_names == ["observation.images.top", "observation.images.wrist"]  # no empty_camera_0
    space = card.action_space
    assert space.kind == "joint" and space.names == [f"action_{i}" for i in range(6)]
    assert space.units == ["unknown"] * 6 and space.gripper_index is None
    stats = load_file(str(directory / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"))
    assert space.low == pytest.approx(stats["action.min"].tolist()) and space.high == pytest.approx(
        stats["action.max"].tolist())
    assert card.state_names == [] and card.state_dim == 5 and card.image_size == 64
    # The launch side reads the same card with json and numpy only, and maps keys to topics.
    assert read_card_json(directory)["camera_names"] == card.camera_names
    assert camera_topics("", str(directory)) == ["/top/image_raw", "/wrist/image_raw"]
    assert camera_topics("/a/image_raw,/b/image_raw", str(directory)) == ["/a/image_raw", "/b/image_raw"]
    assert card_dry_run_action_scale(directory) == {"action.scale": [1.0] * 6}
    code = ("import sys; from actdistill_ros.ros.launch_arguments import camera_topics, card_state_dim; "
            f"print(camera_topics('', {str(directory)!r}), card_state_dim({str(directory)!r}), 'torch' in sys.modules)")
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert printed.strip() == "['/top/image_raw', '/wrist/image_raw'] 5 False"


def test_camera_topics_of_card_names():
    assert camera_topic("observation.images.top") == "/top/image_raw"
    assert camera_topic("observation.images.cam.high-res") == "/cam_high_res/image_raw"
    assert camera_topic("observation.images.1") == "/camera_1/image_raw"
    assert camera_topic("/arm/wrist/compressed") == "/arm/wrist/compressed"


def test_sidecar_and_dataset_names_and_missing_statistics(tmp_path):
    directory = served_dir(tmp_path)
    joints = [f"j{i}" for i in range(6)]
    root = tmp_path / "dataset"
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps({"features": {
        "action": {"dtype": "float32", "shape": [6], "names": joints},
        "observation.state": {"dtype": "float32", "shape": [5], "names": joints[:5]}}}))
    (directory / "train_config.json").write_text(json.dumps({"dataset": {"repo_id": "me/demo", "root": str(root)}}))
    card = read_card_json(directory)
    assert card["action_space"]["names"] == joints and card["state_names"] == joints[:5]
    (directory / "card.json").write_text(json.dumps({"action_space": {"units": ["rad"] * 5 + ["1"], "gripper_index": 5},
                                                     "state_names": [f"s{i}" for i in range(5)]}))
    card = Policy.load(directory, device="cpu").card
    assert card.action_space.units == ["rad"] * 5 + ["1"] and card.action_space.gripper_index == 5
    assert card.state_names == [f"s{i}" for i in range(5)] and card.action_space.names == joints
    (directory / "card.json").write_text(json.dumps({"camera_names": ["/x"]}))
    with pytest.raises(WeightsError, match=r"card.json: unknown sidecar field\(s\) \['camera_names'\]"):
        Policy.load(directory, device="cpu")
    (directory / "card.json").unlink()
    # Without min/max statistics the bounds are infinite: the node's limits still work (clip, scale).
    pipeline = json.loads((directory / "policy_postprocessor.json").read_text())
    state_file = directory / pipeline["steps"][0]["state_file"]
    stats = load_file(str(state_file))
    save_file({k: v for k, v in stats.items() if not k.startswith("action.m") or k == "action.mean"}, str(state_file))
    space = ActionSpace.from_dict(read_card_json(directory)["action_space"])
    assert space.low == [-math.inf] * 6 and space.high == [math.inf] * 6
    with pytest.raises(ValueError, match="has unit 'unknown', which joint_state cannot command as rad or m: set "
                                         "action.scale"):
        ActionLimits.build("joint_state", space, LimitSettings(), 10.0)
    limits = ActionLimits.build("joint_state", space, LimitSettings(scale=(0.5,) * 6, position_low=(-1.0,) * 6), 10.0)
    physical = limits.to_physical(np.array([[4.0, -4.0, 0.0, 1.0, 2.0, -1.0]]))
    assert np.isfinite(physical).all() and physical[0].tolist() == [2.0, -1.0, 0.0, 0.5, 1.0, -0.5]


def test_a_missing_vlm_processor_says_where_to_put_it(tmp_path):
    directory = served_dir(tmp_path)
    shutil.rmtree(directory / "vlm_processor")
    with pytest.raises(WeightsError, match="not in the Hugging Face cache.*vlm_processor/"):
        Policy.load(directory, device="cpu")


# ---------------------------------------------------------------- the node, over DDS
def test_the_node_serves_the_two_camera_teacher(tmp_path):
    from ros_harness import (RosSide, Streamer, image_msg, load_router_stats_type, require_rclpy, reserve_domain,
                             start_policy_node)

    require_rclpy()
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import String

    RouterStats = load_router_stats_type()
    from actdistill_ros.msg import ActionChunk
    reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    sensor = QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
    directory = served_dir(tmp_path)
    joints = [f"arm_joint_{i}" for i in range(6)]
    (directory / "card.json").write_text(json.dumps({"action_space": {"names": joints},
                                                     "state_names": joints[:5]}))
    cameras = camera_topics("", str(directory))  # what policy.launch.py passes: /top/image_raw, /wrist/image_raw
    frames = frames_for(directory)

    # Units unknown: the node refuses to start until action.scale says what an action unit is.
    refused = start_policy_node(directory, reserve_domain(), tmp_path / "refused", params={
        "action.mode": "joint_state", "topics.cameras": cameras})
    assert refused.wait(timeout=90) != 0
    assert "has unit 'unknown', which joint_state cannot command as rad or m: set action.scale" in refused.output()

    domain = reserve_domain()
    ros = RosSide(domain)
    ros.node.create_publisher(String, "/instruction", latched).publish(String(data=TASK))
    clock = ros.node.get_clock()
    streamers = [Streamer(ros.node.create_publisher(Image, topic, sensor),
                          lambda frame=frame: image_msg(frame, stamp=clock.now().to_msg()), 8.0)
                 for topic, frame in zip(cameras, frames)]
    # Measured joints inside the card's bounds (the statistics' min/max): motion ramps from them.
    space = read_card_json(directory)["action_space"]
    measured = {name: (lo + hi) / 2 for name, lo, hi in zip(joints, space["low"], space["high"])}
    streamers.append(Streamer(ros.node.create_publisher(JointState, "/joint_states", sensor), lambda: JointState(
        name=joints, position=list(measured.values()), header=_header(clock)), 20.0))
    chunks = ros.record(ActionChunk, "/smol/action_chunk", reliable)
    stats = ros.record(RouterStats, "/smol/router_stats", reliable)
    commands = ros.record(JointState, "/arm/joint_command", reliable)
    process = start_policy_node(directory, domain, tmp_path / "node", node_name="smol", params={
        "action.mode": "joint_state", "topics.cameras": cameras, "topics.action": "/arm/joint_command",
        "topics.action_chunk": "/smol/action_chunk", "topics.router_stats": "/smol/router_stats",
        "action.scale": [1.0] * 6, "action.max_joint_velocity": [0.5], "control_rate_hz": 20.0,
        "watchdog.max_image_age_s": 1.0, "watchdog.max_state_age_s": 1.0})
    try:
        for streamer in streamers:
            streamer.resume()
        found = stats.wait_for(count=3, timeout=90.0)
        assert found, process.output()[-3000:]
        assert all(m.num_layers == 3 and m.executed_fraction == 1.0 and list(m.executed_layers) == [0, 1, 2]
                   for m in found)
        assert found[-1].backbone_gflops == found[-1].full_backbone_gflops > 0
        chunk = chunks.wait_for(timeout=20.0)[-1]
        assert list(chunk.names) == joints and list(chunk.units) == ["unknown"] * 6
        actions = np.asarray(chunk.actions).reshape(-1, 6)
        assert actions.shape[0] == 8 and np.isfinite(actions).all()  # n_action_steps of the fixture
        # The same frames through Policy.load (in this process): the node's chunk, within the bounds.
        policy = Policy.load(directory, device="cpu")
        state = np.array([measured[name] for name in joints[:5]], np.float32)
        expected = policy.predict(frames, TASK, state).actions
        low, high = np.array(policy.card.action_space.low), np.array(policy.card.action_space.high)
        np.testing.assert_allclose(actions, np.clip(expected, low, high), atol=1e-5)
        assert not commands.messages(), "a dry run commanded the arm"
        # The router dial is accepted; the teacher still runs every layer.
        since = time.monotonic()
        assert all(r.successful for r in ros.set_parameters("smol", {"router.keep_fraction": 0.5}))
        assert stats.wait_for(lambda m: abs(m.keep_fraction - 0.5) < 1e-6 and m.executed_fraction == 1.0,
                              since=since, timeout=30.0), process.output()[-3000:]
        # Enabled: joint_state commands, ramping from the measured joints within the velocity limit.
        since = time.monotonic()
        assert all(r.successful for r in ros.set_parameters("smol", {"enable_output": True}))
        moved = commands.wait_for(since=since, count=5, timeout=30.0)
        assert moved, process.output()[-3000:]
        assert list(moved[0].name) == joints
        start = np.array(list(measured.values()))
        assert np.abs(np.asarray(moved[0].position) - start).max() <= 0.5 / 20.0 + 1e-9
    finally:
        for streamer in streamers:
            streamer.close()
        code = process.stop()
        ros.close()
    assert code == 0, process.output()[-3000:]


def _header(clock):
    from std_msgs.msg import Header

    return Header(stamp=clock.now().to_msg())


# ---------------------------------------------------------------- a routed SmolVLA student
def student_dir(tmp_path: Path) -> Path:
    """A SmolVLA student directory as ``actdistill distill`` writes it (LeRobot's files, the router,
    a card of family smolvla, vlm_processor/), its router input-dependent so that routes differ."""
    import torch

    from actdistill_ros.lerobot_card import synthesize_card
    from actdistill_ros.policies.actdistill import RouterConfig
    from actdistill_ros.policies.smolvla import SmolVLAPolicy
    from actdistill_ros.policies.smolvla.routing_smolvla import RoutedSmolVLA

    directory = served_dir(tmp_path, "cross_attn")
    teacher = SmolVLAPolicy.load(directory, directory / "vlm_processor")
    routed = RoutedSmolVLA.derive_from(teacher.model, RouterConfig())
    torch.manual_seed(0)
    torch.nn.init.normal_(routed.router.gate.weight, std=0.05)
    save_file({k: v.detach().contiguous() for k, v in routed.router.state_dict().items()},
              str(directory / "router.safetensors"))
    card = synthesize_card(directory)
    card.update(kind="student", router_config=routed.router_config.to_dict(), default_keep_fraction=0.67,
                default_threshold=0.5)
    card["vla_config"].update(num_layers=teacher.model.num_vlm_layers,
                              routing={"kv_mode": "project", "routed_layers": routed.num_routed_layers})
    (directory / "card.json").write_text(json.dumps(card))
    return directory


def test_policy_load_serves_a_student_and_its_dial(tmp_path):
    directory = student_dir(tmp_path)
    policy = Policy.load(directory, device="cpu")
    teacher = Policy.load(served_dir(tmp_path / "teacher"), device="cpu")
    assert policy.card.is_student and policy.num_layers == 3 and policy.keep_fraction == pytest.approx(0.67)
    assert policy.card.num_layers == 3  # what RouterStats count, whatever the card gives (the VLM's 4 here)
    frames, state = frames_for(directory), np.zeros(5, np.float32)
    policy.keep_fraction = 1.0
    full = policy.predict(frames, TASK, state)
    # Every layer kept: the teacher's computation, the same chunk.
    np.testing.assert_array_equal(full.actions, teacher.predict(frames, TASK, state).actions)
    assert full.executed_layers == [0, 1, 2] and full.backbone_gflops == full.full_backbone_gflops
    for keep, count in ((0.67, 2), (0.34, 1)):
        policy.keep_fraction = keep
        out = policy.predict(frames, TASK, state)
        assert len(out.executed_layers) == count and out.executed_fraction == pytest.approx(count / 3)
        assert out.backbone_gflops < full.backbone_gflops and out.full_backbone_gflops == full.full_backbone_gflops
        assert out.chunk_gflops < full.chunk_gflops and len(out.gates) == 3
        assert not np.array_equal(out.actions, full.actions)
    policy.keep_fraction, policy.threshold = 0.0, 1.0  # threshold routing: a gate never reaches 1
    assert policy.predict(frames, TASK, state).executed_layers == []
    with pytest.raises(ValueError, match="keep_fraction must be a number in"):
        policy.keep_fraction = 1.5


def test_the_node_routes_the_student_by_ros2_param_set(tmp_path):
    from ros_harness import (RosSide, Streamer, image_msg, load_router_stats_type, require_rclpy, reserve_domain,
                             start_policy_node)

    require_rclpy()
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import Header, String

    RouterStats = load_router_stats_type()
    reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    sensor = QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
    directory = student_dir(tmp_path)
    cameras = camera_topics("", str(directory))
    domain = reserve_domain()
    ros = RosSide(domain)
    ros.node.create_publisher(String, "/instruction", latched).publish(String(data=TASK))
    clock = ros.node.get_clock()
    streamers = [Streamer(ros.node.create_publisher(Image, topic, sensor),
                          lambda frame=frame: image_msg(frame, stamp=clock.now().to_msg()), 8.0)
                 for topic, frame in zip(cameras, frames_for(directory))]
    streamers.append(Streamer(ros.node.create_publisher(JointState, "/joint_states", sensor), lambda: JointState(
        position=[0.0] * 5, header=Header(stamp=clock.now().to_msg())), 20.0))
    stats = ros.record(RouterStats, "/student/router_stats", reliable)
    process = start_policy_node(directory, domain, tmp_path / "node", node_name="student", params={
        "action.mode": "joint_state", "topics.cameras": cameras, "topics.router_stats": "/student/router_stats",
        "action.scale": [1.0] * 6, "watchdog.max_image_age_s": 1.0, "watchdog.max_state_age_s": 1.0})
    try:
        for streamer in streamers:
            streamer.resume()
        found = stats.wait_for(count=2, timeout=90.0)
        assert found, process.output()[-3000:]
        assert found[-1].num_layers == 3 and len(found[-1].executed_layers) == 2  # the card's keep 0.67
        assert "student (3 layers, chunk 8)" in process.output()
        for keep, count in ((1.0, 3), (0.34, 1)):
            since = time.monotonic()
            assert all(r.successful for r in ros.set_parameters("student", {"router.keep_fraction": keep}))
            found = stats.wait_for(lambda m: abs(m.keep_fraction - keep) < 1e-6, since=since, timeout=30.0)
            assert found and len(found[-1].executed_layers) == count, process.output()[-3000:]
            assert found[-1].backbone_gflops <= found[-1].full_backbone_gflops
        since = time.monotonic()
        assert all(r.successful for r in ros.set_parameters("student", {"router.keep_fraction": 0.0,
                                                                        "router.threshold": 1.0}))
        found = stats.wait_for(lambda m: m.keep_fraction == 0.0 and m.threshold == 1.0, since=since, timeout=30.0)
        assert found and list(found[-1].executed_layers) == [], process.output()[-3000:]
    finally:
        for streamer in streamers:
            streamer.close()
        code = process.stop()
        ros.close()
    assert code == 0, process.output()[-3000:]


def test_bench_takes_a_smolvla_directory(tmp_path, capsys):
    directory = served_dir(tmp_path, "cross_attn")
    assert cli(["bench", "--teacher", str(directory), "--device", "cpu", "--iters", "1", "--warmup", "0",
                "--keep-fractions", "1.0", "0.34", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_vlm_layers"] == 4 and result["num_cameras"] == 2 and result["image_hw"] == [[24, 40], [72, 50]]
    full, routed = result["by_keep_fraction"]
    assert (full["routed_layers_run"], routed["routed_layers_run"]) == (3, 1)
    assert routed["prefix_gflops"] < full["prefix_gflops"] and routed["expert_gflops"] == full["expert_gflops"]
    with pytest.raises(ValueError, match="static routes are baselines"):
        from actdistill_ros.policy import StaticRoute
        Policy.load(directory, device="cpu").static_route = StaticRoute("first", 0.5, 3)
