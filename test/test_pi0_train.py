"""`train-teacher --family pi0`: a pi0-architecture policy trained from scratch on rosbag demonstrations
(the SmolVLA family's training path), written as a LeRobot pi0 directory that the loader, the serving
adapter and `actdistill distill` take; resume after SIGKILL; bad flags."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from actdistill_ros.cli import main as cli
from actdistill_ros.data.synthetic import ACTION_NAMES, STATE_NAMES, write_synthetic_demos
from actdistill_ros.policies.pi0 import PI0Policy
from actdistill_ros.policies.pi0.modeling_pi0 import TIED_EMBEDDING
from actdistill_ros.policy import Policy

REPO = Path(__file__).resolve().parents[1]
FAST = ["--size", "tiny", "--batch-size", "4", "--checkpoint-every", "4", "--val-fraction", "0.25"]


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    return write_synthetic_demos(tmp_path_factory.mktemp("demos") / "bags", episodes=4, length=12, size=32)


def _train_args(demos, out, *extra, steps=6):
    return ["train-teacher", "--family", "pi0", "--data", str(demos), "--out", str(out), "--steps", str(steps),
            *FAST, *extra]


@pytest.fixture(scope="module")
def trained(demos, tmp_path_factory):
    out = tmp_path_factory.mktemp("pi0_train")
    assert cli(_train_args(demos, out, "--action-space", "metaworld")) == 0
    return out


def test_the_teacher_is_a_lerobot_pi0_directory_the_loader_reproduces(trained):
    teacher = trained / "teacher"
    config = json.loads((teacher / "config.json").read_text())
    assert config["type"] == "pi0" and config["image_resolution"] == [32, 32] and config["empty_cameras"] == 0
    assert config["input_features"] == {"observation.images.camera": {"type": "VISUAL", "shape": [3, 32, 32]},
                                        "observation.state": {"type": "STATE", "shape": [4]}}
    assert (config["chunk_size"], config["n_action_steps"], config["max_state_dim"]) == (4, 4, 32)
    pre = json.loads((teacher / "policy_preprocessor.json").read_text())
    assert [s["registry_name"] for s in pre["steps"]][2] == "pi0_new_line_processor"
    tensors = load_file(str(teacher / "model.safetensors"))
    assert TIED_EMBEDDING in tensors and all(name.startswith("model.") for name in tensors)
    initial = load_file(str(trained / "policy_init" / "model.safetensors"))
    for part in ("vision_tower", "paligemma.model.language_model.layers", "gemma_expert.model.layers",
                 "state_proj", "action_out_proj"):
        names = [n for n in tensors if part in n]
        assert names and any(not torch.equal(initial[n], tensors[n]) for n in names), part
    policy = PI0Policy.load(teacher, teacher / "vlm_processor")
    assert (policy.model.sizes.vlm.depth, policy.model.sizes.expert.depth, policy.model.sizes.vlm.width) == (4, 4, 32)
    torch.testing.assert_close(policy.model.state_proj.weight, tensors["model.state_proj.weight"], rtol=0, atol=0)
    batch = {"observation.images.camera": torch.rand(2, 3, 32, 32), "observation.state": torch.randn(2, 4)}
    noise = policy.start_noise(2, torch.Generator().manual_seed(0))
    actions = policy.predict_action_chunk(batch, "reach the goal", noise)
    assert actions.shape == (2, 4, len(ACTION_NAMES)) and torch.isfinite(actions).all()
    served = Policy.load(teacher)  # the node's and eval-sim's adapter, tokenizer from vlm_processor/
    assert served.card.family == "pi0" and served.card.chunk_size == 4 and served.card.state_names == STATE_NAMES
    assert json.loads((trained / "summary.json").read_text())["held_out_action_mse"] > 0


@pytest.fixture(scope="module")
def student(trained, demos, tmp_path_factory):
    out = tmp_path_factory.mktemp("pi0_distill")
    config = out / "distill.yaml"
    config.write_text("graph_width: 32\nlog_every: 2\nprobe: {warmup_steps: 1}\ndistill: {warmup_steps: 1}\n")
    assert cli(["distill", "--teacher", str(trained / "teacher"), "--data", str(demos), "--out", str(out / "d"),
                "--config", str(config), "--probe-steps", "2", "--distill-steps", "2", "--batch-size", "4"]) == 0
    return out / "d" / "student"


def test_the_trained_teacher_distils_into_a_served_student(student):
    served = Policy.load(student)
    assert served.card.family == "pi0" and served.card.kind == "student"


@pytest.mark.sim
def test_a_keep_sweep_evaluates_the_pi0_teacher_whole_the_student_at_each_keep_and_a_static_student(trained, student,
                                                                                                    demos, tmp_path):
    from sim_harness import require_simulator

    require_simulator()
    config = tmp_path / "distill.yaml"
    config.write_text("graph_width: 32\nlog_every: 2\nprobe: {warmup_steps: 1}\ndistill: {warmup_steps: 1}\n")
    assert cli(["distill", "--teacher", str(trained / "teacher"), "--data", str(demos), "--out", str(tmp_path / "s"),
                "--config", str(config), "--probe-steps", "2", "--distill-steps", "2", "--batch-size", "4",
                "--static-layers", "even", "--target-keep", "0.34"]) == 0
    out = tmp_path / "sweep"
    assert cli(["eval-sim", "--policy", str(student), "--teacher", str(trained / "teacher"),
                "--static-student", str(tmp_path / "s" / "student"),
                "--sweep-keep", "0.34", "1.0", "--tasks", "reach", "--episodes", "1", "--horizon", "4",
                "--image-size", "32", "--out", str(out)]) == 0
    methods = json.loads((out / "sweep_keep.json").read_text())["methods"]
    assert list(methods) == ["student", "teacher", "static-even"]  # no static-route baselines for a pi0 teacher
    assert [(p["keep"], p["k"]) for p in methods["student"]] == [(0.34, 1), (1.0, 3)]  # of the 3 routed layers
    assert [(p["keep"], p["k"]) for p in methods["static-even"]] == [(pytest.approx(1 / 3), 1)]  # what it runs
    points = methods["student"] + methods["teacher"] + methods["static-even"]
    gflops = [p["overall"]["backbone_gflops_per_call"] for p in points]
    assert gflops[0] < gflops[1] == pytest.approx(gflops[2]) and gflops[3] == pytest.approx(gflops[0])
    assert points[3]["overall"]["executed_fraction"] == pytest.approx(1 / 3)


def test_the_static_recipe_with_expert_layers_drops_them_and_keeps_as_many_pairs_as_equal_flops_allow(
        trained, demos, tmp_path):
    config = tmp_path / "distill.yaml"
    config.write_text("graph_width: 32\nlog_every: 2\nprobe: {warmup_steps: 1}\ndistill: {warmup_steps: 1}\n")
    out = tmp_path / "pairs"
    assert cli(["distill", "--teacher", str(trained / "teacher"), "--data", str(demos), "--out", str(out),
                "--config", str(config), "--probe-steps", "2", "--distill-steps", "3", "--batch-size", "4",
                "--static-layers", "first", "--static-drop-expert", "--target-keep", "0.34"]) == 0
    card = json.loads((out / "student" / "card.json").read_text())
    routing, flops = card["vla_config"]["routing"], card["metrics"]["chunk_flops"]
    kept = routing["static_layers"]
    assert routing["kv_mode"] == "skip_expert" and kept == list(range(len(kept)))
    # Equal compute: the routed student at keep 0.34 runs 1 of the 3 routed layers and every expert
    # layer; dropping pairs saves more per layer, so the nearest count keeps more layers.
    teacher, static, routed = (flops[key]["total"] for key in ("teacher", "static", "routed_keep_0.34"))
    per_pair = (teacher - static) / (3 - len(kept))
    assert len(kept) == 2 and abs(static - routed) <= per_pair / 2
    assert flops["static"]["expert"] < flops["teacher"]["expert"]
    # Training never ran the dropped expert layer: its weights are the teacher's, a kept one's moved.
    teacher_weights = load_file(str(trained / "teacher" / "model.safetensors"))
    weights = load_file(str(out / "student" / "model.safetensors"))
    expert = "model.paligemma_with_expert.gemma_expert.model.layers.{}.mlp.down_proj.weight"
    assert torch.equal(weights[expert.format(2)], teacher_weights[expert.format(2)])
    assert not torch.equal(weights[expert.format(0)], teacher_weights[expert.format(0)])
    served = Policy.load(out / "student")
    out = served.predict([np.zeros((32, 32, 3), np.uint8)], "reach the goal", np.zeros(4, np.float32))
    assert out.executed_layers == kept and out.chunk_gflops == pytest.approx(static / 1e9)


def test_bad_flags_get_one_line(demos, tmp_path, capsys):
    for extra, message in ((("--size", "default"), "--family pi0 has the sizes"),
                           (("--width", "64"), "not taken by --family pi0"),
                           (("--layers", "1"), "at least 2 VLM layers"),
                           (("--image-size", "36"), "expected a multiple of 8")):
        assert cli(_train_args(demos, tmp_path / "bad", *extra)) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)


def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_result(demos, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def command(out, *extra):
        args = _train_args(demos, out, *extra, steps=40)
        args[args.index("--checkpoint-every") + 1] = "10"
        return [sys.executable, "-m", "actdistill_ros.cli", *args]

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(command(reference), env=env, check=True, capture_output=True)
    proc = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = killed / "checkpoints" / "teacher.json"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if pointer.is_file() and json.loads(pointer.read_text())["step"] >= 10:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "teacher").exists()
    resumed = subprocess.run(command(killed, "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at step" in resumed.stderr
    expected = load_file(reference / "teacher" / "model.safetensors")
    got = load_file(killed / "teacher" / "model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("kind, kept_layers", [("first", [0, 1]), ("even", [0, 2])])
def test_a_static_student_trains_exports_and_runs_only_its_layers(trained, demos, tmp_path, kind, kept_layers):
    config = tmp_path / "distill.yaml"
    config.write_text("graph_width: 32\nlog_every: 2\nprobe: {warmup_steps: 1}\ndistill: {warmup_steps: 1}\n")
    out = tmp_path / "static"
    assert cli(["distill", "--teacher", str(trained / "teacher"), "--data", str(demos), "--out", str(out),
                "--config", str(config), "--probe-steps", "2", "--distill-steps", "3", "--batch-size", "4",
                "--static-layers", kind, "--target-keep", "0.5"]) == 0
    card = json.loads((out / "student" / "card.json").read_text())
    assert card["vla_config"]["routing"]["static_layers"] == kept_layers  # 2 of the 3 routed layers
    flops = card["metrics"]["chunk_flops"]
    assert set(flops) == {"teacher", "static", "routed_keep_0.5"} and flops["static"]["total"] < flops["teacher"]["total"]
    assert flops["static"]["total"] == pytest.approx(flops["routed_keep_0.5"]["total"])  # the same k: equal FLOPs
    teacher = load_file(str(trained / "teacher" / "model.safetensors"))
    weights = load_file(str(out / "student" / "model.safetensors"))
    layer = "model.paligemma_with_expert.paligemma.model.language_model.layers.{}.mlp.down_proj.weight"
    assert not torch.equal(weights[layer.format(kept_layers[0])], teacher[layer.format(kept_layers[0])])  # trained
    served = Policy.load(out / "student")
    student = served.policy  # the routed policy the adapter serves
    batch = {"observation.images.camera": torch.rand(2, 3, 32, 32), "observation.state": torch.randn(2, 4)}
    for keep in (1.0, 0.34):  # the dial does not move a fixed route
        student.keep_fraction = keep
        assert student.route(batch, "reach the goal")[1] == [[i in kept_layers for i in range(3)]] * 2
    noise = student.start_noise(2, torch.Generator().manual_seed(0))
    before = student.predict_action_chunk(batch, "reach the goal", noise)
    skipped = next(i for i in range(3) if i not in kept_layers)
    with torch.no_grad():  # a skipped layer's MLP never runs; a kept layer's does
        student.model.vlm.layers[skipped].mlp.down_proj.weight.add_(1.0)
        torch.testing.assert_close(student.predict_action_chunk(batch, "reach the goal", noise), before, rtol=0, atol=0)
        student.model.vlm.layers[kept_layers[0]].mlp.down_proj.weight.add_(1.0)
        assert not torch.allclose(student.predict_action_chunk(batch, "reach the goal", noise), before)
