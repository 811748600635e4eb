"""Hugging Face backbones end to end, each step the command a user runs, as its own process:
two-camera rosbags (mcap and sqlite3) -> `actdistill train-teacher --backbone DIR` -> `actdistill
distill` -> the student in `policy_node` (real rclpy, Fast DDS on loopback) and in `actdistill
replay-eval`. HF_HUB_OFFLINE=1 throughout, with the hub endpoint pointed at a closed local port.

A tiny PaliGemma (`make-backbone`) goes through every step. A tiny Gemma3, a family no code of this
package names, goes through train-teacher, distill and replay-eval by the generic path with no
change (a family that did not fit would stop with one line; test_hf_vla.py checks that line).

The node's chunks are checked against the student run here on the frames they name (RouterStats
source_stamps): a chunk made from an older frame of either camera would not match. replay-eval must
use every frame of both cameras and report the action error computed here from the same frames.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ros_harness import (REPO_ROOT, RosSide, Streamer, image_msg, load_router_stats_type, node_environment,
                         require_rclpy, reserve_domain, start_policy_node)

require_rclpy()  # skips on a machine without ROS 2; fails instead with ACTDISTILL_REQUIRE_ROS=1

from test_hf_vla import _generic_backbone  # noqa: E402 - the tiny LLaVA / Gemma3 that no code here names

from actdistill_ros.cli import main as cli  # noqa: E402
from actdistill_ros.data.synthetic import STATE_NAMES, synthetic_camera_frames, write_synthetic_demos  # noqa: E402
from actdistill_ros.policy import Policy  # noqa: E402
from actdistill_ros.replay_report import REPORT_JSON  # noqa: E402

CAMERAS = ["/cam/scene", "/cam/wrist"]
CAMERA_FLAGS = [flag for camera in CAMERAS for flag in ("--camera-topic", camera)]
FRAMES = 10  # per episode
IMAGE_SIZE = 64  # the tiny backbones' input; the wrist camera records 80 px (synthetic camera_view)
MCAP_SEED, SQLITE_SEED = 0, 2  # episodes 0-1 are mcap bags, 2-3 sqlite3
LAYERS, KEEP = 8, 0.5  # the tiny PaliGemma's decoder depth; distill's default target keep
STUDENT_FILES = ["backbone/config.json", "backbone/tokenizer.json", "backbone/tokenizer_config.json", "card.json",
                 "model.safetensors"]
AGE = 0.5  # the node's watchdog ages (s)
MATCH_ATOL = 1e-6  # node vs this process, same student, same frames, one thread each: equal in practice


@pytest.fixture(scope="module", autouse=True)
def offline_single_thread():
    """Offline; one torch thread here and in every process started (tiny models run as fast on one, and
    one does not stall when other processes load the cores). Child processes inherit the environment."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a hub request that slipped through fails at once
        patch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("two_camera_bags")
    write_synthetic_demos(root, episodes=2, length=FRAMES, size=IMAGE_SIZE, storage="mcap", seed=MCAP_SEED,
                          cameras=CAMERAS)
    write_synthetic_demos(root, episodes=2, length=FRAMES, size=IMAGE_SIZE, storage="sqlite3", seed=SQLITE_SEED,
                          cameras=CAMERAS)
    return root


def _actdistill(work: Path, *args) -> subprocess.CompletedProcess:
    """`actdistill ARGS` as a process with the ROS environment (a private domain), which must succeed."""
    env = node_environment(reserve_domain(), work / "ros_log")
    result = subprocess.run([sys.executable, "-m", "actdistill_ros.cli", *map(str, args)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"actdistill {args[0]} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result


def _train_and_distill(backbone: Path, demos: Path, work: Path) -> Path:
    """train-teacher (a few steps) then distill (a few probe and stage-2 steps); the student directory."""
    _actdistill(work, "train-teacher", "--backbone", backbone, "--data", demos, *CAMERA_FLAGS, "--out",
                work / "teacher_run", "--train-vision", "--steps", 6, "--batch-size", 8, "--max-text-tokens", 8,
                "--chunk-size", 4, "--action-space", "metaworld", "--device", "cpu")
    _actdistill(work, "distill", "--teacher", work / "teacher_run" / "teacher", "--data", demos, *CAMERA_FLAGS,
                "--out", work / "distill_run", "--probe-steps", 3, "--distill-steps", 4, "--batch-size", 8,
                "--device", "cpu")
    return work / "distill_run" / "student"


def _check_student_directory(student_dir: Path, backbone_type: str, adapter: str) -> dict:
    files = sorted(str(p.relative_to(student_dir)) for p in student_dir.rglob("*") if p.is_file())
    assert files == STUDENT_FILES  # everything to rebuild it offline, no pickles
    card = json.loads((student_dir / "card.json").read_text())
    assert card["family"] == "hf_vla" and card["kind"] == "student" and card["camera_names"] == CAMERAS
    config = card["vla_config"]
    assert (config["backbone_type"], config["adapter"], config["num_cameras"]) == (backbone_type, adapter, 2)
    assert card["default_keep_fraction"] == KEEP
    return card


def _clamped_chunk(policy: Policy, images: list[np.ndarray], instruction: str, state) -> np.ndarray:
    """The student's chunk for one observation, clamped to the card's limits as the node does."""
    space = policy.card.action_space
    return np.clip(policy.predict(images, instruction, state).actions, space.low, space.high)


def _replay_and_check(student_dir: Path, bag: Path, seed: int, storage: str, work: Path) -> None:
    """`actdistill replay-eval` of one two-camera bag with the student: a chunk per frame set, every frame of
    both cameras used, and the error of the chunks' first steps against the recording equal to the error
    computed here from the same frames."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / "report"
    result = _actdistill(work, "replay-eval", bag, "--weights", student_dir, "--rate", "max", "--out", out,
                         "--device", "cpu")
    report = json.loads((out / REPORT_JSON).read_text())
    plan, = report["bags"]
    assert plan["storage"] == storage
    assert [(c["topic"], c["resolution"], c["frames"]) for c in plan["cameras"]] == [
        (CAMERAS[0], "64x64", FRAMES), (CAMERAS[1], "80x80", FRAMES)]
    section = report["policies"]["student"]
    assert section["frames_published"] == section["chunks_received"] == FRAMES  # --rate max: none dropped
    for camera in CAMERAS:
        assert section["cameras"][camera] == {"frames_published": FRAMES, "frames_used": FRAMES, "frames_dropped": 0,
                                              "older_frame_used": 0}, camera
    assert f"student: {FRAMES} frames, {FRAMES} chunks" in result.stdout
    policy = Policy.load(student_dir, device="cpu")
    assert section["executed_fraction"] == {"mean": KEEP, "min": KEEP, "max": KEEP}
    assert len(section["layer_usage"]) == policy.num_layers

    views, instruction, states, actions = synthetic_camera_frames(seed, FRAMES, IMAGE_SIZE, len(CAMERAS))
    first_steps = np.stack([_clamped_chunk(policy, [views[0][t], views[1][t]], instruction, states[t])[0]
                            for t in range(FRAMES)])
    error = section["action_error"]
    assert error["frames_compared"] == FRAMES
    expected_mse = ((first_steps - actions) ** 2).mean(axis=0)
    for i, name in enumerate(policy.card.action_space.names):
        assert error["per_dimension"][name]["mse"] == pytest.approx(expected_mse[i], rel=1e-5, abs=1e-9), name


# ---- PaliGemma, two cameras: train-teacher, distill, policy_node, replay-eval ----------------------------------
@pytest.fixture(scope="module")
def paligemma_student(demos, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("paligemma")
    assert cli(["make-backbone", "--family", "paligemma", "--size", "tiny", "--out", str(work / "backbone")]) == 0
    return _train_and_distill(work / "backbone", demos, work)


def test_paligemma_student_holds_its_backbone_and_both_cameras(paligemma_student):
    card = _check_student_directory(paligemma_student, "paligemma", "paligemma")
    assert card["vla_config"]["num_layers"] == LAYERS and card["vla_config"]["image_size"] == IMAGE_SIZE
    teacher = card["provenance"]["teacher_provenance"]
    assert teacher["trained_by"] == "actdistill train-teacher" and teacher["topics"]["cameras"] == CAMERAS
    assert Path(teacher["backbone"]).name == "backbone"


def test_policy_node_acts_on_both_cameras_and_holds_when_one_stops(paligemma_student, tmp_path):
    from geometry_msgs.msg import TwistStamped
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import String

    RouterStats = load_router_stats_type()
    from actdistill_ros.msg import ActionChunk
    from diagnostic_msgs.msg import DiagnosticArray

    reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
    sensor = QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    policy = Policy.load(paligemma_student, device="cpu")
    # Noise frames at other sizes than the model's: each frame moves the briefly trained student's actions.
    views = [np.random.default_rng(seed).integers(0, 256, (FRAMES, *shape, 3), dtype=np.uint8)
             for seed, shape in enumerate([(48, 64), (40, 40)])]
    instruction, state = "move right", np.array([0.4, 0.6, 0.0, 1.0])
    sent: dict[str, dict[int, tuple[int, float]]] = {camera: {} for camera in CAMERAS}  # stamp -> (frame, sent at)

    domain = reserve_domain()
    ros = RosSide(domain)
    streamers, node = [], None

    def ns(stamp) -> int:
        return stamp.sec * 10 ** 9 + stamp.nanosec

    def camera_frames(index: int):
        count = iter(range(10 ** 9))

        def make():
            frame = next(count) % FRAMES
            msg = image_msg(views[index][frame], stamp=ros.node.get_clock().now().to_msg())
            sent[CAMERAS[index]][ns(msg.header.stamp)] = (frame, time.monotonic())
            return msg
        return make

    def moving(msg) -> bool:
        return any(v != 0.0 for v in (msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z))

    def clamped_chunk(scene_frame: int, wrist_frame: int) -> np.ndarray:
        return _clamped_chunk(policy, [views[0][scene_frame], views[1][wrist_frame]], instruction, state)

    try:
        stats = ros.record(RouterStats, "/policy_node/router_stats", reliable)
        chunks = ros.record(ActionChunk, "/policy_node/action_chunk", reliable)
        twists = ros.record(TwistStamped, "/action", reliable)
        diagnostics = ros.record(DiagnosticArray, "/diagnostics", reliable)
        ros.node.create_publisher(String, "/instruction", latched).publish(String(data=instruction))
        scene, wrist = (Streamer(ros.node.create_publisher(Image, camera, sensor), camera_frames(i), rate)
                        for i, (camera, rate) in enumerate(zip(CAMERAS, (12.0, 9.0))))
        joints = Streamer(ros.node.create_publisher(JointState, "/joint_states", sensor),
                          lambda: JointState(name=STATE_NAMES, position=[float(v) for v in state]), 12.0)
        streamers = [scene, wrist, joints]
        node = start_policy_node(paligemma_student, domain, tmp_path, params={
            "topics.cameras": CAMERAS, "watchdog.max_image_age_s": AGE, "watchdog.max_state_age_s": AGE,
            "device": "cpu", "action.scale": [0.1, 0.1, 0.1, 1.0], "enable_output": True})
        for streamer in streamers:
            streamer.resume()

        # Both cameras feed every inference; each chunk is the student's on exactly the two frames it names.
        first = chunks.wait_for(count=3, timeout=90.0)
        assert first, node.output()[-3000:]
        assert twists.wait_for(moving, timeout=30.0), node.output()[-3000:]
        wanted = {ns(chunk.header.stamp) for chunk in first[:3]}
        infos = stats.wait_for(lambda m: ns(m.header.stamp) in wanted, count=3, timeout=15.0)
        assert infos, "no RouterStats for the first ActionChunks"
        by_stamp = {ns(m.header.stamp): m for m in infos}
        for chunk in first[:3]:
            info = by_stamp[ns(chunk.header.stamp)]
            scene_stamp, wrist_stamp = (ns(s) for s in info.source_stamps)
            assert scene_stamp == ns(chunk.header.stamp)
            scene_frame, wrist_frame = sent[CAMERAS[0]][scene_stamp][0], sent[CAMERAS[1]][wrist_stamp][0]
            got = np.asarray(chunk.actions).reshape(chunk.chunk_size, chunk.action_dim)
            right = np.abs(got - clamped_chunk(scene_frame, wrist_frame)).max()
            # What a node that paired an older frame of either camera would answer.
            wrong = min(np.abs(got - clamped_chunk((scene_frame - 1) % FRAMES, wrist_frame)).max(),
                        np.abs(got - clamped_chunk(scene_frame, (wrist_frame - 1) % FRAMES)).max())
            assert right <= MATCH_ATOL < 0.1 * wrong, (scene_frame, wrist_frame, right, wrong)
            assert (info.num_layers, len(info.executed_layers)) == (LAYERS, LAYERS * KEEP)
            assert info.keep_fraction == pytest.approx(KEEP) and info.executed_fraction == pytest.approx(KEEP)
            assert info.backbone_gflops == pytest.approx(KEEP * info.full_backbone_gflops)

        # The wrist camera stops, the scene camera goes on: the node holds, and runs none of the chunks it
        # still infers from the scene camera's new frames and the wrist camera's last one.
        paused_at = time.monotonic()
        wrist.pause()
        held = twists.wait_for(since=paused_at + AGE + 0.3, count=5, timeout=15.0)
        assert held and not any(moving(m) for m in held), node.output()[-3000:]
        hold = diagnostics.wait_for(lambda m: "/cam/wrist" in m.status[0].message, since=paused_at, timeout=10.0)
        assert hold, node.output()[-3000:]
        late = stats.wait_for(since=paused_at + AGE + 1.0, count=2, timeout=15.0)
        assert late, "the node stopped inferring on the scene camera while the wrist camera was stale"
        for msg in late:
            assert sent[CAMERAS[1]][ns(msg.source_stamps[1])][1] < paused_at + 0.5  # the stale wrist frame
            assert math.isnan(msg.camera_to_action_ms)  # never executed

        wrist.resume()
        assert twists.wait_for(moving, since=time.monotonic(), timeout=30.0), node.output()[-3000:]
    finally:
        for streamer in streamers:
            streamer.close()
        code = node.stop() if node is not None else 0
        ros.close()
    assert code == 0, f"node did not shut down cleanly on SIGINT (exit {code}):\n{node.output()[-3000:]}"


def test_replay_eval_of_a_two_camera_sqlite_bag_with_the_paligemma_student(paligemma_student, demos, tmp_path):
    _replay_and_check(paligemma_student, demos / f"episode_{SQLITE_SEED:04d}", SQLITE_SEED, "sqlite3", tmp_path)


# ---- a family no code names: train-teacher, distill, replay-eval, no code change --------------------------------
def test_an_unnamed_family_goes_through_train_teacher_distill_and_replay_eval(demos, tmp_path):
    backbone = _generic_backbone("gemma3", tmp_path / "backbone")  # sliding-window layers, per-layer-type rotary
    student = _train_and_distill(backbone, demos, tmp_path)
    _check_student_directory(student, "gemma3", "generic")
    _replay_and_check(student, demos / f"episode_{MCAP_SEED:04d}", MCAP_SEED, "mcap", tmp_path / "replay")
