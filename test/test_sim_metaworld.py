"""Meta-World wrapper, expert demo collection into rosbag2, and closed-loop evaluation (real simulator)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

from sim_harness import require_simulator

require_simulator()  # skips without Meta-World; fails instead with ACTDISTILL_REQUIRE_SIM=1 (make test)

from actdistill_ros.sim import collect as collect_mod  # noqa: E402
from actdistill_ros.sim import evaluate as evaluate_mod  # noqa: E402
from actdistill_ros.sim.collect import bag_name, collect  # noqa: E402
from actdistill_ros.sim.metaworld_env import (  # noqa: E402
    ACTION_NAMES,
    EVAL_SEED_BASE,
    GOAL_MARKER_RGBA,
    GOAL_MARKER_SITES,
    MT10,
    STATE_NAMES,
    MetaWorldTask,
    camera_names,
    camera_topics,
    check_camera_count,
    parse_task_list,
)

SIZE = 64
HORIZON = 100


@pytest.fixture(scope="module")
def reach():
    task = MetaWorldTask("reach", image_size=SIZE, horizon=HORIZON, seed=0)
    yield task
    task.close()


def _rollout_frames(task: MetaWorldTask, seed: int, steps: int = 5) -> list[np.ndarray]:
    task.reset(seed)
    frames = [task.observe()[0][0].copy()]
    for _ in range(steps):
        task.step(task.expert_action())
        frames.append(task.observe()[0][0].copy())
    return frames


def test_same_seed_gives_identical_frames_and_other_seeds_differ():
    # A used instance (another episode first) and a fresh one must render the same episode.
    used = MetaWorldTask("push", image_size=SIZE, horizon=HORIZON, seed=0)
    fresh = MetaWorldTask("push-v3", image_size=SIZE, horizon=HORIZON, seed=7)
    try:
        _rollout_frames(used, 3, steps=20)
        first = _rollout_frames(used, 7)
        again = _rollout_frames(fresh, 7)
        different = _rollout_frames(fresh, 8)
    finally:
        used.close()
        fresh.close()
    assert first[0].shape == (SIZE, SIZE, 3) and first[0].dtype == np.uint8
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], different[0])
    # The frame is a real render (not blank) and it changes as the arm moves.
    assert first[0].std() > 10 and not np.array_equal(first[0], first[-1])


def test_observe_state_and_action_validation(reach):
    reach.reset(3)
    _, state = reach.observe()
    assert state.shape == (4,) and state.dtype == np.float32
    assert 0.0 <= state[3] <= 1.0  # gripper opening
    assert len(STATE_NAMES) == 4 and len(ACTION_NAMES) == 4
    with pytest.raises(ValueError, match="expected 4 finite values"):
        reach.step(np.zeros(3))
    with pytest.raises(ValueError, match="expected 4 finite values"):
        reach.step([0.0, np.nan, 0.0, 0.0])
    success, info = reach.step([0.0, 0.0, 1.0, 0.0])
    _, moved = reach.observe()
    assert info.step == 1 and moved[2] > state[2]  # +z action raised the hand
    with pytest.raises(ValueError, match="unknown Meta-World task 'sweep-the-floor'"):
        MetaWorldTask("sweep-the-floor")


def test_several_cameras_render_each_step_in_their_order():
    both = MetaWorldTask("push", image_size=SIZE, horizon=HORIZON, camera="corner4, topview", seed=5)
    one = MetaWorldTask("push", image_size=SIZE, horizon=HORIZON, camera="corner4", seed=5)
    try:
        frames, _ = both.observe()
        (alone,), _ = one.observe()
        assert both.num_cameras == 2 and len(frames) == 2
        assert all(f.shape == (SIZE, SIZE, 3) and f.dtype == np.uint8 for f in frames)
        assert np.array_equal(frames[0], alone)  # the first camera is the one-camera view
        assert not np.array_equal(frames[0], frames[1]) and frames[1].std() > 10
        both.step(both.expert_action())
        moved, _ = both.observe()
        assert not np.array_equal(moved[1], frames[1])  # re-rendered after a step, every camera
    finally:
        both.close()
        one.close()
    assert camera_topics("corner4") == ["/camera/image_raw"]
    assert camera_topics("corner4,topview") == ["/camera/image_raw", "/camera_topview/image_raw"]
    for bad in ("corner4,,topview", "corner4,corner4", ""):
        with pytest.raises(ValueError, match="Meta-World camera names"):
            camera_names(bad)
    with pytest.raises(ValueError, match="camera 'ceiling' not in the Meta-World scene"):
        MetaWorldTask("push", image_size=SIZE, camera="corner4,ceiling")
    with pytest.raises(ValueError, match="takes 1 camera image"):
        check_camera_count("corner4,topview", 1)


def test_task_list_parsing():
    assert parse_task_list("mt10") == list(MT10)
    assert parse_task_list("reach,push-v3, reach") == ["reach", "push"]
    with pytest.raises(ValueError, match="no tasks"):
        parse_task_list(" , ")


def test_the_simulator_clips_actions_the_policy_does_not(tmp_path):
    """The policy returns its chunk as predicted (no clamp); an evaluation episode on Meta-World
    must still move the arm within the action space: the same episode with the chunk clipped to
    [-1, 1] beforehand is step for step the same."""
    import torch

    from actdistill_ros.policies.vla import ReferenceVLA, VLAConfig
    from actdistill_ros.policy import Policy, make_card, save_model
    from actdistill_ros.weights import ActionSpace

    torch.manual_seed(0)
    vla = ReferenceVLA(VLAConfig.tiny(image_size=SIZE, state_dim=4, action_dim=4))
    stats = {"action_mean": [0.0] * 4, "action_std": [1e3] * 4, "state_mean": [0.0] * 4, "state_std": [1.0] * 4}
    save_model(tmp_path / "loud", vla, make_card(vla, ActionSpace.metaworld(), norm_stats=stats))
    policy = Policy.load(tmp_path / "loud", device="cpu")

    class Clipped:
        card, threshold = policy.card, policy.threshold

        def predict(self, images, instruction, state=None):
            out = policy.predict(images, instruction, state)
            out.actions = np.clip(out.actions, -1.0, 1.0)
            return out

    chunks, states = {}, {}
    for name, predictor in (("as predicted", policy), ("clipped", Clipped())):
        task = MetaWorldTask("reach", image_size=SIZE, horizon=12)
        try:
            task.reset(EVAL_SEED_BASE)
            start = task.observe()[1].copy()
            outcome, _ = evaluate_mod.run_episode(predictor, task, seed=EVAL_SEED_BASE, execute_steps=4)
            chunks[name] = predictor.predict(*task.observe()[:1], "reach the goal", task.observe()[1]).actions
            states[name] = task.observe()[1]
        finally:
            task.close()
        assert outcome.steps == 12
    assert np.abs(chunks["as predicted"]).max() > 1.0, "the chunk must leave [-1, 1] for this test"
    assert np.abs(states["clipped"][:3] - start[:3]).max() > 0.01, "the actions must move the hand"
    np.testing.assert_array_equal(states["as predicted"], states["clipped"])


def test_expert_succeeds_on_reach_within_horizon(reach):
    for seed in (0, 1):
        reach.reset(seed)
        success = False
        while not success and reach.steps < HORIZON:
            success, info = reach.step(reach.expert_action())
        assert success, f"reach seed {seed}: expert failed in {HORIZON} steps"
        assert info.success_step == reach.steps < HORIZON


def _goal_marker_rgba(task: MetaWorldTask) -> np.ndarray:
    """RGBA of the goal marker site(s) as the simulator will render them."""
    import mujoco

    model = task._env.model
    ids = [mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, site) for site in GOAL_MARKER_SITES]
    return np.array([model.site_rgba[i] for i in ids if i >= 0], dtype=np.float32)


def test_goal_markers_share_one_colour():
    colours = []
    for name in ("reach", "push", "pick-place"):
        task = MetaWorldTask(name, image_size=SIZE, horizon=HORIZON)
        try:
            # Meta-World ships red/green/blue markers for these three; all must now be the same.
            colours.append(_goal_marker_rgba(task))
        finally:
            task.close()
    for rgba in colours:
        assert rgba.shape == (1, 4)
        np.testing.assert_allclose(rgba[0], GOAL_MARKER_RGBA, atol=1e-6)


def test_collection_and_evaluation_seeds_are_disjoint(tmp_path):
    with pytest.raises(ValueError, match="evaluation range"):
        collect("reach", 2, tmp_path / "demos", seed_base=EVAL_SEED_BASE - 1, workers=1, progress=False)
    assert not (tmp_path / "demos" / "collection.json").exists()
    with pytest.raises(ValueError, match="collection range"):
        evaluate_mod.check_eval_seeds(EVAL_SEED_BASE - 5, 10)
    assert evaluate_mod.check_eval_seeds(EVAL_SEED_BASE, 3) == [EVAL_SEED_BASE + i for i in range(3)]


def test_collection_writes_readable_bags_and_resumes(tmp_path):
    from actdistill_ros.data.bags import read_episode

    out = tmp_path / "demos"
    record = collect(["reach", "push"], 2, out, image_size=SIZE, horizon=HORIZON, action_noise=0.1,
                     workers=1, progress=False)
    assert record["complete"] and record["image_size"] == SIZE and record["horizon"] == HORIZON
    assert record["fps"] == pytest.approx(80.0)
    on_disk = json.loads((out / "collection.json").read_text())
    assert on_disk["per_task"] == record["per_task"]
    for task in ("reach", "push"):
        summary = record["per_task"][task]
        assert summary["successes"] == 2 and summary["attempts"] >= 2
        assert summary["seeds"] == sorted(summary["seeds"]) and max(summary["seeds"]) < EVAL_SEED_BASE
        for seed in summary["seeds"]:
            path = out / bag_name(task, seed)
            episode = read_episode(path)
            steps = record["episodes"][path.name]["steps"]
            assert len(episode) == steps and 0 < steps < HORIZON
            assert episode.images.shape == (steps, 1, SIZE, SIZE, 3)  # (T, cameras, h, w, 3)
            assert episode.action_names == list(ACTION_NAMES) and episode.state_names == list(STATE_NAMES)
            assert set(episode.instructions) == {record["instructions"][task]}
            assert np.abs(episode.actions).max() <= 1.0

    # The bag labels are the expert's clean actions while noisy actions were executed: the first
    # label equals the expert's action at the reset state, and the second state is not where the
    # clean action alone would have led.
    episode = read_episode(out / bag_name("push", record["per_task"]["push"]["seeds"][0]))
    replay = MetaWorldTask("push", image_size=SIZE, horizon=HORIZON)
    try:
        replay.reset(record["per_task"]["push"]["seeds"][0])
        np.testing.assert_allclose(episode.states[0], replay.state(), atol=1e-6)
        np.testing.assert_allclose(episode.actions[0], replay.expert_action(), atol=1e-6)
        replay.step(replay.expert_action())
        assert not np.allclose(episode.states[1], replay.state(), atol=1e-7)
    finally:
        replay.close()

    # Resume: a finished collection re-runs nothing; a lost bag is re-made bit-identically.
    lost = out / bag_name("push", record["per_task"]["push"]["seeds"][-1])
    lost_bytes = {p.name: p.read_bytes() for p in lost.iterdir()}
    kept = out / bag_name("reach", record["per_task"]["reach"]["seeds"][0])
    kept_mtime = kept.stat().st_mtime_ns
    import shutil

    shutil.rmtree(lost)
    again = collect(["reach", "push"], 2, out, image_size=SIZE, horizon=HORIZON, action_noise=0.1,
                    workers=1, progress=False)
    assert again["per_task"]["reach"]["reused_bags"] == 2 and again["per_task"]["push"]["reused_bags"] == 1
    assert kept.stat().st_mtime_ns == kept_mtime
    assert {p.name: p.read_bytes() for p in lost.iterdir()} == lost_bytes
    assert again["per_task"]["push"]["seeds"] == record["per_task"]["push"]["seeds"]
    # Mixing settings in one directory is refused.
    with pytest.raises(ValueError, match="image_size=64"):
        collect(["reach"], 2, out, image_size=96, horizon=HORIZON, action_noise=0.1, workers=1, progress=False)


def test_hold_steps_record_the_expert_after_the_first_success(tmp_path):
    from actdistill_ros.data.bags import read_episode

    plain = collect(["reach"], 1, tmp_path / "plain", image_size=SIZE, horizon=HORIZON, workers=1, progress=False)
    held = collect(["reach"], 1, tmp_path / "held", image_size=SIZE, horizon=HORIZON, hold_steps=5, workers=1,
                   progress=False)
    name = bag_name("reach", plain["per_task"]["reach"]["seeds"][0])
    assert held["per_task"]["reach"]["seeds"] == plain["per_task"]["reach"]["seeds"]
    assert held["episodes"][name]["steps"] == plain["episodes"][name]["steps"] + 5
    short, long = read_episode(tmp_path / "plain" / name), read_episode(tmp_path / "held" / name)
    assert len(long) == len(short) + 5
    np.testing.assert_array_equal(long.actions[: len(short)], short.actions)  # the same episode, then more
    with pytest.raises(ValueError, match="hold_steps=5"):  # a resumed collection keeps its settings
        collect(["reach"], 1, tmp_path / "held", image_size=SIZE, horizon=HORIZON, workers=1, progress=False)
    with pytest.raises(ValueError, match="hold_steps -1"):
        collect(["reach"], 1, tmp_path / "bad", image_size=SIZE, horizon=HORIZON, hold_steps=-1, progress=False)


def test_start_jitter_moves_the_hands_start_within_the_workspace_and_only_for_that_episode(reach, tmp_path):
    from actdistill_ros.data.bags import read_episode

    reach.reset(5)
    fixed = reach.state()[:3].copy()
    reach.reset(5, hand_offset=[0.1, -0.08, 0.05])
    np.testing.assert_allclose(reach.state()[:3] - fixed, [0.1, -0.08, 0.05], atol=5e-3)
    reach.reset(5, hand_offset=[5.0, 0.0, -5.0])  # far outside: held 2 cm inside the workspace
    env = reach._env
    assert np.all(reach.state()[:3] <= np.asarray(env.hand_high) - 0.015)
    assert np.all(reach.state()[:3] >= np.asarray(env.hand_low) + 0.015)
    reach.reset(5)  # the next episode starts where it always did
    np.testing.assert_allclose(reach.state()[:3], fixed, atol=1e-9)
    with pytest.raises(ValueError, match="hand_offset"):
        reach.reset(5, hand_offset=[0.1, np.nan, 0.0])

    plain = collect(["reach"], 2, tmp_path / "plain", image_size=SIZE, horizon=HORIZON, workers=1, progress=False)
    jittered = collect(["reach"], 2, tmp_path / "jitter", image_size=SIZE, horizon=HORIZON, start_jitter_m=0.1,
                       workers=1, progress=False)
    assert jittered["start_jitter_m"] == 0.1 and plain["start_jitter_m"] == 0.0
    starts = []
    for record, root in ((plain, tmp_path / "plain"), (jittered, tmp_path / "jitter")):
        starts.append([read_episode(root / bag_name("reach", seed)).states[0, :3]
                       for seed in record["per_task"]["reach"]["seeds"]])
    np.testing.assert_allclose(starts[0][0], starts[0][1], atol=1e-6)  # one fixed start
    offsets = [start - starts[0][0] for start in starts[1]]
    assert all(0.01 < np.abs(o).max() <= 0.1 + 5e-3 for o in offsets) and not np.allclose(*offsets, atol=1e-3)
    with pytest.raises(ValueError, match="start_jitter_m=0.1"):  # a resumed collection keeps its settings
        collect(["reach"], 2, tmp_path / "jitter", image_size=SIZE, horizon=HORIZON, workers=1, progress=False)
    with pytest.raises(ValueError, match="start_jitter_m 0.5"):
        collect(["reach"], 1, tmp_path / "bad", image_size=SIZE, horizon=HORIZON, start_jitter_m=0.5, progress=False)


def test_two_camera_collection_and_evaluation(tmp_path):
    from actdistill_ros.data.bags import read_episode
    from actdistill_ros.data.config import TopicConfig
    from actdistill_ros.policy import Policy, create_untrained_policy

    cameras = "corner4,topview"
    record = collect(["reach"], 1, tmp_path / "demos", image_size=SIZE, horizon=HORIZON, camera=cameras,
                     workers=1, progress=False)
    assert record["camera_topics"] == camera_topics(cameras)
    seed = record["per_task"]["reach"]["seeds"][0]
    episode = read_episode(tmp_path / "demos" / bag_name("reach", seed), TopicConfig(cameras=camera_topics(cameras)))
    steps = record["episodes"][bag_name("reach", seed)]["steps"]
    assert episode.images.shape == (steps, 2, SIZE, SIZE, 3)
    replay = MetaWorldTask("reach", image_size=SIZE, horizon=HORIZON, camera=cameras, seed=seed)
    try:  # the bag holds each camera's own view, in order
        frames, _ = replay.observe()
        assert all(np.array_equal(episode.images[0, i], frames[i]) for i in range(2))
    finally:
        replay.close()

    policy = Policy.load(create_untrained_policy(tmp_path / "two", size="tiny", student=True,
                                                 camera_names=camera_topics(cameras)), device="cpu")
    result = evaluate_mod.evaluate_policy(policy, "reach", 1, horizon=8, camera=cameras, progress=False)
    assert result["camera"] == cameras and result["overall"]["env_steps"] == 8
    with pytest.raises(ValueError, match="takes 2 camera image"):
        evaluate_mod.evaluate_policy(policy, "reach", 1, horizon=8, progress=False)  # corner4 alone


def test_closed_loop_evaluation_and_threshold_sweep(tmp_path):
    from actdistill_ros.policy import Policy, create_untrained_policy

    student = Policy.load(create_untrained_policy(tmp_path / "student", size="tiny", student=True, keep=0.5),
                          device="cpu")
    chunk = student.card.vla_config["chunk_size"]
    result = evaluate_mod.evaluate_policy(
        student, "reach", 1, horizon=20, out_dir=tmp_path / "eval", gif=True, progress=False)
    overall = result["overall"]
    assert overall["env_steps"] == 20 and overall["execute_steps"] == max(1, chunk // 2)
    assert overall["policy_calls"] == -(-20 // overall["execute_steps"])
    assert 0.0 < overall["executed_fraction"] < 1.0 and overall["predict_ms_mean"] > 0
    assert result["seeds"] == [EVAL_SEED_BASE]
    for name in ("eval.json", "eval.md", "success_per_task.png", f"gifs/reach_s{EVAL_SEED_BASE:05d}.gif"):
        assert (tmp_path / "eval" / name).stat().st_size > 0, name
    assert "| reach |" in (tmp_path / "eval" / "eval.md").read_text()

    sweep = evaluate_mod.sweep_threshold(student, [0.0, 1.0], "reach", 1, horizon=8, execute_steps=chunk,
                                         out_dir=tmp_path / "sweep", progress=False)
    fractions = [p["overall"]["executed_fraction"] for p in sweep["points"]]
    gflops = [p["overall"]["backbone_gflops_per_call"] for p in sweep["points"]]
    assert fractions[0] == 1.0 and fractions[1] < 1.0 and gflops[1] < gflops[0]
    assert student.threshold == student.card.default_threshold  # restored
    assert (tmp_path / "sweep" / "success_vs_gflops.png").stat().st_size > 0

    teacher = Policy.load(create_untrained_policy(tmp_path / "teacher", size="tiny", student=False), device="cpu")
    with pytest.raises(ValueError, match="teacher"):
        evaluate_mod.sweep_threshold(teacher, [0.0], "reach", 1, horizon=4, progress=False)
    with pytest.raises(ValueError, match="execute_steps"):
        evaluate_mod.evaluate_policy(teacher, "reach", 1, horizon=4, execute_steps=chunk + 1, progress=False)


def test_cli_parsers():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    collect_mod.add_parser(sub)
    evaluate_mod.add_parser(sub)
    args = parser.parse_args(["collect", "--tasks", "reach,push", "--episodes", "3", "--out", "d",
                              "--image-size", "64", "--noise", "0.2", "--workers", "1", "--storage", "sqlite3"])
    assert (args.tasks, args.episodes, args.image_size, args.noise, args.storage) == ("reach,push", 3, 64, 0.2, "sqlite3")
    assert args.func is collect_mod.run
    args = parser.parse_args(["eval-sim", "--policy", "w", "--sweep-threshold", "--gif"])
    assert args.sweep_threshold == [] and args.gif and args.func is evaluate_mod.run



def test_evaluator_and_reports_import_without_ros():
    # The in-process loop must not depend on the ROS layer (which depends on it): no rclpy, no ros/.
    code = ("import sys; sys.modules['rclpy'] = None\n"
            "import actdistill_ros.sim.evaluate, actdistill_ros.sim.report\n"
            "print(sorted(m for m, module in sys.modules.items()\n"
            "             if module is not None and m.startswith(('rclpy', 'actdistill_ros.ros'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_cli_hands_through_ros_to_the_ros_layer(capsys):
    from actdistill_ros import cli

    parser = cli.build_parser()
    assert cli.command_function(parser.parse_args(["eval-sim", "--policy", "w"])) is evaluate_mod.run
    through_ros = cli.command_function(parser.parse_args(["eval-sim", "--policy", "w", "--through-ros"]))
    assert (through_ros.__module__, through_ros.__name__) == ("actdistill_ros.ros.closed_loop", "run_eval_sim")
    # In-process-only options are refused in one line before any node starts.
    assert cli.main(["eval-sim", "--policy", "w", "--through-ros", "--gif"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--through-ros runs one threshold" in err

def test_collect_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    collect_mod.add_parser(parser.add_subparsers())
    args = parser.parse_args(["collect", "--tasks", "reach,fly", "--episodes", "1", "--out", str(tmp_path / "d")])
    assert collect_mod.run(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown Meta-World task 'fly'" in err
    assert not (tmp_path / "d").exists()
