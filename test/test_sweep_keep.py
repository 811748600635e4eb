"""The compute dial sweep: training-free baseline routes on a teacher, the 95% Wilson interval, and
`actdistill eval-sim --sweep-keep` (student vs baselines at equal backbone FLOPs, real Meta-World)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from actdistill_ros.policies.actdistill import RouterConfig, RoutedStudent
from actdistill_ros.policies.vla import ReferenceVLA, VLAConfig
from actdistill_ros.policy import Policy, StaticRoute, create_untrained_policy, make_card
from actdistill_ros.sim.report import summarise, wilson_interval, EpisodeOutcome
from actdistill_ros.weights import ActionSpace
from sim_harness import require_simulator

KEEPS = (0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
LAYERS = 12


def _expected_backbone_gflops(config: VLAConfig, k: int) -> float:
    """GFLOPs of k reference-VLA layers for one sample, from the block's architecture (multiply-add
    = 2 FLOPs): the first k - 1 layers compute all N tokens, the last only the action query (1 row)
    with keys and values from all N. Written out here, not taken from the code under test."""
    n, w, m = config.num_tokens, config.width, config.mlp_width
    full_layer = (2 * n * w * 3 * w  # q, k, v projections
                  + 2 * n * w * w  # attention output projection
                  + 2 * n * w * m + 2 * n * m * w  # MLP up and down
                  + 2 * n * n * w + 2 * n * n * w)  # scores and weighted sum
    readout_layer = 2 * n * w * 2 * w + 2 * w * w + 2 * w * w + 2 * w * m + 2 * m * w + 2 * n * w + 2 * n * w
    return 0.0 if k == 0 else ((k - 1) * full_layer + readout_layer) / 1e9


def test_the_expected_gflops_formula_counts_a_tiny_config_by_hand():
    config = VLAConfig.tiny(num_layers=LAYERS, state_dim=4, action_dim=4)
    n, w, m = config.num_tokens, config.width, config.mlp_width
    assert (n, w, m) == (26, 64, 256)  # 16 patches + 8 words + state + query; tiny width 64, MLP x4
    # Full layer: qkv 638,976 + out 212,992 + MLP 1,703,936 + attention 173,056 = 2,728,960.
    # Readout layer: kv 425,984 + q 8,192 + out 8,192 + MLP 65,536 + attention 6,656 = 514,560.
    assert _expected_backbone_gflops(config, 1) * 1e9 == pytest.approx(514_560)
    assert _expected_backbone_gflops(config, 3) * 1e9 == pytest.approx(2 * 2_728_960 + 514_560)


def test_first_and_even_routes_run_exactly_their_layers():
    assert StaticRoute("first", 0.5, LAYERS).fixed_layers == [0, 1, 2, 3, 4, 5]
    assert StaticRoute("even", 0.5, LAYERS).fixed_layers == [1, 3, 5, 7, 9, 11]
    assert StaticRoute("even", 0.3, LAYERS).fixed_layers == [2, 5, 8, 11]  # k = round(3.6) = 4
    assert StaticRoute("even", 0.6, LAYERS).fixed_layers == [1, 2, 4, 6, 8, 9, 11]  # k = 7
    assert StaticRoute("even", 0.05, LAYERS).fixed_layers == [11]  # k = 1 keeps the last layer
    assert StaticRoute("even", 1.0, LAYERS).fixed_layers == list(range(LAYERS))
    for keep in KEEPS:
        k = round(keep * LAYERS)
        even = StaticRoute("even", keep, LAYERS).fixed_layers
        assert len(set(even)) == k and even[-1] == LAYERS - 1
        mask = StaticRoute("first", keep, LAYERS).mask(3)
        assert mask.shape == (3, LAYERS) and mask.dtype == torch.bool
        assert (mask == torch.arange(LAYERS).lt(k)).all()


def test_random_route_draws_k_layers_per_observation_reproducibly():
    masks = StaticRoute("random", 0.5, LAYERS, seed=7).mask(64)
    assert (masks.sum(1) == 6).all()
    assert len({tuple(row.tolist()) for row in masks}) > 32  # each observation draws its own layers
    assert 0 < masks.float().mean(0).min() and masks.float().mean(0).max() < 1  # every layer sometimes
    again = StaticRoute("random", 0.5, LAYERS, seed=7)
    assert torch.equal(again.mask(64), masks)
    assert not torch.equal(StaticRoute("random", 0.5, LAYERS, seed=8).mask(64), masks)
    # Consecutive calls (one per policy step) keep drawing new routes.
    route = StaticRoute("random", 0.5, LAYERS, seed=7)
    assert not torch.equal(route.mask(1), route.mask(1))
    with pytest.raises(ValueError, match="static route 'last'"):
        StaticRoute("last", 0.5, LAYERS)
    with pytest.raises(ValueError, match="keep fraction"):
        StaticRoute("first", 0.0, LAYERS)


@pytest.fixture(scope="module")
def twelve_layer_policies():
    torch.manual_seed(0)
    space = ActionSpace.metaworld()
    vla = ReferenceVLA(VLAConfig.tiny(num_layers=LAYERS, state_dim=4, action_dim=space.dim))
    teacher = Policy(vla, make_card(vla, space), torch.device("cpu"))
    student_model = RoutedStudent.derive_from(ReferenceVLA(VLAConfig.tiny(num_layers=LAYERS, state_dim=4,
                                                                         action_dim=space.dim)), RouterConfig())
    torch.nn.init.normal_(student_model.router.gate.weight, std=1.0)  # gates depend on the observation
    student = Policy(student_model, make_card(student_model, space), torch.device("cpu"))
    return teacher, student


def _observations(batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    return images, ["reach the goal"] * batch, rng.normal(size=(batch, 4)).astype(np.float32)


def test_executed_fraction_and_gflops_match_k_for_every_method(twelve_layer_policies):
    teacher, student = twelve_layer_policies
    images, instructions, states = _observations(5)
    full = teacher.predict_batch(images, instructions, states)
    assert full[0].executed_fraction == 1.0
    assert full[0].backbone_gflops == full[0].full_backbone_gflops == pytest.approx(
        _expected_backbone_gflops(teacher.vla.config, LAYERS))
    for keep in KEEPS:
        k = round(keep * LAYERS)
        student.keep_fraction = keep
        runs = {"student": student.predict_batch(images, instructions, states)}
        for kind in StaticRoute.KINDS:
            teacher.static_route = StaticRoute(kind, keep, LAYERS, seed=1)
            runs[kind] = teacher.predict_batch(images, instructions, states)
        for method, outputs in runs.items():
            for out in outputs:
                assert len(out.executed_layers) == k, (method, keep)
                assert out.executed_fraction == pytest.approx(k / LAYERS), (method, keep)
                assert out.backbone_gflops == pytest.approx(_expected_backbone_gflops(teacher.vla.config, k)), (
                    method, keep)
        assert all(out.executed_layers == list(range(k)) for out in runs["first"])
        assert all(out.executed_layers == StaticRoute("even", keep, LAYERS).fixed_layers for out in runs["even"])
        if k < LAYERS:
            assert len({tuple(out.executed_layers) for out in runs["random"]}) > 1  # per observation
            # Skipping layers changes the actions: the route really reached the backbone.
            assert not np.allclose(runs["first"][0].actions, full[0].actions)
        else:
            for kind in StaticRoute.KINDS:
                np.testing.assert_allclose(runs[kind][0].actions, full[0].actions, atol=1e-6)
    teacher.static_route = None
    np.testing.assert_array_equal(teacher.predict_batch(images, instructions, states)[0].actions, full[0].actions)
    with pytest.raises(ValueError, match="student"):
        student.static_route = StaticRoute("first", 0.5, LAYERS)
    with pytest.raises(ValueError, match="4 layers"):
        teacher.static_route = StaticRoute("first", 0.5, 4)


def test_wilson_interval_matches_known_values():
    # 8 of 10: the 95% Wilson score interval is 0.4902 .. 0.9433 (Wilson 1927; Newcombe 1998, table I).
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0
    outcomes = [EpisodeOutcome("reach", 10000 + i, i < 8, 10, 10 if i < 8 else None, 1) for i in range(10)]
    assert summarise(outcomes, 1)["success_ci95"] == pytest.approx([0.4902, 0.9433], abs=1e-4)


# ------------------------------------------------------------------------------ the sweep, closed loop
@pytest.fixture
def simulator():
    """Skips without Meta-World, or fails with ACTDISTILL_REQUIRE_SIM=1 (make test)."""
    require_simulator()


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    return (create_untrained_policy(root / "student", size="tiny", student=True, keep=0.5),
            create_untrained_policy(root / "teacher", size="tiny", student=False))


def _fine_tune_two_layers(teacher, tmp_path_factory, layer_choice: str):
    """Two of the tiny teacher's 4 layers (--layer-choice), fine-tuned on generated demos for a few
    tiny steps at a learning rate that barely moves them."""
    from actdistill_ros.cli import main as cli
    from actdistill_ros.data.synthetic import write_synthetic_demos

    demos = write_synthetic_demos(tmp_path_factory.mktemp("bags"), episodes=4, length=8)
    out = tmp_path_factory.mktemp(layer_choice)
    assert cli(["train-teacher", "--data", str(demos), "--out", str(out), "--init-from", str(teacher),
                "--layers", "2", "--layer-choice", layer_choice, "--steps", "3", "--batch-size", "4", "--lr", "1e-7",
                "--val-fraction", "0", "--seed", "1", "--action-space", "metaworld", "--device", "cpu"]) == 0
    return out / "teacher"


@pytest.fixture(scope="module")
def truncated_weights(tiny_weights, tmp_path_factory):
    """The tiny teacher's first 2 of 4 layers, fine-tuned."""
    return _fine_tune_two_layers(tiny_weights[1], tmp_path_factory, "first")


@pytest.fixture(scope="module")
def even_truncated_weights(tiny_weights, tmp_path_factory):
    """The tiny teacher's layers 1 and 3 of 0..3 (evenly spaced, the last kept), fine-tuned."""
    return _fine_tune_two_layers(tiny_weights[1], tmp_path_factory, "even")


def test_train_teacher_init_from_keeps_evenly_spaced_layers(tiny_weights, even_truncated_weights, capsys, tmp_path):
    from safetensors.torch import load_file

    from actdistill_ros.cli import main as cli

    teacher = load_file(str(tiny_weights[1] / "model.safetensors"))
    even = load_file(str(even_truncated_weights / "model.safetensors"))
    for new, old in ((0, 1), (1, 3)):  # renumbered in order
        torch.testing.assert_close(even[f"layers.{new}.fc1.weight"], teacher[f"layers.{old}.fc1.weight"],
                                   atol=1e-4, rtol=0)
    assert not any(name.startswith(("layers.2.", "layers.3.")) for name in even)
    card = json.loads((even_truncated_weights / "card.json").read_text())
    assert card["provenance"]["kept_layers"] == [1, 3] and card["vla_config"]["num_layers"] == 2
    assert cli(["train-teacher", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--size", "tiny",
                "--layer-choice", "even"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--layer-choice even" in err and "--init-from" in err, err


def test_train_teacher_init_from_keeps_the_first_layers(tiny_weights, truncated_weights, capsys, tmp_path):
    from safetensors.torch import load_file

    from actdistill_ros.cli import main as cli

    teacher = load_file(str(tiny_weights[1] / "model.safetensors"))
    truncated = load_file(str(truncated_weights / "model.safetensors"))
    assert {n.split(".")[1] for n in truncated if n.startswith("layers.")} == {"0", "1"}
    assert set(truncated) == {n for n in teacher if not n.startswith(("layers.2.", "layers.3."))}
    for name, tensor in truncated.items():  # started from the teacher (3 steps at lr 1e-7 since)
        if not name.endswith(("_mean", "_std")):
            torch.testing.assert_close(tensor, teacher[name], atol=1e-4, rtol=0)
    card = json.loads((truncated_weights / "card.json").read_text())
    assert card["vla_config"]["num_layers"] == 2 and card["provenance"]["init_from"] == str(tiny_weights[1])
    assert cli(["train-teacher", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--init-from",
                str(tiny_weights[1]), "--layers", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--layers 5" in err and "1..4" in err, err


def test_train_teacher_init_from_at_a_higher_resolution_resamples_positions(tiny_weights, capsys, tmp_path):
    from safetensors.torch import load_file

    from actdistill_ros.cli import main as cli
    from actdistill_ros.data.synthetic import write_synthetic_demos
    from actdistill_ros.policies.vla.modeling_vla import resample_visual_positions

    demos = write_synthetic_demos(tmp_path / "bags", episodes=4, length=8)
    teacher = load_file(str(tiny_weights[1] / "model.safetensors"))
    grid = round(teacher["visual_pos"].shape[1] ** 0.5)  # tiny: 32 px, 8 px patches
    assert cli(["train-teacher", "--data", str(demos), "--out", str(tmp_path / "hi"), "--init-from",
                str(tiny_weights[1]), "--image-size", "48", "--steps", "2", "--batch-size", "4", "--lr", "1e-7",
                "--val-fraction", "0", "--action-space", "metaworld", "--device", "cpu"]) == 0
    card = json.loads((tmp_path / "hi" / "teacher" / "card.json").read_text())
    assert card["vla_config"]["image_size"] == 48 and card["vla_config"]["num_layers"] == 4
    hi = load_file(str(tmp_path / "hi" / "teacher" / "model.safetensors"))
    assert hi["visual_pos"].shape == (1, 36, teacher["visual_pos"].shape[2])
    torch.testing.assert_close(hi["visual_pos"], resample_visual_positions(teacher["visual_pos"], 6),
                               atol=1e-4, rtol=0)
    for name in ("patch_embed.weight", "layers.3.fc2.weight", "action_head.2.weight"):
        torch.testing.assert_close(hi[name], teacher[name], atol=1e-4, rtol=0)
    output = Policy.load(tmp_path / "hi" / "teacher", device="cpu").predict(
        np.zeros((48, 48, 3), np.uint8), "push", np.zeros(4, np.float32))
    assert np.isfinite(output.actions).all()
    # A constant field stays constant, the same grid is returned as is, and sizes the patches do not tile fail.
    constant = torch.full((1, grid * grid, 8), 0.5)
    torch.testing.assert_close(resample_visual_positions(constant, 7), torch.full((1, 49, 8), 0.5))
    assert resample_visual_positions(teacher["visual_pos"], grid) is teacher["visual_pos"]
    capsys.readouterr()
    assert cli(["train-teacher", "--data", str(demos), "--out", str(tmp_path / "bad"), "--init-from",
                str(tiny_weights[1]), "--image-size", "50"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--image-size 50" in err and "multiple of 8" in err, err


def test_train_teacher_init_from_on_demos_read_without_a_state_drops_the_state_token(tiny_weights, tmp_path):
    from safetensors.torch import load_file

    from actdistill_ros.cli import main as cli
    from actdistill_ros.data.synthetic import write_synthetic_demos

    demos = write_synthetic_demos(tmp_path / "bags", episodes=4, length=8)
    assert cli(["train-teacher", "--data", str(demos), "--state-topic", "", "--out", str(tmp_path / "blind"),
                "--init-from", str(tiny_weights[1]), "--steps", "2", "--batch-size", "4", "--lr", "1e-7",
                "--val-fraction", "0", "--action-space", "metaworld", "--device", "cpu"]) == 0
    card = json.loads((tmp_path / "blind" / "teacher" / "card.json").read_text())
    assert card["vla_config"]["state_dim"] == 0 and card["state_names"] == []
    teacher = load_file(str(tiny_weights[1] / "model.safetensors"))
    blind = load_file(str(tmp_path / "blind" / "teacher" / "model.safetensors"))
    assert set(blind) == {name for name in teacher if not name.startswith("state_embed.")}
    torch.testing.assert_close(blind["layers.0.fc1.weight"], teacher["layers.0.fc1.weight"], atol=1e-4, rtol=0)
    policy = Policy.load(tmp_path / "blind" / "teacher", device="cpu")
    assert np.isfinite(policy.predict(np.zeros((32, 32, 3), np.uint8), "push").actions).all()  # no state asked


@pytest.mark.sim
def test_sweep_keep_writes_one_curve_per_method_with_intervals(simulator, tmp_path, tiny_weights, truncated_weights,
                                                               even_truncated_weights):
    from actdistill_ros.sim import evaluate as evaluate_mod

    student = Policy.load(tiny_weights[0], device="cpu")
    teacher = Policy.load(tiny_weights[1], device="cpu")
    layers = student.num_layers
    chunk = student.card.vla_config["chunk_size"]
    keeps = [0.3, 0.5, 1.0]
    truncated = Policy.load(truncated_weights, device="cpu")
    even_truncated = Policy.load(even_truncated_weights, device="cpu")
    result = evaluate_mod.sweep_keep(student, teacher, keeps, "reach", 2, horizon=8, execute_steps=chunk,
                                     finetuned_truncated=[truncated, even_truncated], out_dir=tmp_path / "sweep",
                                     progress=False)
    assert list(result["methods"]) == ["student", "first", "even", "random", "finetuned-first", "finetuned-even"]
    for method in ("finetuned-first", "finetuned-even"):
        assert [p["k"] for p in result["methods"][method]] == [2]  # at its own k
    for method, points in result["methods"].items():
        assert [p["keep"] for p in points] == (keeps if not method.startswith("finetuned-") else [0.5])
        for p in points:
            s = p["overall"]
            k = max(1, round(p["keep"] * layers))
            assert p["k"] == k and s["episodes"] == 2
            assert s["executed_fraction"] == pytest.approx(k / layers), (method, p["keep"])
            # equal k, equal FLOPs: the fine-tuned truncated model's k layers cost the student's k
            assert s["backbone_gflops_per_call"] == pytest.approx(_expected_backbone_gflops(student.vla.config, k))
            low, high = s["success_ci95"]
            assert 0.0 <= low <= s["success_rate"] <= high <= 1.0 and high - low > 0.3  # 2 episodes: wide
    # Restored: the student's card operating point, the teacher on every layer.
    assert student.keep_fraction == student.card.default_keep_fraction and teacher.static_route is None
    on_disk = json.loads((tmp_path / "sweep" / "sweep_keep.json").read_text())
    assert on_disk["methods"].keys() == result["methods"].keys()
    markdown = (tmp_path / "sweep" / "sweep_keep.md").read_text()
    for method, points in result["methods"].items():
        assert markdown.count(f"| {method} |") == len(points)
    assert (tmp_path / "sweep" / "sweep_keep.png").stat().st_size > 0
    with pytest.raises(ValueError, match="--teacher must be teacher weights"):
        evaluate_mod.sweep_keep(student, student, [0.5], "reach", 1, horizon=4, progress=False)
    with pytest.raises(ValueError, match="fewer layers"):
        evaluate_mod.sweep_keep(student, teacher, [0.5], "reach", 1, horizon=4, finetuned_truncated=[student],
                                progress=False)


@pytest.mark.sim
def test_sweep_keep_without_training_free_baselines_evaluates_the_teacher_once(simulator, tmp_path, tiny_weights,
                                                                               truncated_weights):
    from actdistill_ros.sim import evaluate as evaluate_mod

    student = Policy.load(tiny_weights[0], device="cpu")
    teacher = Policy.load(tiny_weights[1], device="cpu")
    truncated = Policy.load(truncated_weights, device="cpu")
    result = evaluate_mod.sweep_keep(student, teacher, [0.25, 1.0], "reach", 1, horizon=4, baseline_routes=(),
                                     finetuned_truncated=[truncated], progress=False)
    assert list(result["methods"]) == ["student", "teacher", "finetuned-first"]
    assert [p["k"] for p in result["methods"]["student"]] == [1, 4]
    assert [p["k"] for p in result["methods"]["teacher"]] == [4]
    with pytest.raises(ValueError, match="baseline routes \\['last'\\]"):
        evaluate_mod.sweep_keep(student, teacher, [0.5], "reach", 1, horizon=4, baseline_routes=("first", "last"),
                                progress=False)


@pytest.mark.sim
@pytest.mark.parametrize("keeps, expected", [(["0.5", "1.5"], "'1.5'"), (["0.5", "half"], "'half'"),
                                              (["0"], "'0'"), (["0.5"], "needs --teacher")])
def test_sweep_keep_bad_input_is_one_line(simulator, tmp_path, tiny_weights, capsys, keeps, expected):
    from actdistill_ros import cli

    teacher = [] if expected == "needs --teacher" else ["--teacher", str(tiny_weights[1])]
    code = cli.main(["eval-sim", "--policy", str(tiny_weights[0]), *teacher, "--sweep-keep", *keeps,
                     "--tasks", "reach", "--episodes", "1", "--out", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and expected in err, err
    assert not (tmp_path / "out").exists()


def test_through_ros_refuses_sweep_keep_in_one_line(capsys):
    from actdistill_ros import cli

    assert cli.main(["eval-sim", "--policy", "w", "--through-ros", "--sweep-keep", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--sweep-keep" in err and "in-process" in err


@pytest.mark.sim
def test_sweep_keep_resumes_after_a_kill_and_evaluates_full_depth_once(simulator, tmp_path, tiny_weights, monkeypatch):
    from actdistill_ros.sim import evaluate as evaluate_mod

    student = Policy.load(tiny_weights[0], device="cpu")
    teacher = Policy.load(tiny_weights[1], device="cpu")
    chunk = student.card.vla_config["chunk_size"]
    evaluated, real_evaluate = [], evaluate_mod._evaluate

    def counting_evaluate(policy, cache, tasks, seeds, execute_steps, gif_dir, label, progress):
        if len(evaluated) == kill_after:
            raise KeyboardInterrupt  # the run is killed part way
        evaluated.append(label)
        return real_evaluate(policy, cache, tasks, seeds, execute_steps, gif_dir, label, progress)

    monkeypatch.setattr(evaluate_mod, "_evaluate", counting_evaluate)
    sweep = dict(tasks="reach", episodes_per_task=1, horizon=6, execute_steps=chunk, out_dir=tmp_path / "s",
                 progress=False)
    kill_after = 3  # student 0.5, first 0.5, even 0.5
    with pytest.raises(KeyboardInterrupt):
        evaluate_mod.sweep_keep(student, teacher, [0.5, 1.0], **sweep)
    assert (tmp_path / "s" / "sweep_keep.partial.json").is_file() and not (tmp_path / "s" / "sweep_keep.json").exists()
    with pytest.raises(ValueError, match="other weights or settings"):
        evaluate_mod.sweep_keep(student, teacher, [0.5, 1.0], **{**sweep, "horizon": 7}, resume=True)

    kill_after = None
    evaluated.clear()
    result = evaluate_mod.sweep_keep(student, teacher, [0.5, 1.0], **sweep, resume=True)
    # Only what the killed run had not finished; at k = L one teacher evaluation serves every route.
    assert evaluated == ["random keep 0.50", "student keep 1.00", "first keep 1.00"]
    assert [len(points) for points in result["methods"].values()] == [2, 2, 2, 2]
    full = [result["methods"][route][1] for route in evaluate_mod.BASELINE_ROUTES]
    assert all(point["overall"] == full[0]["overall"] and point["keep"] == 1.0 for point in full)
    assert not (tmp_path / "s" / "sweep_keep.partial.json").exists()
    assert json.loads((tmp_path / "s" / "sweep_keep.json").read_text())["methods"].keys() == result["methods"].keys()


def test_evaluation_reports_name_the_routing_that_ran():
    from actdistill_ros.sim.report import routing_label

    assert routing_label({"is_student": False, "threshold": 0.5, "keep_fraction": 0.0}) == "every layer"
    assert routing_label({"is_student": True, "threshold": 0.5, "keep_fraction": 0.5}) == "keep 0.50"
    assert routing_label({"is_student": True, "threshold": 0.3, "keep_fraction": 0.0}) == "threshold 0.30"


def test_train_teacher_init_from_a_one_camera_teacher_adds_cameras(tiny_weights, capsys, tmp_path):
    from safetensors.torch import load_file

    from actdistill_ros.cli import main as cli
    from actdistill_ros.data.synthetic import write_synthetic_demos

    cameras = ["/camera/image_raw", "/camera_topview/image_raw"]
    demos = write_synthetic_demos(tmp_path / "bags", episodes=4, length=8, cameras=cameras)
    camera_flags = [flag for topic in cameras for flag in ("--camera-topic", topic)]
    assert cli(["train-teacher", "--data", str(demos), "--out", str(tmp_path / "two"), "--init-from",
                str(tiny_weights[1]), *camera_flags, "--steps", "2", "--batch-size", "4", "--lr", "1e-7",
                "--val-fraction", "0", "--action-space", "metaworld", "--device", "cpu"]) == 0
    card = json.loads((tmp_path / "two" / "teacher" / "card.json").read_text())
    assert card["vla_config"]["num_cameras"] == 2 and card["camera_names"] == cameras
    teacher = load_file(str(tiny_weights[1] / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "teacher" / "model.safetensors"))
    assert set(two) == set(teacher) | {"camera_embed"}
    torch.testing.assert_close(two["camera_embed"], torch.zeros_like(two["camera_embed"]), atol=1e-4, rtol=0)
    for name in ("patch_embed.weight", "visual_pos", "layers.3.fc2.weight", "action_head.2.weight"):
        torch.testing.assert_close(two[name], teacher[name], atol=1e-4, rtol=0)
    frames = [np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8)]
    output = Policy.load(tmp_path / "two" / "teacher", device="cpu").predict(frames, "push", np.zeros(4, np.float32))
    assert np.isfinite(output.actions).all()
    # A teacher that already takes two cameras is not re-cut to another count.
    capsys.readouterr()
    one_camera = write_synthetic_demos(tmp_path / "one", episodes=2, length=8)
    assert cli(["train-teacher", "--data", str(one_camera), "--out", str(tmp_path / "bad"), "--init-from",
                str(tmp_path / "two" / "teacher")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "takes 2 cameras, the demos give 1" in err, err
