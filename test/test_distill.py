"""Offline distillation end to end on generated rosbags: teacher training, stage 1, stage 2,
export, resume after SIGKILL, two-process DDP, and bad data."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from actdistill_ros.cli import main as cli
from actdistill_ros.data import TopicConfig, write_episode_bag
from actdistill_ros.distill.config import DistillConfig
from actdistill_ros.distill.distillation import step_budget
from actdistill_ros.distill.runtime import batch_indices
from actdistill_ros.policy import Policy
from actdistill_ros.data.synthetic import ACTION_NAMES, STATE_NAMES, synthetic_episode, write_synthetic_demos

REPO = Path(__file__).resolve().parents[1]
# Small but real: dropout off so that a 2-process run can match a 1-process run exactly.
FAST = ["--probe-steps", "12", "--distill-steps", "24", "--batch-size", "8", "--checkpoint-every", "6"]


def _losses(run_dir: Path, stage: str, key: str = "loss") -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r["stage"] == stage and key in r]


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    return write_synthetic_demos(tmp_path_factory.mktemp("bags"), episodes=10, length=12)


@pytest.fixture(scope="module")
def teacher(demos, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    assert cli(["train-teacher", "--data", str(demos), "--out", str(out), "--size", "tiny", "--steps", "80",
                "--batch-size", "16", "--lr", "1e-3", "--action-space", "metaworld"]) == 0
    return out


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "distill.yaml"
    path.write_text("graph_dropout: 0.0\nrouter_dropout: 0.0\nlog_every: 2\n"
                    "probe: {lr: 3.0e-3, warmup_steps: 2}\ndistill: {lr: 3.0e-4, warmup_steps: 2}\n")
    return path


@pytest.fixture(scope="module")
def distilled(teacher, demos, config_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill")
    assert cli(["distill", "--teacher", str(teacher / "teacher"), "--data", str(demos), "--out", str(out),
                "--config", str(config_file), *FAST]) == 0
    return out


def test_teacher_training_lowers_the_loss_and_writes_a_loadable_teacher(teacher):
    losses = _losses(teacher, "teacher")
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:2]), losses
    policy = Policy.load(teacher / "teacher", device="cpu")
    assert not policy.card.is_student and policy.card.state_names == STATE_NAMES
    assert policy.card.norm_stats["action_std"][0] > 0.5  # directions of +-1 in x: stats come from the bags
    assert (teacher / "losses.png").stat().st_size > 0


def test_distillation_writes_a_student_the_policy_core_runs(distilled):
    policy = Policy.load(distilled / "student", device="cpu")
    assert policy.card.is_student
    metrics = policy.card.metrics
    for key in ("executed_layer_fraction", "backbone_flops_fraction", "teacher_action_mse", "student_action_mse",
                "layer_usage"):
        assert key in metrics
    assert len(metrics["layer_usage"]) == policy.num_layers
    images, instruction, states, _ = synthetic_episode(99)
    out = policy.predict(images[0], instruction, states[0])
    assert out.actions.shape == (policy.card.vla_config["chunk_size"], 4)
    assert 0 <= out.executed_fraction <= 1
    for name in ("losses.png", "layer_usage.png", "summary.json", "teacher_heads.safetensors"):
        assert (distilled / name).stat().st_size > 0
    assert not (distilled / "checkpoints" / "distill.json").exists(), "finished stages clear their checkpoints"
    # Export drops the graph heads: only the backbone, encoders, head and router remain.
    assert not any("heads" in name for name in load_file(distilled / "student" / "model.safetensors"))


def test_both_stages_lower_their_losses(distilled):
    probe = _losses(distilled, "probe")
    assert probe[-1] < probe[0], probe
    task = _losses(distilled, "distill", "task")
    distill = _losses(distilled, "distill", "distill")
    assert min(task[-3:]) < task[0] and min(distill[-3:]) < distill[0], (task, distill)


def test_budget_moves_the_executed_fraction_towards_the_target(distilled):
    keep = _losses(distilled, "distill", "keep")
    assert keep[0] == 1.0, "the derived student starts executing every layer (it is the teacher)"
    assert keep[-1] < 1.0, keep


def test_one_student_trained_across_budgets_runs_every_keep_exactly(distilled):
    rows = [json.loads(line) for line in (distilled / "train_log.jsonl").read_text().splitlines()]
    budgets = {r["target"] for r in rows if r["stage"] == "distill" and "target" in r}
    assert len(budgets) > 1 and all(0.25 <= b <= 1.0 for b in budgets), budgets
    policy = Policy.load(distilled / "student", device="cpu")
    assert policy.card.router_config["budget_conditioned"]
    assert policy.keep_fraction == policy.card.default_keep_fraction == 0.5, "the card defaults to keep routing"
    images, instruction, states, _ = synthetic_episode(7)
    frames, observed = np.stack(images[:6]), np.stack(states[:6])
    counts = []
    for keep in (0.3, 0.5, 0.8):
        policy.keep_fraction = keep
        outputs = policy.predict_batch(frames, [instruction] * len(frames), observed)
        k = round(keep * policy.num_layers)
        assert all(o.executed_fraction == k / policy.num_layers for o in outputs), (keep, outputs[0].executed_layers)
        counts.append(sum(len(o.executed_layers) for o in outputs))
    assert counts[0] < counts[1] < counts[2], counts
    sweep = {row["keep_fraction"]: row for row in policy.card.metrics["routing_sweep"]}
    assert set(sweep) == {0.0, 0.3, 0.5, 0.8, 1.0}
    assert [sweep[k]["executed_layer_fraction"] for k in (0.3, 0.5, 0.8, 1.0)] == [0.25, 0.5, 0.75, 1.0]
    assert policy.card.metrics["executed_layer_fraction"] == 0.5 and policy.card.metrics["routing"] == "keep 0.5"


def test_the_single_threshold_stage_two_still_trains_for_its_threshold(teacher, demos, tmp_path):
    config = tmp_path / "single_threshold.yaml"
    config.write_text("keep_range: null\nrouter_dropout: 0.0\nlog_every: 2\n"
                      "probe: {lr: 3.0e-3, warmup_steps: 2}\ndistill: {lr: 3.0e-4, warmup_steps: 2}\n")
    out = tmp_path / "out"
    assert cli(["distill", "--teacher", str(teacher / "teacher"), "--data", str(demos), "--out", str(out),
                "--config", str(config), *FAST]) == 0
    keep = _losses(out, "distill", "keep")
    assert keep[0] == 1.0 and keep[-1] < 1.0, keep
    assert set(_losses(out, "distill", "target")) == {0.5}
    policy = Policy.load(out / "student", device="cpu")
    assert not policy.card.router_config["budget_conditioned"] and policy.keep_fraction == 0.0
    assert policy.card.metrics["routing"] == "threshold 0.5"
    images, instruction, states, _ = synthetic_episode(7)
    out_frame = policy.predict(images[0], instruction, states[0])
    assert out_frame.executed_layers == [i for i, g in enumerate(out_frame.gates) if g >= policy.threshold]


def test_the_budget_of_a_step_is_a_function_of_seed_and_step():
    config = DistillConfig(keep_range=[0.25, 1.0], threshold_route_fraction=0.2, seed=5)
    drawn = [step_budget(step, config, 12) for step in range(400)]
    assert drawn == [step_budget(step, config, 12) for step in range(400)]
    assert {keep for keep, _ in drawn} == {k / 12 for k in range(3, 13)}, "every k in the range is drawn"
    threshold_steps = sum(not keep_routes for _, keep_routes in drawn) / len(drawn)
    assert 0.12 < threshold_steps < 0.28, threshold_steps
    assert step_budget(3, DistillConfig(keep_range=None, target_keep=0.4), 12) == (0.4, False)
    with pytest.raises(ValueError, match="keep_range"):
        DistillConfig(keep_range=[0.6, 0.3])
    with pytest.raises(ValueError, match="target_keep"):
        DistillConfig(keep_range=[0.6, 0.9], target_keep=0.5)


def test_rerun_without_resume_is_refused(teacher, demos, distilled, config_file):
    code = cli(["distill", "--teacher", str(teacher / "teacher"), "--data", str(demos), "--out", str(distilled),
                "--config", str(config_file), *FAST])
    assert code == 2


def test_data_order_is_a_function_of_the_step():
    a = [batch_indices(s, 50, 8, seed=3).tolist() for s in range(20)]
    b = [batch_indices(s, 50, 8, seed=3).tolist() for s in range(20)]
    assert a == b
    epoch = sorted(i for s in range(50 // 2) for i in batch_indices(s, 50, 2, seed=3))
    assert epoch == list(range(50)), "each epoch visits every sample once"


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    return env


def _distill_cmd(teacher, demos, out, config_file, *extra):
    return [sys.executable, "-m", "actdistill_ros.cli", "distill", "--teacher", str(teacher / "teacher"),
            "--data", str(demos), "--out", str(out), "--config", str(config_file), "--device", "cpu", *FAST, *extra]


def _student_tensors(run_dir: Path) -> dict:
    return load_file(run_dir / "student" / "model.safetensors")


def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_result(teacher, demos, config_file, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(_distill_cmd(teacher, demos, reference, config_file), env=_env(), check=True,
                   capture_output=True)
    proc = subprocess.Popen(_distill_cmd(teacher, demos, killed, config_file), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = killed / "checkpoints" / "distill.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if pointer.is_file() and json.loads(pointer.read_text())["step"] >= 12:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "student").exists()
    resumed = subprocess.run(_distill_cmd(teacher, demos, killed, config_file, "--resume"), env=_env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at step" in resumed.stderr
    expected, got = _student_tensors(reference), _student_tensors(killed)
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_allclose(got[name].numpy(), expected[name].numpy(), atol=1e-6, err_msg=name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_process_run(teacher, demos, config_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    subprocess.run(_distill_cmd(teacher, demos, out, config_file), env=_env(), check=True, capture_output=True)
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_agree_with_one_process(mode, teacher, demos, config_file, single_process_run, tmp_path):
    single, double = single_process_run, tmp_path / mode
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    cmd = _distill_cmd(teacher, demos, double, config_file, *(["--fsdp"] if mode == "fsdp" else []))
    result = subprocess.run(torchrun + cmd[1:], env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("probe", "distill"):
        np.testing.assert_allclose(_losses(double, stage), _losses(single, stage), rtol=2e-3, err_msg=stage)
    expected, got = _student_tensors(single), _student_tensors(double)
    for name in expected:
        # The router's gradients are tiny (saturated gates), and Adam divides by their magnitude, so
        # float-reduction noise between 1 and 2 processes shows up as up to ~lr-sized steps there.
        atol = 0.05 if name.startswith("router.") else 2e-4
        np.testing.assert_allclose(got[name].numpy(), expected[name].numpy(), atol=atol, rtol=1e-3, err_msg=name)


def test_bad_data_is_a_one_line_error_and_leaves_no_output(teacher, tmp_path, capsys):
    bags = tmp_path / "bags"
    images, instruction, states, actions = synthetic_episode(0)
    write_episode_bag(bags / "no_state", images=images, instruction=instruction, states=None, actions=actions,
                      topics=TopicConfig(state_topic=None), action_names=ACTION_NAMES)
    out = tmp_path / "out"
    code = cli(["distill", "--teacher", str(teacher / "teacher"), "--data", str(bags), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "no_state" in err[-1] and "/joint_states" in err[-1], err[-1]
    assert not out.exists()


def test_student_weights_are_refused_as_a_teacher(distilled, demos, tmp_path, capsys):
    code = cli(["distill", "--teacher", str(distilled / "student"), "--data", str(demos), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "is a student" in capsys.readouterr().err
