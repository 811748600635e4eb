"""A user's pi0, end to end and offline: the LeRobot-made tiny pi0 (its features rewritten to a
generated two-camera LeRobotDataset v3) goes through `actdistill distill` -> `predict` -> `bench` ->
`replay-eval` of a dataset episode, which serves the routed student in a real policy_node over DDS.
The rig is the SmolVLA end-to-end test's (test/smolvla_teacher.py, test/lerobot_dataset_writer.py)."""

from __future__ import annotations

import json
import shutil
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
from test_smolvla_end_to_end import FAST, JOINTS, LENGTHS  # noqa: E402

TOKENIZER = FIXTURES / "pi0" / "paligemma_tokenizer"


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(dataset root, the pi0 teacher directory, the distilled student directory)."""
    work = tmp_path_factory.mktemp("pi0_e2e")
    root = work / "demos"
    write_lerobot_dataset(root, LENGTHS, action_names=JOINTS, state_names=JOINTS[:3])
    teacher = make_smolvla_teacher(work / "teacher", root, case="pi0/pi0")
    config = work / "distill.yaml"
    config.write_text("graph_dropout: 0.0\nrouter_dropout: 0.0\nlog_every: 2\ngraph_width: 32\n"
                      "probe: {lr: 3.0e-3, warmup_steps: 2}\ndistill: {lr: 3.0e-4, warmup_steps: 2}\n")
    assert cli(["distill", "--teacher", str(teacher), "--data", str(root), "--out", str(work / "run"),
                "--vlm-processor", str(TOKENIZER), "--config", str(config), *FAST]) == 0
    shutil.copytree(TOKENIZER, teacher / "vlm_processor")  # where the node reads a LeRobot directory's tokenizer
    # The dataset's joint names, as the student's card has them (a LeRobot directory's card sidecar).
    (teacher / "card.json").write_text(json.dumps({"action_space": {"names": JOINTS}, "state_names": JOINTS[:3]}))
    return root, teacher, work / "run" / "student"


def test_distill_predict_bench_and_replay_of_a_dataset_episode_through_the_node(student, tmp_path, capsys):
    require_rclpy()
    root, teacher_dir, student_dir = student
    card = json.loads((student_dir / "card.json").read_text())
    assert (card["family"], card["kind"]) == ("pi0", "student")
    assert card["vla_config"]["routing"] == {"kv_mode": "project", "routed_layers": 3}
    flops = card["metrics"]["chunk_flops"]  # every routed layer counts; the expert's steps too
    assert flops["keep_0.25"]["prefix"] < flops["keep_0.5"]["prefix"] < flops["teacher"]["prefix"]
    assert flops["keep_0.5"]["expert"] == flops["teacher"]["expert"] > 0
    assert len(flops["teacher"]["vision_per_camera"]) == 2
    # LeRobot's tensor names, shapes and dtypes, the VLM layers and the expert distilled.
    ours, theirs = load_file(student_dir / "model.safetensors"), load_file(teacher_dir / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype for k in ours)
    changed = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert any("language_model.layers." in k for k in changed) and any("gemma_expert" in k for k in changed)
    assert not any("vision_tower" in k for k in changed)  # the prefix embedding stays the teacher's

    # predict: a LeRobot-convention batch in, the unnormalised chunk out, at the card's routing and at keep 1.0.
    batch = {"observation.images.top": torch.rand(1, 3, 48, 64), "observation.images.wrist": torch.rand(1, 3, 32, 40),
             "observation.state": torch.randn(1, 3)}
    save_file(batch, str(tmp_path / "batch.safetensors"))
    outputs = {}
    for name, extra in (("routed", []), ("all", ["--keep-fraction", "1.0"])):
        assert cli(["predict", "--policy", str(student_dir), "--batch", str(tmp_path / "batch.safetensors"),
                    "--task", "pick up the red cube", "--out", str(tmp_path / f"{name}.safetensors"), *extra]) == 0
        outputs[name] = load_file(tmp_path / f"{name}.safetensors")["action"]
    assert outputs["routed"].shape == (1, 8, 4) and torch.isfinite(outputs["routed"]).all()
    assert not torch.allclose(outputs["routed"], outputs["all"])  # the skipped layer changes the chunk

    # bench: vision, prefix and expert FLOPs and times apart, per keep fraction.
    capsys.readouterr()
    assert cli(["bench", "--teacher", str(student_dir), "--json", "--iters", "1", "--warmup", "0",
                "--keep-fractions", "1.0", "0.5"]) == 0
    bench = json.loads(capsys.readouterr().out)
    assert bench["family"] == "pi0" and bench["routed_layers"] == 3
    full, half = bench["by_keep_fraction"]
    assert half["prefix_gflops"] < full["prefix_gflops"] and half["expert_gflops"] == full["expert_gflops"]
    assert all(row["vision_ms"] > 0 and row["expert_ms"] > 0 for row in bench["by_keep_fraction"])

    # replay-eval of a dataset episode: the node serves the student, then the teacher, one chunk per frame.
    out = tmp_path / "report"
    env = node_environment(reserve_domain(), tmp_path / "ros_log")
    result = subprocess.run([sys.executable, "-m", "actdistill_ros.cli", "replay-eval", str(root), "--episode", "1",
                             "--weights", str(student_dir), "--teacher", str(teacher_dir), "--rate", "max",
                             "--out", str(out), "--device", "cpu"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    section = report["policies"]["student"]
    assert section["frames_published"] == section["chunks_received"] == LENGTHS[1]
    assert all(camera["frames_used"] == LENGTHS[1] for camera in section["cameras"].values())
    assert 0.0 < section["executed_fraction"]["mean"] < 1.0  # the router skipped layers, at the card's default
    assert section["action_error"]["frames_compared"] == LENGTHS[1]
    teacher = report["policies"]["teacher"]
    assert teacher["chunks_received"] == LENGTHS[1] and teacher["executed_fraction"]["mean"] == 1.0
    assert report["student_vs_teacher"]["frames_compared"] == LENGTHS[1]
