"""Closed loop through ROS 2 (sim_arm_node + policy_node processes over Fast DDS) and `actdistill demo`.

A tiny untrained student drives the simulated arm: the figures are real (latency, executed
layers, success flag), not the success rate of a trained policy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import numpy as np
import pytest

if importlib.util.find_spec("metaworld") is None:
    pytest.skip("simulator extra not installed (requirements-sim.txt)", allow_module_level=True)
os.environ.setdefault("MUJOCO_GL", "egl")

from ros_harness import load_router_stats_type, require_rclpy  # noqa: E402

require_rclpy()  # skips on a machine without ROS 2; fails instead with ACTDISTILL_REQUIRE_ROS=1

from actdistill_ros import demo  # noqa: E402
from actdistill_ros.policy import Policy, create_untrained_policy  # noqa: E402
from actdistill_ros.ros.closed_loop import RosClosedLoop, RosLoopConfig, evaluate_through_ros  # noqa: E402
from actdistill_ros.sim.evaluate import run_episode  # noqa: E402
from actdistill_ros.sim.metaworld_env import MetaWorldTask, camera_topics  # noqa: E402
from actdistill_ros.weights import ActionSpace  # noqa: E402

HORIZON = 25
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    load_router_stats_type()  # the policy node needs the messages: skips (or fails) when not built
    root = tmp_path_factory.mktemp("weights")
    space = ActionSpace.metaworld()
    # An input-dependent router, so the executed layers are a measurement, not a constant.
    student = create_untrained_policy(root / "student", size="tiny", student=True, keep=0.5, action_space=space,
                                      state_dim=4, router_weight_std=0.5)
    teacher = create_untrained_policy(root / "teacher", size="tiny", student=False, action_space=space, state_dim=4)
    return student, teacher


def test_closed_loop_through_ros_matches_the_in_process_loop(weights, tmp_path):
    student, _ = weights
    card_size = Policy.load(student, device="cpu").card.image_size
    config = RosLoopConfig(student, "reach", card_size, HORIZON, device="cpu", log_dir=tmp_path / "logs")
    with RosClosedLoop(config) as loop:
        first = loop.run_episode("reach", 10003)
        again = loop.run_episode("reach", 10003)
        other = loop.run_episode("push", 10004)
    for episode in (first, again, other):
        outcome = episode.outcome
        assert isinstance(outcome.success, bool)
        assert outcome.steps == HORIZON or outcome.success
        # Lockstep: at least one inference per step, each answering its own frame. (A frame may be
        # re-sent when an answer is slower than sync.timeout_s on a loaded machine; the step still
        # waits for that frame's action, so the trajectory below is unaffected.)
        assert outcome.policy_calls >= outcome.steps
        assert len(episode.camera_to_action_ms) >= outcome.steps
        assert all(0.0 < ms < 5000.0 for ms in episode.camera_to_action_ms)
        assert 0.0 < outcome.executed_fraction <= 1.0
    assert other.outcome.task == "push" and other.status["instruction"] == "push the puck to the goal"
    # Deterministic: the same seed gives the same trajectory through DDS.
    assert first.status["hand_state"] == again.status["hand_state"]
    assert first.status["hand_state"] != other.status["hand_state"]

    # Same episode in this process (first action of each chunk, one inference per step): the
    # lockstep pairing of frame, state and the frame's ActionChunk must leave the trajectory unchanged.
    policy = Policy.load(student, device="cpu")
    with MetaWorldTask("reach", image_size=card_size, horizon=HORIZON, seed=10003) as task:
        outcome, _ = run_episode(policy, task, 10003, execute_steps=1)
        in_process_hand = task.state()
    assert outcome.steps == first.outcome.steps and outcome.success == first.outcome.success
    np.testing.assert_allclose(first.status["hand_state"], in_process_hand, atol=1e-4)


def test_two_cameras_through_ros_match_the_in_process_loop(tmp_path):
    """The sim arm publishes one topic per camera and the policy node takes both, in its card's order."""
    cameras = "corner4,topview"
    student = create_untrained_policy(tmp_path / "two", size="tiny", student=True, keep=0.5,
                                      action_space=ActionSpace.metaworld(), state_dim=4, router_weight_std=0.5,
                                      camera_names=camera_topics(cameras))
    card_size = Policy.load(student, device="cpu").card.image_size
    config = RosLoopConfig(student, "reach", card_size, 10, camera=cameras, device="cpu", log_dir=tmp_path / "logs")
    with RosClosedLoop(config) as loop:
        through_ros = loop.run_episode("reach", 10005)
    with MetaWorldTask("reach", image_size=card_size, horizon=10, camera=cameras, seed=10005) as task:
        start_hand = task.state().copy()
        outcome, _ = run_episode(Policy.load(student, device="cpu"), task, 10005, execute_steps=1)
        in_process_hand = task.state()
    assert through_ros.outcome.steps == outcome.steps and through_ros.outcome.policy_calls >= outcome.steps
    # The hand moved, along the same path: with the cameras swapped or one missing it would not.
    assert not np.allclose(in_process_hand, start_hand, atol=1e-3)
    np.testing.assert_allclose(through_ros.status["hand_state"], in_process_hand, atol=1e-4)


def test_eval_through_ros_writes_the_report(weights, tmp_path):
    student, _ = weights
    result, episodes = evaluate_through_ros(student, "reach", episodes_per_task=1, horizon=15, device="cpu",
                                            out_dir=tmp_path / "eval", progress=False)
    overall = result["overall"]
    assert result["seeds"] == [10000] and overall["episodes"] == 1 and overall["env_steps"] == 15
    assert overall["camera_to_action_ms_p50"] > 0 and overall["steps_per_s"] > 0
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["overall"]["success_rate"] == overall["success_rate"]
    assert "Through ROS 2 (lockstep" in (tmp_path / "eval" / "eval.md").read_text()
    for png in ("success_per_task.png", "camera_to_action_ms.png"):
        assert (tmp_path / "eval" / png).read_bytes()[:8] == PNG_MAGIC


def _demo_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="actdistill")
    demo.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["demo", *argv])


def test_demo_writes_its_report_and_prints_the_figures(weights, tmp_path, capsys):
    student, teacher = weights
    out = tmp_path / "demo"
    args = _demo_args(["--student", str(student), "--teacher", str(teacher), "--tasks", "reach", "--episodes", "1",
                       "--horizon", "30", "--device", "cpu", "--bench-iters", "5", "--out", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    for label in ("success", "camera-to-action     p50", "executed layers", "speedup vs teacher"):
        assert label in printed, printed
    report = json.loads((out / "demo.json").read_text())
    assert report["episodes"] == 1 and report["tasks"] == ["reach"]
    assert 0.0 < report["executed_layer_fraction"] <= 1.0
    assert report["camera_to_action_ms_p99"] >= report["camera_to_action_ms_p50"] > 0
    assert report["teacher_ms"] > 0 and report["student_ms"] > 0
    assert report["speedup"] == pytest.approx(report["teacher_ms"] / report["student_ms"], rel=0.01)
    assert f"{report['speedup']:.2f}x" in printed
    markdown = (out / "demo.md").read_text()
    assert "speedup vs teacher" in markdown and "frames_reach_s10000.png" in markdown
    for png in ("frames_reach_s10000.png", "eval/success_per_task.png", "eval/camera_to_action_ms.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC


def test_demo_refuses_missing_or_mismatched_weights(weights, tmp_path, capsys):
    student, teacher = weights
    args = _demo_args(["--student", str(tmp_path / "nowhere"), "--teacher", str(teacher), "--out", str(tmp_path)])
    assert args.func(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "student weights not found at" in err[0] and "nowhere" in err[0]
    args = _demo_args(["--student", str(teacher), "--teacher", str(teacher), "--out", str(tmp_path)])
    assert args.func(args) == 2
    assert "is a teacher" in capsys.readouterr().err
    assert not (tmp_path / "demo.json").exists()
