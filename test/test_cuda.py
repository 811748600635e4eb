"""CUDA and bf16 paths of routed inference and distillation. Skipped without a GPU;
scripts/gpu_check.sh runs them (`pytest -m cuda`)."""

import warnings

import numpy as np
import pytest
import torch

from actdistill_ros.policies.actdistill import RouterConfig, RoutedStudent, run_backbone
from actdistill_ros.policies.vla import ReferenceVLA, VLAConfig
from actdistill_ros.policy import Policy, create_untrained_policy

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

INSTRUCTIONS = ["push the puck to the goal", "open the drawer", "reach the target", "press the button"]


def _observations(policy: Policy, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, 48, 64, 3), dtype=np.uint8)
    states = rng.normal(size=(batch, policy.vla.config.state_dim)).astype(np.float32)
    return images, [INSTRUCTIONS[i % 4] for i in range(batch)], states


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    # Input-independent gates spread well apart, so float32, bf16, CPU and GPU pick the same routes.
    return create_untrained_policy(tmp_path_factory.mktemp("cuda") / "student", size="tiny", keep=0.5)


@pytest.mark.parametrize("keep", [0.0, 0.5])
def test_float32_on_cuda_matches_the_cpu(weights, keep):
    cpu, gpu = Policy.load(weights, device="cpu"), Policy.load(weights, device="cuda")
    assert gpu.device.type == "cuda"
    cpu.keep_fraction = gpu.keep_fraction = keep
    images, instructions, states = _observations(cpu, 4)
    for a, b in zip(cpu.predict_batch(images, instructions, states), gpu.predict_batch(images, instructions, states)):
        assert a.executed_layers == b.executed_layers
        np.testing.assert_allclose(a.actions, b.actions, atol=1e-3)  # cuDNN convolutions may use TF32


@pytest.mark.parametrize("keep", [0.0, 0.5])
def test_bf16_on_cuda_runs_the_same_routes_with_close_actions(weights, keep):
    full, half = Policy.load(weights, device="cuda"), Policy.load(weights, device="cuda", dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    full.keep_fraction = half.keep_fraction = keep
    images, instructions, states = _observations(full, 4, seed=1)
    for a, b in zip(full.predict_batch(images, instructions, states), half.predict_batch(images, instructions, states)):
        assert a.executed_layers == b.executed_layers and b.actions.dtype == np.float32
        np.testing.assert_allclose(a.actions, b.actions, atol=0.05)


def _count_syncs(fn) -> int:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("batch", [1, 6])
@pytest.mark.parametrize("keep", [0.0, 0.5])
def test_routed_inference_syncs_with_the_host_once(batch, keep):
    torch.manual_seed(0)
    teacher = ReferenceVLA(VLAConfig.tiny(num_layers=8)).cuda().eval()
    student = RoutedStudent.derive_from(teacher, RouterConfig(budget_conditioned=True)).eval()
    student.router.bias_to_keep(0.5)
    torch.nn.init.normal_(student.router.gate.weight, std=0.15)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8))
    with torch.no_grad():
        encoded = student.vla.encode(images, [INSTRUCTIONS[i % 4] for i in range(batch)], torch.zeros(batch, 4))
        run_backbone(student.vla, encoded, student.execute_mask(encoded, keep_fraction=keep)[1])  # warm-up
        assert _count_syncs(lambda: run_backbone(student.vla, encoded, None)) == 0
        routed = _count_syncs(lambda: run_backbone(student.vla, encoded,
                                                   student.execute_mask(encoded, keep_fraction=keep)[1]))
    assert routed == 1, f"{routed} host syncs for one routed inference"


@pytest.mark.parametrize("keep", [0.0, 0.5])
def test_a_policy_inference_syncs_once_for_its_result_and_once_for_a_route(weights, tmp_path, keep, monkeypatch):
    """Without profiling, a teacher's predict waits for the device once (its chunk), a student's
    once more (its route); profiling adds a device sync per stage."""
    teacher = Policy.load(create_untrained_policy(tmp_path / "teacher", size="tiny", student=False), device="cuda")
    student = Policy.load(weights, device="cuda")
    student.keep_fraction = keep
    images, instructions, states = _observations(student, 1)
    for policy, syncs in ((teacher, 1), (student, 2)):
        policy.predict(images[0], instructions[0], states[0])  # warm-up: allocations, pinned buffers
        counted = _count_syncs(lambda: policy.predict(images[0], instructions[0], states[0]))
        assert counted == syncs, f"{counted} host syncs for one {'student' if policy.student else 'teacher'} predict"
    synchronize, fences = torch.cuda.synchronize, []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: fences.append(args) or synchronize(*args))
    student.predict(images[0], instructions[0], states[0])
    assert fences == []
    student.profile = True
    assert sorted(student.predict(images[0], instructions[0], states[0]).timings_ms) == [
        "backbone", "encode", "head", "total"]
    assert len(fences) == 3  # before encode, after routing, after the backbone


def test_bf16_autocast_training_step_trains_the_routes_that_run():
    torch.manual_seed(0)
    teacher = ReferenceVLA(VLAConfig.tiny(num_layers=8)).cuda()
    student = RoutedStudent.derive_from(teacher, RouterConfig(budget_conditioned=True, dropout=0.5))
    torch.nn.init.normal_(student.router.gate.weight, std=0.15)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        encoded = student.vla.encode(images, [INSTRUCTIONS[i % 4] for i in range(32)], torch.zeros(32, 4))
        with torch.no_grad():
            _, expected = student.eval().execute_mask(encoded, keep_fraction=0.5)
        student.train()
        routes = student.train_routes(encoded, "hard", 0.5)
        hiddens = student.gated_layers(encoded, routes.masks)
        loss = student.vla.predict_chunk(encoded.readout(hiddens[-1])).float().pow(2).mean()
    loss.backward()
    assert torch.equal(routes.masks.detach().bool(), expected)
    assert torch.isfinite(loss) and student.router.gate.weight.grad.abs().sum() > 0
