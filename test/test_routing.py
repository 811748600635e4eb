"""Router semantics: keep routing (top-k per observation), the budget-conditioned router, training
on the routes that run, and one host sync per routed inference."""

import json

import numpy as np
import pytest
import torch

from actdistill_ros.policies.actdistill import (RouterConfig, RoutedStudent, num_kept_layers, run_backbone,
                                                top_k_mask)
from actdistill_ros.policies.vla import ReferenceVLA, VLAConfig
from actdistill_ros.policy import Policy, create_untrained_policy, make_card
from actdistill_ros.weights import ActionSpace
from host_reads import DeviceTensor, on_device

INSTRUCTIONS = ["push the puck to the goal", "open the drawer", "reach the target", "press the button"]
NUM_LAYERS = 10


def _student(budget_conditioned=False, dropout=0.1, router_weight_std=0.15, seed=3) -> RoutedStudent:
    torch.manual_seed(seed)
    teacher = ReferenceVLA(VLAConfig.tiny(num_layers=NUM_LAYERS)).eval()
    student = RoutedStudent.derive_from(teacher, RouterConfig(dropout=dropout, budget_conditioned=budget_conditioned))
    student.router.bias_to_keep(0.5)
    torch.nn.init.normal_(student.router.gate.weight, std=router_weight_std)  # input-dependent routes
    return student.eval()


def _encoded(student: RoutedStudent, batch: int, seed: int = 0):
    config = student.vla.config
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, (batch, config.image_size, config.image_size, 3), dtype=np.uint8))
    states = torch.from_numpy(rng.normal(size=(batch, config.state_dim)).astype(np.float32))
    return student.vla.encode(images, [INSTRUCTIONS[i % 4] for i in range(batch)], states)


def _policy(student: RoutedStudent) -> Policy:
    return Policy(student, make_card(student, ActionSpace.metaworld()), torch.device("cpu"))


def _observations(policy: Policy, batch: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    size = policy.vla.config.image_size
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    states = rng.normal(size=(batch, policy.vla.config.state_dim)).astype(np.float32)
    return images, [INSTRUCTIONS[i % 4] for i in range(batch)], states


# ---- keep routing --------------------------------------------------------------------------------
def test_top_k_mask_keeps_the_highest_gates_and_breaks_ties_by_layer_index():
    gates = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.5, 0.5, 0.5, 0.5], [0.2, 0.8, 0.8, 0.8]])
    assert top_k_mask(gates, 2).tolist() == [[False, True, False, True], [True, True, False, False],
                                            [False, True, True, False]]
    assert top_k_mask(gates, 4).all() and top_k_mask(gates, 1).sum(1).tolist() == [1, 1, 1]


def test_kept_layer_count_is_round_keep_times_layers_and_at_least_one():
    assert [num_kept_layers(k, 12) for k in (0.3, 0.5, 0.8, 1.0)] == [4, 6, 10, 12]
    assert num_kept_layers(0.01, 12) == 1
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="keep fraction"):
            num_kept_layers(bad, 12)


def test_keep_routing_executes_exactly_k_layers_per_observation_monotone_in_keep():
    policy = _policy(_student())
    images, instructions, states = _observations(policy, 6)
    layer_gflops = policy.vla.layer_flops(policy.vla.config.num_tokens) / 1e9
    previous = None
    for keep in np.linspace(0.05, 1.0, 20):
        policy.keep_fraction = float(keep)
        outputs = policy.predict_batch(images, instructions, states)
        k = max(1, round(float(keep) * NUM_LAYERS))
        for out in outputs:
            assert len(out.executed_layers) == k and out.executed_fraction == k / NUM_LAYERS
            # every skipped layer saves a full layer (the readout layer is the last one either way)
            assert out.backbone_gflops == pytest.approx(out.full_backbone_gflops - (NUM_LAYERS - k) * layer_gflops)
            # the executed layers are the observation's k highest gates
            assert sorted(out.executed_layers) == sorted(np.argsort(-np.asarray(out.gates), kind="stable")[:k].tolist())
        if previous is not None:  # the router is not conditioned: more budget only adds layers
            assert all(set(p.executed_layers) <= set(o.executed_layers) for p, o in zip(previous, outputs))
        previous = outputs
    policy.keep_fraction = 0.5
    assert len({tuple(o.executed_layers) for o in policy.predict_batch(images, instructions, states)}) > 1, \
        "routes should depend on the observation"


def test_mixed_route_keep_batch_equals_each_sample_alone():
    policy = _policy(_student())
    policy.keep_fraction = 0.4
    images, instructions, states = _observations(policy, 5)
    batch = policy.predict_batch(images, instructions, states)
    assert len({tuple(o.executed_layers) for o in batch}) > 1
    for i, out in enumerate(batch):
        alone = policy.predict(images[i], instructions[i], states[i])
        assert alone.executed_layers == out.executed_layers
        np.testing.assert_allclose(alone.actions, out.actions, atol=1e-5)


def test_keep_fraction_zero_or_none_is_threshold_routing_and_bad_values_are_refused():
    student = _student()
    policy = _policy(student)
    images, instructions, states = _observations(policy, 4)
    threshold_routes = [o.executed_layers for o in policy.predict_batch(images, instructions, states)]
    policy.keep_fraction = 0.3
    assert policy.keep_fraction == 0.3
    policy.keep_fraction = None
    assert policy.keep_fraction == 0.0
    assert [o.executed_layers for o in policy.predict_batch(images, instructions, states)] == threshold_routes
    for bad in (-0.1, 1.01, float("nan"), "half"):
        with pytest.raises(ValueError, match="keep_fraction"):
            policy.keep_fraction = bad
    assert policy.keep_fraction == 0.0, "a refused value changes nothing"
    teacher = Policy(student.vla, make_card(student.vla, ActionSpace.metaworld()), torch.device("cpu"))
    teacher.keep_fraction = 0.3  # teachers ignore the router knobs
    assert teacher.keep_fraction == 0.0
    assert all(o.executed_fraction == 1.0 for o in teacher.predict_batch(images, instructions, states))


def test_card_default_keep_fraction_round_trips_and_old_cards_load(tmp_path):
    path = create_untrained_policy(tmp_path / "student", size="tiny", keep=0.5, router_weight_std=0.3)
    card_path = path / "card.json"
    card = json.loads(card_path.read_text())
    assert card["default_keep_fraction"] == 0.0
    card["default_keep_fraction"] = 0.25
    card_path.write_text(json.dumps(card))
    policy = Policy.load(path, device="cpu")
    assert policy.keep_fraction == 0.25
    out = policy.predict(np.zeros((32, 32, 3), np.uint8), "open the drawer", np.zeros(4))
    assert out.executed_fraction == round(0.25 * policy.num_layers) / policy.num_layers
    # A card written before keep routing (no such field, no budget conditioning) loads as threshold routing.
    del card["default_keep_fraction"]
    del card["router_config"]["budget_conditioned"], card["router_config"]["threshold_keep"]
    card_path.write_text(json.dumps(card))
    assert Policy.load(path, device="cpu").keep_fraction == 0.0
    card["default_keep_fraction"] = 1.5
    card_path.write_text(json.dumps(card))
    with pytest.raises(ValueError, match="default_keep_fraction"):
        Policy.load(path, device="cpu")


# ---- budget-conditioned router -------------------------------------------------------------------
def test_a_conditioned_router_can_rank_layers_differently_per_budget():
    student = _student(budget_conditioned=True, router_weight_std=0.0)
    encoded = _encoded(student, 3)
    with torch.no_grad():
        student.router.gate.bias.copy_(torch.linspace(1.0, -1.0, NUM_LAYERS))  # prefers shallow layers
        # ... unless the budget is small: cos(pi * keep) is +1 at keep 0 and -1 at keep 1.
        student.router.budget_gate.weight[:, 0] = torch.linspace(-0.75, 0.75, NUM_LAYERS)
    _, small = student.execute_mask(encoded, keep_fraction=0.3)
    _, large = student.execute_mask(encoded, keep_fraction=0.8)
    assert small[0].nonzero().squeeze(1).tolist() == [7, 8, 9]
    assert large[0].nonzero().squeeze(1).tolist() == list(range(8))
    # Threshold routing tells the router the budget its threshold was calibrated for.
    _, calibrated = student.execute_mask(encoded, threshold=0.5)
    gates = student.router(encoded, student.router_config.threshold_keep)
    assert torch.equal(calibrated, gates >= 0.5)
    with pytest.raises(ValueError, match="budget-conditioned"):
        student.router(encoded)


def test_a_new_conditioned_router_starts_as_the_unconditioned_one():
    plain, conditioned = _student(), _student(budget_conditioned=True)
    missing, unexpected = conditioned.router.load_state_dict(plain.router.state_dict(), strict=False)
    assert missing == ["budget_gate.weight"] and unexpected == []
    encoded = _encoded(plain, 4)
    for keep in (0.3, 0.8):
        torch.testing.assert_close(conditioned.router(encoded, keep), plain.router(encoded))


# ---- training runs the routes that inference runs (router dropout on) ----------------------------
@pytest.mark.parametrize("keep", [0.0, 0.3, 0.6])
def test_train_mode_masks_are_the_eval_mode_routes(keep):
    student = _student(budget_conditioned=True, dropout=0.5, router_weight_std=0.3)
    with torch.no_grad():
        student.router.budget_gate.weight.normal_(std=0.5)
    encoded = _encoded(student, 64)
    _, expected = student.eval().execute_mask(encoded, keep_fraction=keep)
    student.train()
    torch.manual_seed(0)
    routes = student.train_routes(encoded, "hard", keep)
    assert torch.equal(routes.masks.detach().bool(), expected)
    if keep == 0.0:
        assert torch.equal(routes.threshold_masks.detach().bool(), expected)
    # The train-mode gates (dropout on) route differently: without the dropout-free decision,
    # training would run other routes than inference.
    drawn = top_k_mask(routes.gates.detach(), num_kept_layers(keep, NUM_LAYERS)) if keep else routes.gates >= 0.5
    assert not torch.equal(drawn, expected)
    # ... and the gradient still reaches the router through the train-mode gates.
    (routes.masks * torch.randn_like(routes.masks)).sum().backward()
    assert student.router.gate.weight.grad.abs().sum() > 0
    assert student.router.budget_gate.weight.grad.abs().sum() > 0


def test_hard_top_k_training_computes_the_keep_routed_inference_function():
    student = _student()
    encoded = _encoded(student, 5)
    with torch.no_grad():
        masks = student.train_routes(encoded, "hard", keep_fraction=0.4).masks
        trained = student.vla.predict_chunk(encoded.readout(student.gated_layers(encoded, masks)[-1]))
        _, execute = student.execute_mask(encoded, keep_fraction=0.4)
        inferred = student.vla.predict_chunk(run_backbone(student.vla, encoded, execute))
    assert torch.equal(masks.bool(), execute) and execute.sum(1).tolist() == [4] * 5
    torch.testing.assert_close(trained, inferred, atol=1e-5, rtol=1e-5)


# ---- one host sync per routed inference ----------------------------------------------------------
def test_the_host_read_counter_sees_a_per_layer_sync():
    DeviceTensor.host_reads = []
    runs = torch.ones(3, dtype=torch.bool).as_subclass(DeviceTensor)
    bool(runs.all()), runs.nonzero(), runs.to("cpu"), runs.sum().item()
    assert DeviceTensor.host_reads == ["__bool__", "nonzero", "to", "item"]
    DeviceTensor.host_reads = []
    runs.to(torch.float32), runs.to(torch.device("meta"))  # no host reads
    assert DeviceTensor.host_reads == []


@pytest.mark.parametrize("routing", ["threshold", "keep"])
@pytest.mark.parametrize("batch", [1, 6])
def test_routed_inference_reads_the_device_once(routing, batch):
    student = _student(budget_conditioned=True)
    keep = 0.5 if routing == "keep" else 0.0
    with torch.no_grad():
        expected = run_backbone(student.vla, _encoded(student, batch), student.execute_mask(
            _encoded(student, batch), keep_fraction=keep)[1])
        encoded = on_device(_encoded(student, batch))
        DeviceTensor.host_reads = []
        _, execute = student.execute_mask(encoded, keep_fraction=keep)
        assert DeviceTensor.host_reads == [], "deciding the route must not wait for the device"
        hidden = run_backbone(student.vla, encoded, execute)
    assert 0 < int(execute.as_subclass(torch.Tensor).sum()) < execute.numel()
    assert DeviceTensor.host_reads == ["to"], DeviceTensor.host_reads
    torch.testing.assert_close(hidden.as_subclass(torch.Tensor), expected)


def test_a_training_step_after_an_inference_at_the_same_budget():
    """The router's features of a dial position are made once; made in inference mode they could
    not be used by a training step (inference tensors cannot be saved for backward)."""
    student = _student(budget_conditioned=True)
    encoded = _encoded(student, 2)
    with torch.inference_mode():
        student.execute_mask(_encoded(student, 2), keep_fraction=0.37)
    student.train()
    gates = student.train_routes(encoded, "hard", keep_fraction=0.37).gates
    gates.sum().backward()
    assert student.router.budget_gate.weight.grad is not None
