"""`train-teacher --family smolvla`: a SmolVLA-architecture policy trained from scratch on rosbag
demonstrations, written as a LeRobot SmolVLA directory that this project's loader, the serving
adapter and eval-sim take; resume after SIGKILL; bad flags."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from actdistill_ros.cli import main as cli
from actdistill_ros.data.synthetic import ACTION_NAMES, STATE_NAMES, write_synthetic_demos
from actdistill_ros.policies.smolvla import SmolVLAPolicy
from actdistill_ros.policies.smolvla.modeling_smolvla import LM_HEAD
from actdistill_ros.policy import Policy

REPO = Path(__file__).resolve().parents[1]
FAST = ["--size", "tiny", "--batch-size", "4", "--checkpoint-every", "4", "--val-fraction", "0.25"]


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    return write_synthetic_demos(tmp_path_factory.mktemp("demos") / "bags", episodes=4, length=12, size=32)


def _train_args(demos, out, *extra, steps=6):
    return ["train-teacher", "--family", "smolvla", "--data", str(demos), "--out", str(out), "--steps", str(steps),
            *FAST, *extra]


@pytest.fixture(scope="module")
def trained(demos, tmp_path_factory):
    out = tmp_path_factory.mktemp("smolvla_train")
    assert cli(_train_args(demos, out, "--action-space", "metaworld")) == 0
    return out


def test_the_teacher_is_a_lerobot_smolvla_directory(trained):
    teacher = trained / "teacher"
    config = json.loads((teacher / "config.json").read_text())
    assert config["type"] == "smolvla"
    assert config["input_features"] == {"observation.images.camera": {"type": "VISUAL", "shape": [3, 32, 32]},
                                        "observation.state": {"type": "STATE", "shape": [4]}}
    assert config["output_features"] == {"action": {"type": "ACTION", "shape": [4]}}
    assert (config["chunk_size"], config["n_action_steps"], config["max_state_dim"], config["max_action_dim"]) == (
        4, 4, 32, 32)
    assert config["normalization_mapping"] == {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    assert Path(config["vlm_model_name"]) == (trained / "vlm").resolve()
    assert not config["freeze_vision_encoder"] and not config["train_expert_only"]
    tensors = load_file(str(teacher / "model.safetensors"))
    assert all(name.startswith("model.") for name in tensors)
    assert LM_HEAD in tensors  # tied embeddings, saved under the head's name as LeRobot saves them
    assert any(name.startswith("model.vlm_with_expert.vlm.model.vision_model.") for name in tensors)
    assert any(name.startswith("model.vlm_with_expert.lm_expert.layers.") for name in tensors)
    stats = load_file(str(teacher / "policy_preprocessor_step_5_normalizer_processor.safetensors"))
    assert set(stats) == {f"{k}.{s}" for k in ("observation.state", "action") for s in ("mean", "std", "min", "max")}
    sidecar = json.loads((teacher / "card.json").read_text())
    assert sidecar["state_names"] == STATE_NAMES and sidecar["action_space"]["names"][:1] == ["delta_x"]
    assert (teacher / "vlm_processor" / "tokenizer.json").is_file()
    # Readable by transformers 4.x, which LeRobot 0.4.x runs on (checked: LeRobot 0.4.4 loads such a
    # directory and predicts the same actions as actdistill predict).
    settings = json.loads((teacher / "vlm_processor" / "tokenizer_config.json").read_text())
    assert settings["tokenizer_class"] == "PreTrainedTokenizerFast" and "backend" not in settings
    assert settings["extra_special_tokens"]["fake_image_token"] == "<fake_token_around_image>"
    assert not list((trained / "vlm").glob("*.safetensors"))  # the VLM's weights are the policy's


def test_training_changed_every_part_and_the_loader_reproduces_it(trained):
    initial = load_file(str(trained / "policy_init" / "model.safetensors"))
    final = load_file(str(trained / "teacher" / "model.safetensors"))
    assert initial.keys() == final.keys()
    for part in ("vlm.model.vision_model.encoder", "vlm.model.connector", "vlm.model.text_model.layers",
                 "lm_expert.layers", "model.state_proj", "model.action_out_proj"):
        names = [n for n in final if part in n]
        assert names and any(not torch.equal(initial[n], final[n]) for n in names), part
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["train_steps"] == 6 and summary["held_out_action_mse"] > 0
    policy = SmolVLAPolicy.load(trained / "teacher")  # VLM config and tokenizer from vlm_model_name, offline
    torch.testing.assert_close(policy.model.state_proj.weight, final["model.state_proj.weight"], rtol=0, atol=0)
    batch = {"observation.images.camera": torch.rand(2, 3, 32, 32), "observation.state": torch.randn(2, 4)}
    noise = policy.start_noise(2, torch.Generator().manual_seed(0))
    actions = policy.predict_action_chunk(batch, "reach the goal", noise)
    assert actions.shape == (2, 4, len(ACTION_NAMES)) and torch.isfinite(actions).all()
    served = Policy.load(trained / "teacher")  # the serving adapter: the node's and eval-sim's policy
    assert served.card.family == "smolvla" and served.card.chunk_size == 4 and served.card.state_names == STATE_NAMES


def test_bad_flags_get_one_line(demos, tmp_path, capsys):
    for extra, message in ((("--size", "default"), "--family smolvla has the sizes"),
                           (("--width", "64"), "not taken by --family smolvla"),
                           (("--layers", "1"), "at least 2 VLM layers"),
                           (("--image-size", "36"), "expected a multiple of 16")):
        args = _train_args(demos, tmp_path / "bad", *extra)  # the last --size given counts
        assert cli(args) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_result(demos, tmp_path):
    def command(out, *extra):
        args = _train_args(demos, out, *extra, steps=40)
        args[args.index("--checkpoint-every") + 1] = "10"
        return [sys.executable, "-m", "actdistill_ros.cli", *args]

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(command(reference), env=_env(), check=True, capture_output=True)
    proc = subprocess.Popen(command(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = killed / "checkpoints" / "teacher.json"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if pointer.is_file() and json.loads(pointer.read_text())["step"] >= 10:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "teacher").exists()
    resumed = subprocess.run(command(killed, "--resume"), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at step" in resumed.stderr
    expected, got = load_file(reference / "teacher" / "model.safetensors"), load_file(killed / "teacher" / "model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.sim
def test_eval_sim_runs_the_teacher_through_the_serving_adapter(trained, tmp_path, capsys):
    from sim_harness import require_simulator

    require_simulator()
    out = tmp_path / "eval"
    assert cli(["eval-sim", "--policy", str(trained / "teacher"), "--tasks", "reach", "--episodes", "1",
                "--horizon", "6", "--image-size", "32", "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    episode = result["episodes"][0]
    # A chunk of 4 (n_action_steps), half of it executed per call, like the reference VLA's.
    assert result["chunk_size"] == 4 and result["overall"]["execute_steps"] == 2
    assert episode["steps"] == 6 and episode["policy_calls"] == 3
    assert result["overall"]["executed_fraction"] == 1.0 and result["overall"]["backbone_gflops_per_call"] > 0


@pytest.mark.sim
def test_a_keep_sweep_evaluates_the_smolvla_teacher_whole_and_the_student_at_each_keep(trained, demos, tmp_path,
                                                                                         capsys):
    from sim_harness import require_simulator

    require_simulator()
    config = tmp_path / "distill.yaml"
    config.write_text("graph_width: 32\nlog_every: 2\nprobe: {warmup_steps: 1}\ndistill: {warmup_steps: 1}\n")
    assert cli(["distill", "--teacher", str(trained / "teacher"), "--data", str(demos), "--out", str(tmp_path / "d"),
                "--config", str(config), "--probe-steps", "2", "--distill-steps", "2", "--batch-size", "4"]) == 0
    out = tmp_path / "sweep"
    assert cli(["eval-sim", "--policy", str(tmp_path / "d" / "student"), "--teacher", str(trained / "teacher"),
                "--sweep-keep", "0.34", "1.0", "--tasks", "reach", "--episodes", "1", "--horizon", "4",
                "--image-size", "32", "--out", str(out)]) == 0
    methods = json.loads((out / "sweep_keep.json").read_text())["methods"]
    assert list(methods) == ["student", "teacher"]  # no static-route baselines for a SmolVLA teacher
    assert [(p["keep"], p["k"]) for p in methods["student"]] == [(0.34, 1), (1.0, 3)]  # of the 3 routed layers
    assert [p["k"] for p in methods["teacher"]] == [3]
    fractions = [p["overall"]["executed_fraction"] for p in methods["student"] + methods["teacher"]]
    assert fractions == pytest.approx([1 / 3, 1.0, 1.0])
    gflops = [p["overall"]["backbone_gflops_per_call"] for p in methods["student"] + methods["teacher"]]
    assert gflops[0] < gflops[1] == pytest.approx(gflops[2])
    # bench with --student: teacher and student end to end through the serving adapter, interleaved.
    capsys.readouterr()
    assert cli(["bench", "--teacher", str(trained / "teacher"), "--student", str(tmp_path / "d" / "student"),
                "--keep-fraction", "0.34", "--iters", "2", "--warmup", "1", "--json"]) == 0
    bench = json.loads(capsys.readouterr().out)
    assert bench["executed_layer_fraction"] == pytest.approx(1 / 3, abs=1e-4) and bench["end_to_end_speedup"] > 0
    assert bench["student_backbone_gflops"] < bench["teacher_backbone_gflops"]
