"""pi0 / pi0.5 students: the routed computation, its FLOPs, the weights under LeRobot's names, and a
pi0.5 student served through Policy.load (the node's and replay-eval's loader) with its dial."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from actdistill_ros.policies.actdistill import RouterConfig
from actdistill_ros.policies.pi0 import PI0Policy
from actdistill_ros.policies.pi0.compute_pi0 import PI0RouteCosts, chunk_flops, random_observation
from actdistill_ros.policies.pi0.routing_pi0 import RoutedPI0, gated_prefix, lerobot_state, sample_routed
from actdistill_ros.policies.smolvla.routing_smolvla import KV_MODES

FIXTURES = Path(__file__).parent / "fixtures" / "lerobot" / "pi0"
TOKENIZER = FIXTURES / "paligemma_tokenizer"
VARIANTS = ("pi0", "pi05")


def load(variant: str) -> tuple[PI0Policy, dict, str]:
    case = FIXTURES / variant
    policy = PI0Policy.load(case / "policy", TOKENIZER)
    return policy, load_file(case / "batch.safetensors"), json.loads((case / "case.json").read_text())["task"]


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_routes_run_the_teacher_when_every_layer_runs_and_rows_do_not_mix(variant):
    policy, batch, task = load(variant)
    model = policy.model
    prefix, size = policy.preprocess(batch, task)
    noise = policy.start_noise(size, torch.Generator().manual_seed(0))
    teacher = model.sample_actions(prefix, noise)
    layers = model.num_vlm_layers - 1
    for mode in KV_MODES:
        assert torch.equal(sample_routed(model, prefix, noise, [[True] * layers] * size, mode), teacher)
    cache, hiddens = gated_prefix(model, prefix, None)
    assert len(hiddens) == layers and torch.equal(model.sample_actions(prefix, noise, cache=cache), teacher)
    # Training's residual gates with hard 0/1 masks are project mode's skips.
    plan = [True, False, True]
    cache, _ = gated_prefix(model, prefix, torch.tensor([plan] * size, dtype=torch.float32))
    projected = sample_routed(model, prefix, noise, [plan] * size, "project")
    assert torch.allclose(model.sample_actions(prefix, noise, cache=cache), projected, atol=1e-4)
    assert ((projected - teacher) ** 2).mean() > 1e-6  # a skipped layer changes the chunk
    # Two rows on different routes: each as if run alone, under every mode.
    plans = [[True, False, True], [False, True, False]]
    for mode in KV_MODES:
        both = sample_routed(model, prefix, noise, plans, mode)
        for row in range(size):
            alone = sample_routed(model, prefix, noise, [plans[row]] * size, mode)[row]
            assert torch.allclose(both[row], alone, atol=1e-4), (mode, row)


@pytest.mark.parametrize("variant", VARIANTS)
def test_route_costs_are_the_counted_run_and_every_routed_layer_counts(variant):
    policy, _, _ = load(variant)
    model = policy.model
    prefix, images = random_observation(model, "cpu")
    costs = PI0RouteCosts(model, prefix, images)
    assert len(costs.vision) == len(policy.config.image_features)  # a placeholder camera runs the tower too
    plans = [None, [True, False, True], [False, False, False], [False, True, True]]
    for plan in plans:
        for mode in KV_MODES:
            assert costs.total(plan, mode)["total"] == chunk_flops(model, prefix, images, plan, mode)["total"]
    full, one_skip = costs.total(None), {m: costs.total([True, False, True], m) for m in KV_MODES}
    assert full["total"] > one_skip["project"]["total"] > one_skip["reuse"]["total"]
    assert one_skip["project"]["expert"] == full["expert"] > one_skip["skip_expert"]["expert"]
    assert full["prefix"] - one_skip["project"]["prefix"] == costs.full[1] - costs.kv[1] > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_weights_go_back_under_lerobots_names(variant):
    policy, _, _ = load(variant)
    stored = load_file(FIXTURES / variant / "policy" / "model.safetensors")
    written = lerobot_state(policy.model, FIXTURES / variant / "policy" / "model.safetensors")
    assert written.keys() == stored.keys()
    assert all(written[k].dtype == stored[k].dtype and torch.equal(written[k], stored[k]) for k in stored)


def pi05_student(tmp_path: Path) -> Path:
    """A pi0.5 student directory as ``actdistill distill`` lays it out (LeRobot's files, the router,
    a card of family pi0, vlm_processor/), its router input-dependent so that routes differ."""
    from actdistill_ros.lerobot_card import synthesize_card

    directory = tmp_path / "pi05_student"
    shutil.copytree(FIXTURES / "pi05" / "policy", directory)
    shutil.copytree(TOKENIZER, directory / "vlm_processor")
    teacher = PI0Policy.load(directory, directory / "vlm_processor")
    routed = RoutedPI0.derive_from(teacher.model, RouterConfig())
    torch.manual_seed(0)
    torch.nn.init.normal_(routed.router.gate.weight, std=0.05)
    save_file({k: v.detach().contiguous() for k, v in routed.router.state_dict().items()},
              str(directory / "router.safetensors"))
    card = synthesize_card(directory)
    card.update(kind="student", router_config=routed.router_config.to_dict(), default_keep_fraction=0.67,
                default_threshold=0.5)
    card["vla_config"].update(num_layers=teacher.model.num_vlm_layers,
                              routing={"kv_mode": "project", "routed_layers": routed.num_routed_layers})
    (directory / "card.json").write_text(json.dumps(card))
    return directory


def test_a_pi05_student_serves_through_policy_load_with_its_dial(tmp_path):
    from actdistill_ros.policy import Policy

    directory = pi05_student(tmp_path)
    served = Policy.load(directory, "cpu")
    assert served.family == "pi0" and served.num_layers == 3 and served.keep_fraction == pytest.approx(0.67)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)]
    state = rng.standard_normal(5).astype(np.float32)
    outputs = {}
    for keep in (1.0, 0.67, 0.34):
        served.keep_fraction = keep
        outputs[keep] = served.predict(images, "open the drawer", state)
    assert [len(outputs[k].executed_layers) for k in (1.0, 0.67, 0.34)] == [3, 2, 1]
    gflops = [outputs[k].chunk_gflops for k in (1.0, 0.67, 0.34)]
    assert gflops[0] > gflops[1] > gflops[2] > 0
    assert outputs[1.0].backbone_gflops == outputs[1.0].full_backbone_gflops > outputs[0.34].backbone_gflops
    assert outputs[1.0].actions.shape == (served.policy.config.n_action_steps, 6)
    # keep 1.0 is the teacher: the same chunk as the LeRobot directory served without its router.
    (directory / "card.json").unlink()
    teacher = Policy.load(directory, "cpu")
    assert teacher.family == "pi0" and teacher.routed is None
    np.testing.assert_allclose(teacher.predict(images, "open the drawer", state).actions, outputs[1.0].actions,
                               atol=1e-5)


def test_a_pi05_teacher_distils_into_a_student_that_serves(tmp_path):
    """pi0.5 through `actdistill distill` (the state in the prompt, adaptive norms in the expert), then
    Policy.load. The generated dataset's stats hold no quantiles, so the policy normalises with
    MEAN_STD (a normalization_mapping LeRobot accepts for pi0.5)."""
    import sys

    from actdistill_ros.cli import main as cli
    from actdistill_ros.policy import Policy

    sys.path.insert(0, str(Path(__file__).parent))
    from lerobot_dataset_writer import write_lerobot_dataset
    from smolvla_teacher import make_smolvla_teacher
    from test_smolvla_end_to_end import FAST, JOINTS, LENGTHS

    root = tmp_path / "demos"
    write_lerobot_dataset(root, LENGTHS, action_names=JOINTS, state_names=JOINTS[:3])
    mean_std = {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    teacher = make_smolvla_teacher(tmp_path / "teacher", root, case="pi0/pi05")
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "normalization_mapping": mean_std}))
    for pipeline in ("policy_preprocessor.json", "policy_postprocessor.json"):
        data = json.loads((teacher / pipeline).read_text())
        for step in data["steps"]:
            if "norm_map" in step.get("config", {}):
                step["config"]["norm_map"] = mean_std
        (teacher / pipeline).write_text(json.dumps(data))
    assert cli(["distill", "--teacher", str(teacher), "--data", str(root), "--out", str(tmp_path / "run"),
                "--vlm-processor", str(TOKENIZER), *FAST]) == 0
    student = tmp_path / "run" / "student"
    assert json.loads((student / "config.json").read_text())["type"] == "pi05"
    served = Policy.load(student, "cpu")
    assert served.family == "pi0" and served.routed is not None and served.num_layers == 3
    frames = [np.full((48, 64, 3), 90, np.uint8), np.full((32, 40, 3), 160, np.uint8)]
    out = served.predict(frames, "open the drawer", np.zeros(3, np.float32))
    assert out.actions.shape == (config["n_action_steps"], 4) and np.isfinite(out.actions).all()
    assert 0 < len(out.executed_layers) < 3 and out.chunk_gflops > 0  # the card's default keep 0.5: 2 of 3


def test_a_bfloat16_pi0_is_served_in_float32_saying_so(tmp_path, caplog):
    from actdistill_ros.policy import Policy

    directory = tmp_path / "pi0_bf16"
    shutil.copytree(FIXTURES / "pi0" / "policy", directory)
    shutil.copytree(TOKENIZER, directory / "vlm_processor")
    reference = Policy.load(directory, "cpu")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    with caplog.at_level("WARNING"):
        served = Policy.load(directory, "cpu")
    assert any("bfloat16" in r.getMessage() and "float32" in r.getMessage() for r in caplog.records)
    frames = [np.full((24, 40, 3), 70, np.uint8), np.full((72, 50, 3), 200, np.uint8)]
    state = np.linspace(-1, 1, 5).astype(np.float32)
    np.testing.assert_array_equal(served.predict(frames, "pick", state).actions,
                                  reference.predict(frames, "pick", state).actions)
