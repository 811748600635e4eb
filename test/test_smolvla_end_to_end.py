"""A user's SmolVLA, end to end and offline: a LeRobot-made tiny SmolVLA and a generated two-camera
LeRobotDataset v3 go through `actdistill distill` -> `predict` -> `bench` -> `replay-eval` of a
dataset episode, which serves the routed student in a real policy_node over DDS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from actdistill_ros.cli import main as cli
from ros_harness import REPO_ROOT, node_environment, require_rclpy, reserve_domain

sys.path.insert(0, str(Path(__file__).parent))
from lerobot_dataset_writer import write_lerobot_dataset  # noqa: E402
from smolvla_teacher import FIXTURES, make_smolvla_teacher  # noqa: E402

JOINTS = ["shoulder_pan", "shoulder_lift", "elbow_flex", "gripper"]
LENGTHS = (10, 12)
FAST = ["--probe-steps", "4", "--distill-steps", "8", "--batch-size", "4", "--checkpoint-every", "4"]


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset root, the distilled student directory)."""
    work = tmp_path_factory.mktemp("smolvla_e2e")
    root = work / "demos"
    write_lerobot_dataset(root, LENGTHS, action_names=JOINTS, state_names=JOINTS[:3])
    teacher = make_smolvla_teacher(work / "teacher", root)
    config = work / "distill.yaml"
    config.write_text("graph_dropout: 0.0\nrouter_dropout: 0.0\nlog_every: 2\ngraph_width: 32\n"
                      "probe: {lr: 3.0e-3, warmup_steps: 2}\ndistill: {lr: 3.0e-4, warmup_steps: 2}\n")
    assert cli(["distill", "--teacher", str(teacher), "--data", str(root), "--out", str(work / "run"),
                "--vlm-processor", str(FIXTURES / "processor"), "--config", str(config), *FAST]) == 0
    return root, work / "run" / "student"


def test_distill_predict_bench_and_replay_of_a_dataset_episode_through_the_node(student, tmp_path, capsys):
    require_rclpy()
    root, student_dir = student
    card = json.loads((student_dir / "card.json").read_text())
    assert (card["family"], card["kind"]) == ("smolvla", "student")

    # predict: a LeRobot-convention batch in, the unnormalised chunk out, at the card's routing.
    batch = {"observation.images.top": torch.rand(1, 3, 48, 64), "observation.images.wrist": torch.rand(1, 3, 32, 40),
             "observation.state": torch.randn(1, 3)}
    save_file(batch, str(tmp_path / "batch.safetensors"))
    assert cli(["predict", "--policy", str(student_dir), "--batch", str(tmp_path / "batch.safetensors"),
                "--task", "pick up the red cube", "--out", str(tmp_path / "out.safetensors")]) == 0
    action = load_file(tmp_path / "out.safetensors")["action"]
    assert action.shape[0] == 1 and action.shape[2] == 4 and torch.isfinite(action).all()

    # bench: vision, prefix and expert reported apart, per keep fraction.
    capsys.readouterr()
    assert cli(["bench", "--teacher", str(student_dir), "--json", "--iters", "1", "--warmup", "0",
                "--keep-fractions", "1.0", "0.5"]) == 0
    bench = json.loads(capsys.readouterr().out)
    text = json.dumps(bench)
    assert all(part in text for part in ("vision", "prefix", "expert")), text[:2000]

    # replay-eval of a dataset episode: the node serves the student, one chunk per frame.
    out = tmp_path / "report"
    env = node_environment(reserve_domain(), tmp_path / "ros_log")
    result = subprocess.run([sys.executable, "-m", "actdistill_ros.cli", "replay-eval", str(root), "--episode", "1",
                             "--weights", str(student_dir), "--rate", "max", "--out", str(out), "--device", "cpu"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    section = report["policies"]["student"]
    assert section["frames_published"] == section["chunks_received"] == LENGTHS[1]
    assert all(camera["frames_used"] == LENGTHS[1] for camera in section["cameras"].values())
    routed = section["executed_fraction"]
    assert 0.0 < routed["mean"] < 1.0  # the router skipped layers, at the card's default keep
    assert section["action_error"]["frames_compared"] == LENGTHS[1]
