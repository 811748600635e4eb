"""ActDistill of a LeRobot SmolVLA teacher (a LeRobot-made tiny fixture) on a generated
LeRobotDataset v3: the student directory, routing (keep k runs k layers, keep 1.0 is the teacher,
mixed routes in one batch), the three ways a skipped layer gives its expert layer keys/values, FLOPs
against an independent count, training-equals-inference gating, and resume after SIGKILL."""

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
from safetensors.torch import load_file, save_file

from actdistill_ros.cli import main as cli
from actdistill_ros.policies.actdistill import RouterConfig
from actdistill_ros.policies.smolvla import SmolVLAPolicy
from actdistill_ros.policies.smolvla.distill_smolvla import flow_noise_and_time
from actdistill_ros.policies.smolvla.routing_smolvla import (KV_MODES, RouteCosts, RoutedSmolVLA, chunk_flops,
                                                            gated_prefix, is_smolvla_student_dir, load_smolvla_student,
                                                            routed_prefix, sample_routed)

sys.path.insert(0, str(Path(__file__).parent))
from lerobot_dataset_writer import write_lerobot_dataset  # noqa: E402
from smolvla_teacher import FIXTURES, make_smolvla_teacher  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROCESSOR = FIXTURES / "processor"
TASK = "pick up the red cube"
FAST = ["--probe-steps", "4", "--distill-steps", "8", "--batch-size", "4", "--checkpoint-every", "4"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("lerobot_dataset")
    write_lerobot_dataset(root, lengths=(10, 12, 14))
    return root


@pytest.fixture(scope="module")
def teacher_dir(dataset, tmp_path_factory):
    return make_smolvla_teacher(tmp_path_factory.mktemp("teacher") / "policy", dataset)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "distill.yaml"
    path.write_text("graph_dropout: 0.0\nrouter_dropout: 0.0\nlog_every: 2\ngraph_width: 32\n"
                    "probe: {lr: 3.0e-3, warmup_steps: 2}\ndistill: {lr: 3.0e-4, warmup_steps: 2}\n")
    return path


def _distill_args(teacher_dir, dataset, out, config_file, *extra):
    return ["distill", "--teacher", str(teacher_dir), "--data", str(dataset), "--out", str(out),
            "--vlm-processor", str(PROCESSOR), "--config", str(config_file), *FAST, *extra]


@pytest.fixture(scope="module")
def distilled(teacher_dir, dataset, config_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill")
    assert cli(_distill_args(teacher_dir, dataset, out, config_file)) == 0
    return out


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return SmolVLAPolicy.load(teacher_dir, PROCESSOR)


def _batch(size=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"observation.images.top": torch.rand(size, 3, 48, 64, generator=generator),
            "observation.images.wrist": torch.rand(size, 3, 32, 40, generator=generator),
            "observation.state": torch.randn(size, 3, generator=generator)}


def _noise(policy, size=2, seed=1):
    return policy.start_noise(size, torch.Generator().manual_seed(seed))


def test_the_student_directory_is_lerobot_s_layout_plus_router_card_and_vlm_processor(distilled, teacher_dir):
    student = distilled / "student"
    assert is_smolvla_student_dir(student)
    card = json.loads((student / "card.json").read_text())
    assert (card["family"], card["kind"], card["format"]) == ("smolvla", "student", 1)
    assert card["camera_names"] == ["observation.images.top", "observation.images.wrist"]
    assert card["default_keep_fraction"] == 0.5 and card["vla_config"]["routing"] == {"kv_mode": "project",
                                                                                       "routed_layers": 3}
    sweep = {row.get("keep_fraction", "threshold"): row for row in card["metrics"]["routing_sweep"]}
    # 3 routed layers: keep 0.25 -> 1, 0.5 -> round(1.5) = 2, 1.0 -> 3
    assert [sweep[k]["executed_layer_fraction"] for k in (0.25, 0.5, 1.0)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    flops = card["metrics"]["chunk_flops"]
    assert flops["keep_0.25"]["prefix"] < flops["keep_0.5"]["prefix"] < flops["teacher"]["prefix"]
    assert flops["keep_0.5"]["expert"] == flops["teacher"]["expert"]  # the expert always runs
    assert len(flops["teacher"]["vision_per_camera"]) == 2
    # LeRobot's tensor names, shapes and dtypes: the student's weights replace the teacher's one for one.
    ours, theirs = load_file(student / "model.safetensors"), load_file(teacher_dir / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype for k in ours)
    changed = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert any(".text_model.layers." in k for k in changed) and any("lm_expert" in k for k in changed)
    assert not any("vision_model" in k for k in changed)  # the prefix embedding stays frozen
    assert set(load_file(student / "router.safetensors")) >= {"gate.weight", "gate.bias"}
    vlm = {p.name for p in (student / "vlm_processor").iterdir()}
    assert {"config.json", "tokenizer.json"} <= vlm and not any(n.endswith(".safetensors") for n in vlm)
    for name in ("config.json", "policy_preprocessor.json", "policy_postprocessor.json"):
        assert (student / name).read_text() == (teacher_dir / name).read_text()
    rows = [json.loads(line) for line in (distilled / "train_log.jsonl").read_text().splitlines()]
    distill = [r for r in rows if r["stage"] == "distill" and "task" in r]
    assert distill and all(np.isfinite([r["task"], r["velocity_distill"], r["distill"]]).all() for r in distill)


def test_predict_runs_the_student_at_its_card_s_routing(distilled, tmp_path):
    student = distilled / "student"
    save_file(_batch(), str(tmp_path / "batch.safetensors"))
    policy = load_smolvla_student(student)  # its own vlm_processor/: loads offline with no flag
    assert policy.keep_fraction == 0.5
    noise = _noise(policy)
    save_file({"noise": noise}, str(tmp_path / "noise.safetensors"))
    assert cli(["predict", "--policy", str(student), "--batch", str(tmp_path / "batch.safetensors"), "--task", TASK,
                "--noise", str(tmp_path / "noise.safetensors"), "--out", str(tmp_path / "out.safetensors")]) == 0
    got = load_file(tmp_path / "out.safetensors")["action"]
    assert got.shape == (2, 8, 4)
    torch.testing.assert_close(got, policy.predict_action_chunk(_batch(), TASK, noise), rtol=0, atol=0)


def test_keep_one_is_the_student_without_routing(distilled, tmp_path):
    """Keep 1.0 runs every layer: exactly what LeRobot's loader (no router) computes from the directory."""
    student_dir = distilled / "student"
    plain = SmolVLAPolicy.load(student_dir, student_dir / "vlm_processor")
    noise = _noise(plain)
    save_file(_batch(), str(tmp_path / "batch.safetensors"))
    save_file({"noise": noise}, str(tmp_path / "noise.safetensors"))
    assert cli(["predict", "--policy", str(student_dir), "--batch", str(tmp_path / "batch.safetensors"), "--task", TASK,
                "--noise", str(tmp_path / "noise.safetensors"), "--keep-fraction", "1.0",
                "--out", str(tmp_path / "out.safetensors")]) == 0
    torch.testing.assert_close(load_file(tmp_path / "out.safetensors")["action"],
                               plain.predict_action_chunk(_batch(), TASK, noise), rtol=0, atol=0)


def test_routing_flags_on_a_policy_without_routing_are_one_line(teacher_dir, tmp_path, capsys):
    save_file(_batch(), str(tmp_path / "batch.safetensors"))
    assert cli(["predict", "--policy", str(teacher_dir), "--batch", str(tmp_path / "batch.safetensors"), "--task", TASK,
                "--keep-fraction", "0.5", "--vlm-processor", str(PROCESSOR),
                "--out", str(tmp_path / "out.safetensors")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--keep-fraction" in err[0] and "not a SmolVLA student" in err[0]


def test_an_undistilled_student_is_the_teacher(teacher):
    student = RoutedSmolVLA.derive_from(teacher.model, RouterConfig(budget_conditioned=True)).eval()
    with torch.no_grad():
        prefix, _ = teacher.preprocess(_batch(), TASK)
        noise = _noise(teacher)
        expected = teacher.model.sample_actions(prefix, noise)
        for keep in (1.0, 0.0):  # keep 1.0, and threshold routing with the initial gates (all ~0.95)
            student.keep_fraction = keep
            _, plan = student.route(prefix)
            assert all(all(row) for row in plan)
            torch.testing.assert_close(student.sample_actions(prefix, noise), expected, rtol=0, atol=0)


def test_keep_half_runs_exactly_round_half_of_the_routed_layers(teacher, monkeypatch):
    student = RoutedSmolVLA.derive_from(teacher.model, RouterConfig(budget_conditioned=True)).eval()
    model = student.model
    rows_run, original = [], model.vlm_layer

    def counting(index, hidden, context, need_output=True):
        if need_output:
            rows_run.append(hidden.shape[0])
        return original(index, hidden, context, need_output)

    monkeypatch.setattr(model, "vlm_layer", counting)
    with torch.no_grad():
        prefix, _ = teacher.preprocess(_batch(3), TASK)
        for keep, kept in ((0.25, 1), (0.5, 2), (0.75, 2), (1.0, 3)):  # max(1, round(keep * 3))
            student.keep_fraction = keep
            _, plan = student.route(prefix)
            assert [sum(row) for row in plan] == [kept] * 3
            rows_run.clear()
            student.sample_actions(prefix, _noise(teacher, 3), plan)
            assert sum(rows_run) == 3 * kept  # a skipped layer's output is never computed


@pytest.mark.parametrize("kv_mode", KV_MODES)
def test_a_batch_of_mixed_routes_equals_each_row_alone(teacher, kv_mode):
    with torch.no_grad():
        prefix, _ = teacher.preprocess(_batch(3), TASK)
        noise = _noise(teacher, 3)
        plan = [[True, False, True], [False, True, False], [True, True, True]]
        together = sample_routed(teacher.model, prefix, noise, plan, kv_mode)
        for row in range(3):
            alone_prefix, _ = teacher.preprocess({k: v[row:row + 1] for k, v in _batch(3).items()}, TASK)
            alone = sample_routed(teacher.model, alone_prefix, noise[row:row + 1], [plan[row]], kv_mode)
            torch.testing.assert_close(together[row:row + 1], alone, rtol=1e-5, atol=1e-5)


def test_the_key_value_candidates_differ_only_where_a_layer_is_skipped(teacher):
    with torch.no_grad():
        prefix, _ = teacher.preprocess(_batch(), TASK)
        full, _ = routed_prefix(teacher.model, prefix, None)
        skip_middle = [[True, False, True]] * 2
        project, _ = routed_prefix(teacher.model, prefix, skip_middle, "project")
        reuse, _ = routed_prefix(teacher.model, prefix, skip_middle, "reuse")
        skipped, expert_skip = routed_prefix(teacher.model, prefix, skip_middle, "skip_expert")
    for cache in (project, reuse, skipped):  # layers before the skipped one are the teacher's
        torch.testing.assert_close(cache.layers[0].key, full.layers[0].key, rtol=0, atol=0)
    # project: the skipped layer's keys/values are its input's, which is layer 0's output, as in the teacher
    torch.testing.assert_close(project.layers[1].key, full.layers[1].key, rtol=0, atol=0)
    torch.testing.assert_close(reuse.layers[1].value, full.layers[0].value, rtol=0, atol=0)
    assert skipped.layers[1] is None and skipped.cross[1] is None and expert_skip == [[False, True, False, False]] * 2
    # after the skip, layer 2's input lacks layer 1's update in every mode
    assert not torch.allclose(project.layers[2].key, full.layers[2].key)


def test_hard_gated_training_computes_what_inference_runs(teacher):
    """h + m (F(h) - h) with m in {0, 1} over every layer = the routed prefix that skips the m = 0 layers."""
    model = teacher.model
    plan = [[True, False, True], [False, True, False]]
    with torch.no_grad():
        prefix, _ = teacher.preprocess(_batch(), TASK)
        masks = torch.tensor(plan, dtype=torch.float32)
        trained, _ = gated_prefix(model, prefix, masks)
        inferred, _ = routed_prefix(model, prefix, plan, "project")
        x_t, time_ = flow_noise_and_time(0, 0, 2, model.config.chunk_size, model.config.max_action_dim, "cpu")
        torch.testing.assert_close(model.denoise_step(x_t, time_, trained), model.denoise_step(x_t, time_, inferred),
                                   rtol=1e-5, atol=1e-5)


def test_flops_count_what_runs_against_an_independent_count(teacher):
    model, text = teacher.model, teacher.model.vlm.config.text_config
    width, heads, kv_heads, head_dim = model.width, model.num_heads, model.num_kv_heads, model.head_dim
    with torch.no_grad():
        prefix, _ = teacher.preprocess({k: v[:1] for k, v in _batch().items()}, TASK)
        images = teacher._prepare_images(_batch(1), 1)[0]
        tokens = prefix.embeddings.shape[1]
        full = chunk_flops(model, prefix, images, None)
        by_mode = {mode: chunk_flops(model, prefix, images, [True, False, True], mode) for mode in KV_MODES}
    kv = 2 * tokens * width * (2 * kv_heads * head_dim)  # RMSNorm uncounted; k and v projections
    layer = (2 * tokens * width * heads * head_dim + kv + 2 * 2 * tokens * tokens * heads * head_dim
             + 2 * tokens * heads * head_dim * width + 3 * 2 * tokens * width * text.intermediate_size)
    assert full["prefix"] - by_mode["project"]["prefix"] == layer - kv
    assert full["prefix"] - by_mode["reuse"]["prefix"] == layer
    assert by_mode["project"]["expert"] == by_mode["reuse"]["expert"] == full["expert"]
    assert by_mode["skip_expert"]["expert_per_step"] < full["expert_per_step"]
    assert full["vision_per_camera"][0] == full["vision_per_camera"][1] > 0  # both resized to 64 x 64
    assert full["total"] == full["vision"] + full["prefix"] + model.config.num_steps * full["expert_per_step"]


def test_route_costs_add_up_to_the_counted_chunk_for_every_route(teacher):
    """The piece-wise cost model (used to price routes at SmolVLA's published size) is the count."""
    import itertools

    with torch.no_grad():
        one = {k: v[:1] for k, v in _batch().items()}
        prefix, _ = teacher.preprocess(one, TASK)
        images = teacher._prepare_images(one, 1)[0]
    costs = RouteCosts(teacher.model, prefix, images)
    for plan in [None, *map(list, itertools.product([True, False], repeat=3))]:
        for mode in KV_MODES:
            counted, summed = chunk_flops(teacher.model, prefix, images, plan, mode), costs.total(plan, mode)
            assert {k: counted[k] for k in summed} == summed, (plan, mode)


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_result(teacher_dir, dataset, config_file, tmp_path):
    def command(out, *extra):
        args = _distill_args(teacher_dir, dataset, out, config_file, *extra)
        args[args.index("--distill-steps") + 1] = "16"
        return [sys.executable, "-m", "actdistill_ros.cli", *args]

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(command(reference), env=_env(), check=True, capture_output=True)
    proc = subprocess.Popen(command(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = killed / "checkpoints" / "distill.json"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if pointer.is_file() and json.loads(pointer.read_text())["step"] >= 8:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "student").exists()
    resumed = subprocess.run(command(killed, "--resume"), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at step" in resumed.stderr
    for name in ("model.safetensors", "router.safetensors"):
        expected, got = load_file(reference / "student" / name), load_file(killed / "student" / name)
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)


def test_a_student_is_refused_as_a_teacher(distilled, dataset, config_file, tmp_path, capsys):
    assert cli(_distill_args(distilled / "student", dataset, tmp_path / "again", config_file)) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a student" in err[0]


def test_demonstrations_with_other_cameras_are_one_line(teacher_dir, config_file, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    write_lerobot_dataset(other, lengths=(6, 6), cameras={"observation.images.front": (48, 64),
                                                          "observation.images.wrist": (32, 40)})
    assert cli(_distill_args(teacher_dir, other, tmp_path / "run", config_file)) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "observation.images.front" in err[0] and "observation.images.top" in err[0]
