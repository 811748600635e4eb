"""Policy core: routed student vs teacher, routing semantics, FLOPs accounting, weights I/O."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from actdistill_ros.data.images import resize_rgb
from actdistill_ros.policies.actdistill import RouterConfig, RoutedStudent, run_backbone
from actdistill_ros.policies.vla import ReferenceVLA, VLAConfig
from actdistill_ros.policy import (Policy, StaticRoute, create_untrained_policy, make_card, resolve_device,
                                   save_model)
from actdistill_ros.weights import ActionSpace, WeightsError
from host_reads import DeviceTensor, on_device

INSTRUCTIONS = ["push the puck to the goal", "open the drawer", "reach the target", "press the button"]


def _observations(config: VLAConfig, batch: int, seed: int = 0):
    """(B, h, w, 3) frames with one camera, (B, C, h, w, 3) with several; not the model's size."""
    rng = np.random.default_rng(seed)
    cameras = () if config.num_cameras == 1 else (config.num_cameras,)
    images = rng.integers(0, 256, (batch, *cameras, 40, 56, 3), dtype=np.uint8)  # resized inside
    states = rng.normal(size=(batch, config.state_dim)).astype(np.float32)
    return images, [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(batch)], states


def _model_sized(images: np.ndarray, config: VLAConfig) -> torch.Tensor:
    """Frames as the model's encode takes them: (B, C, S, S, 3), resized like the Policy does."""
    frames = images.reshape(len(images), config.num_cameras, *images.shape[-3:])
    return torch.from_numpy(np.stack([[resize_rgb(f, config.image_size) for f in sample] for sample in frames]))


def _teacher_and_student(keep=None, router_weight_std=0.0, seed=0, num_cameras=1):
    torch.manual_seed(seed)
    teacher = ReferenceVLA(VLAConfig.tiny(num_layers=6, num_cameras=num_cameras)).eval()
    student = RoutedStudent.derive_from(teacher, RouterConfig()).eval()
    if keep is not None:
        student.router.bias_to_keep(keep)
    if router_weight_std:
        torch.nn.init.normal_(student.router.gate.weight, std=router_weight_std)
    space = ActionSpace.metaworld()
    return (Policy(teacher, make_card(teacher, space), torch.device("cpu")),
            Policy(student, make_card(student, space), torch.device("cpu")))


def test_student_at_threshold_zero_runs_every_layer_and_reproduces_the_teacher():
    teacher, student = _teacher_and_student(keep=0.5)
    student.threshold = 0.0
    images, instructions, states = _observations(teacher.vla.config, 3)
    t_out = teacher.predict_batch(images, instructions, states)
    s_out = student.predict_batch(images, instructions, states)
    for t, s in zip(t_out, s_out):
        assert s.executed_layers == list(range(6)) and s.executed_fraction == 1.0
        np.testing.assert_allclose(s.actions, t.actions, atol=1e-6)
        assert s.backbone_gflops == pytest.approx(t.backbone_gflops)


def test_threshold_above_every_gate_runs_no_layer_and_count_is_monotone():
    _, student = _teacher_and_student(keep=0.5, router_weight_std=0.1)
    images, instructions, states = _observations(student.vla.config, 4)
    gates = np.array([o.gates for o in student.predict_batch(images, instructions, states)])
    student.threshold = (float(gates.max()) + 1.0) / 2  # above every gate
    assert all(o.executed_layers == [] and o.backbone_gflops == 0.0
               for o in student.predict_batch(images, instructions, states))
    counts = []
    for tau in np.linspace(0.0, 1.0, 21):
        student.threshold = float(tau)
        counts.append(sum(len(o.executed_layers) for o in student.predict_batch(images, instructions, states)))
    assert counts[0] == 4 * 6
    assert all(a >= b for a, b in zip(counts, counts[1:])), counts
    assert counts[0] > counts[10] > 0, "keep=0.5 should leave about half the layers at tau=0.5"


def test_mixed_route_batch_equals_each_sample_alone():
    _, student = _teacher_and_student(keep=0.5, router_weight_std=2.0, seed=3)
    images, instructions, states = _observations(student.vla.config, 6, seed=1)
    batch = student.predict_batch(images, instructions, states)
    routes = {tuple(o.executed_layers) for o in batch}
    assert len(routes) > 1, "test needs samples that take different routes"
    for i, out in enumerate(batch):
        alone = student.predict(images[i], instructions[i], states[i])
        assert alone.executed_layers == out.executed_layers
        np.testing.assert_allclose(alone.actions, out.actions, atol=1e-5)


def test_training_with_hard_gates_computes_the_inference_function():
    _, student = _teacher_and_student(keep=0.5, router_weight_std=2.0, seed=3)
    model: RoutedStudent = student.model
    images, instructions, states = _observations(model.vla.config, 5)
    with torch.no_grad():
        encoded = model.vla.encode(_model_sized(images, model.vla.config), instructions, torch.from_numpy(states))
        routes = model.train_routes(encoded, gate_mode="hard")
        trained = model.vla.predict_chunk(encoded.readout(model.gated_layers(encoded, routes.masks)[-1]))
        execute = routes.gates >= model.threshold
        inferred = model.vla.predict_chunk(run_backbone(model.vla, encoded, execute))
    assert 0 < int(execute.sum()) < execute.numel()
    torch.testing.assert_close(trained, inferred, atol=1e-5, rtol=1e-5)


def test_hard_training_masks_are_hard_forward_and_pass_the_gates_gradient():
    _, student = _teacher_and_student(keep=0.5, router_weight_std=2.0, seed=3)
    model: RoutedStudent = student.model
    images, instructions, states = _observations(model.vla.config, 3)
    encoded = model.vla.encode(_model_sized(images, model.vla.config), instructions, torch.from_numpy(states))
    routes = model.train_routes(encoded, gate_mode="hard")
    assert torch.equal(routes.masks, (routes.gates >= model.threshold).float())
    weights = torch.arange(routes.masks.numel(), dtype=torch.float32).view_as(routes.masks)
    gate_grad, = torch.autograd.grad((routes.masks * weights).sum(), routes.gates, retain_graph=True)
    torch.testing.assert_close(gate_grad, weights)  # straight-through: d mask / d gate = 1


@pytest.mark.parametrize("num_cameras", [1, 2])
def test_reported_backbone_flops_match_torch_flop_counter(num_cameras):
    _, student = _teacher_and_student(keep=0.5, num_cameras=num_cameras)
    model: RoutedStudent = student.model
    images, instructions, states = _observations(model.vla.config, 1)
    with torch.no_grad():
        encoded = model.vla.encode(_model_sized(images, model.vla.config), instructions, torch.from_numpy(states))
        _, execute = model.execute_mask(encoded)
        counter = FlopCounterMode(display=False)
        # The math SDPA kernel is made of matmuls the counter sees (the fused CPU kernel is not counted).
        with counter, sdpa_kernel(SDPBackend.MATH):
            run_backbone(model.vla, encoded, execute)
    reported = student.predict(images[0], instructions[0], states[0]).backbone_gflops * 1e9
    assert 0 < int(execute.sum()) < model.vla.num_layers
    assert counter.get_total_flops() == pytest.approx(reported, rel=1e-6)


def test_save_load_round_trip_gives_identical_actions(tmp_path):
    path = create_untrained_policy(tmp_path / "student", size="tiny", keep=0.5, router_weight_std=0.3)
    first = Policy.load(path, device="cpu")
    second = Policy.load(path / "model.safetensors", device="cpu")  # the file works as well as the directory
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    a = first.predict(image, "open the drawer", np.ones(4))
    b = second.predict(image, "open the drawer", np.ones(4))
    np.testing.assert_array_equal(a.actions, b.actions)
    assert a.executed_layers == b.executed_layers
    assert first.card == second.card and first.card.is_student


def test_actions_are_unnormalised_and_not_clamped_to_the_card_limits(tmp_path):
    """The policy returns what the model predicts; the safety contract (actdistill_ros.control)
    owns every limit, so a chunk beyond the card's range comes back beyond it."""
    torch.manual_seed(0)
    vla = ReferenceVLA(VLAConfig.tiny())
    space = ActionSpace(kind="joint", names=["a", "b", "c", "d"], units=["rad"] * 4,
                        low=[-0.1, -5, -5, -5], high=[0.1, 5, 5, 5])
    stats = {"action_mean": [0.0, 1.0, 2.0, 3.0], "action_std": [1e3, 1e-3, 1e-3, 1e-3],
             "state_mean": [0.0] * 4, "state_std": [1.0] * 4}
    save_model(tmp_path / "t", vla, make_card(vla, space, norm_stats=stats))
    policy = Policy.load(tmp_path / "t", device="cpu")
    actions = policy.predict(np.zeros((32, 32, 3), np.uint8), "x", np.zeros(4)).actions
    with torch.no_grad():
        normalised = vla.eval()(torch.zeros(1, 32, 32, 3, dtype=torch.uint8), ["x"], torch.zeros(1, 4))[0].numpy()
    assert actions.shape == (4, 4)
    np.testing.assert_allclose(actions[:, 0], 1e3 * normalised[:, 0], rtol=1e-4, atol=1e-6)  # un-normalised
    assert np.abs(actions[:, 0]).max() > 0.1, "the model's output must exceed the card's limit to test this"
    np.testing.assert_allclose(actions[:, 1:], np.broadcast_to([1.0, 2.0, 3.0], (4, 3)), atol=0.05)


def _counting_host_reads(policy: Policy) -> Policy:
    """Make ``policy``'s encoded observations count the host reads of everything computed from
    them (see host_reads.DeviceTensor): the CPU stand-in for a GPU's host syncs."""
    encode = policy.vla.encode
    policy.vla.encode = lambda *args, **kwargs: on_device(encode(*args, **kwargs))
    return policy


@pytest.mark.parametrize("profile", [False, True])
@pytest.mark.parametrize("batch", [1, 5])
def test_an_inference_reads_the_device_once_for_its_result_and_once_for_a_route(batch, profile):
    """A teacher (every layer, or a static route made on the host) reads the device once, for the
    chunk; a student once more, before its backbone, for its route: gates and layers in one copy."""
    teacher, student = _teacher_and_student(keep=0.5, router_weight_std=2.0, seed=3)
    images, instructions, states = _observations(student.vla.config, batch)
    expected = {name: policy.predict_batch(images, instructions, states)
                for name, policy in (("teacher", teacher), ("student", student))}
    static = Policy(teacher.model, teacher.card, torch.device("cpu"))
    static.static_route = StaticRoute("even", 0.5, static.num_layers)
    for name, policy, reads in (("teacher", teacher, ["cpu"]), ("static", static, ["cpu"]),
                                ("student", student, ["cpu", "cpu"])):
        policy.profile = profile
        _counting_host_reads(policy)
        DeviceTensor.host_reads = []
        outputs = policy.predict_batch(images, instructions, states)
        assert DeviceTensor.host_reads == reads, (name, DeviceTensor.host_reads)
        assert all(type(out.actions) is np.ndarray for out in outputs)
        assert sorted(outputs[0].timings_ms) == (["backbone", "encode", "head", "total"] if profile else ["total"])
        for out, want in zip(outputs, expected.get(name, outputs)):
            assert out.executed_layers == want.executed_layers and out.gates == want.gates
            np.testing.assert_array_equal(out.actions, want.actions)
    student_out = expected["student"]
    assert len({tuple(out.executed_layers) for out in student_out}) > 1 or batch == 1
    assert 0 < len(student_out[0].executed_layers) < student.num_layers and len(student_out[0].gates) == 6


@pytest.fixture
def good_weights(tmp_path):
    return create_untrained_policy(tmp_path / "good", size="tiny")


def _expect_error(path, *needles):
    with pytest.raises(WeightsError) as info:
        Policy.load(path, device="cpu")
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_missing_path_is_a_clear_error(tmp_path):
    _expect_error(tmp_path / "nope", "nope", "no such file")


def test_missing_card_is_a_clear_error(good_weights):
    (good_weights / "card.json").unlink()
    _expect_error(good_weights, "card.json", "missing")


def test_pickle_checkpoint_is_refused_by_name(tmp_path):
    path = tmp_path / "policy.pt"
    path.write_bytes(pickle.dumps({"weights": 1}))
    _expect_error(path, "policy.pt", "pickle")


def test_pickle_content_in_a_safetensors_name_is_refused(good_weights):
    (good_weights / "model.safetensors").write_bytes(pickle.dumps({"weights": 1}))
    _expect_error(good_weights, "model.safetensors", "pickle")


def test_truncated_weights_are_a_clear_error(good_weights):
    weights = good_weights / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _expect_error(good_weights, "model.safetensors", "corrupt")


def test_unreadable_card_is_a_clear_error(good_weights):
    (good_weights / "card.json").write_text("{not json")
    _expect_error(good_weights, "card.json", "JSON")


def test_card_architecture_mismatch_names_the_tensor(good_weights):
    card = json.loads((good_weights / "card.json").read_text())
    card["vla_config"]["head_hidden"] = 64
    (good_weights / "card.json").write_text(json.dumps(card))
    _expect_error(good_weights, "model.safetensors", "action_head.0", "expects")


def test_teacher_card_on_student_weights_is_a_clear_error(good_weights):
    card = json.loads((good_weights / "card.json").read_text())
    card["kind"], card["router_config"] = "teacher", None
    (good_weights / "card.json").write_text(json.dumps(card))
    _expect_error(good_weights, "does not match", "unexpected")


def test_invalid_card_values_are_a_clear_error(good_weights):
    card = json.loads((good_weights / "card.json").read_text())
    card["vla_config"]["image_size"] = 30  # not a multiple of the patch size
    (good_weights / "card.json").write_text(json.dumps(card))
    _expect_error(good_weights, "card.json", "image_size")


def test_config_validates_itself():
    with pytest.raises(ValueError, match="num_heads"):
        VLAConfig(width=130, num_heads=4)
    with pytest.raises(ValueError, match="default_threshold"):
        RouterConfig(default_threshold=1.5)
    with pytest.raises(ValueError, match="gripper_index"):
        ActionSpace(kind="joint", names=["a"], units=["rad"], low=[0], high=[1], gripper_index=3)


def test_token_count_comes_from_the_encoders():
    config = VLAConfig.tiny(image_size=48, patch_size=8, max_text_tokens=5, state_dim=0)
    vla = ReferenceVLA(config)
    encoded = vla.encode(torch.zeros(2, 48, 48, 3, dtype=torch.uint8), ["a b", ""], None)
    assert encoded.tokens.shape[1] == config.num_tokens == 36 + 5 + 1
    assert encoded.valid[0].sum() == 36 + 2 + 1 and encoded.valid[1].sum() == 36 + 0 + 1


def test_cuda_request_without_gpu_falls_back_to_cpu_with_a_warning(caplog):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("cuda").type == "cpu"
    assert "CUDA is not available" in caplog.text


def test_bench_prints_the_promised_json(capsys):
    from actdistill_ros.cli import main

    assert main(["bench", "--size", "tiny", "--iters", "3", "--warmup", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("device", "teacher_ms", "student_ms", "end_to_end_speedup", "teacher_backbone_ms",
                "student_backbone_ms", "backbone_speedup", "teacher_backbone_gflops",
                "student_backbone_gflops", "flops_ratio", "executed_layer_fraction", "backbone_flops_fraction"):
        assert key in result
    assert result["flops_ratio"] == pytest.approx(1 / result["backbone_flops_fraction"], rel=1e-3)
    # The last layer a sample runs computes only its readout token: a few layers cost less than their share.
    assert result["backbone_flops_fraction"] < result["executed_layer_fraction"] == 0.5


def test_a_safetensors_header_length_that_looks_like_pickle_still_loads(tmp_path):
    """The first byte of a safetensors file is the low byte of its header length: 0x80 (pickle's
    magic) or b"PK" must not make a valid file look like a pickle."""
    import struct

    from safetensors.torch import save_file

    from actdistill_ros.weights import read_weights

    path = tmp_path / "w.safetensors"
    for pad in range(200):
        save_file({"x": torch.zeros(2)}, str(path), metadata={"p": "a" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] % 256 == 0x80
    assert read_weights(path)["x"].shape == (2,)


def test_the_reference_vla_implements_the_teacher_protocol():
    from actdistill_ros.policies.teacher import DistillableVLA

    assert isinstance(ReferenceVLA(VLAConfig.tiny()), DistillableVLA)


# ---- cameras and resizing ------------------------------------------------------------------------

def test_a_policy_takes_exactly_its_number_of_cameras():
    one, _ = _teacher_and_student()
    two, two_student = _teacher_and_student(num_cameras=2)
    rng = np.random.default_rng(0)
    wide, square = rng.integers(0, 256, (48, 64, 3), np.uint8), rng.integers(0, 256, (20, 20, 3), np.uint8)
    state = np.zeros(4)
    assert one.num_cameras == 1 and two.num_cameras == 2
    for policy, images in [(one, [wide, square]), (one, np.stack([square, square])), (two, wide), (two, [wide])]:
        with pytest.raises(ValueError, match=f"takes {policy.num_cameras} camera image") as excinfo:
            policy.predict(images, "open the drawer", state)
        assert "\n" not in str(excinfo.value)
    with pytest.raises(ValueError, match="takes 2 camera image"):
        two.predict_batch(np.zeros((3, 32, 32, 3), np.uint8), ["a"] * 3, np.zeros((3, 4)))
    with pytest.raises(ValueError, match="uint8"):
        two.predict([wide.astype(np.float32), square], "open the drawer", state)
    # Frames of any size, as a list, an array per sample or a batch array, give the same actions.
    for policy in (two, two_student):
        listed = policy.predict([wide, square], "open the drawer", state).actions
        resized = np.stack([resize_rgb(wide, 32), resize_rgb(square, 32)])
        np.testing.assert_array_equal(policy.predict(resized, "open the drawer", state).actions, listed)
        batch = policy.predict_batch(np.stack([resized, resized[::-1]]), ["open the drawer"] * 2, np.zeros((2, 4)))
        np.testing.assert_allclose(batch[0].actions, listed, atol=1e-6)  # batch of 2: other matmul rounding
        # The camera embedding tells the cameras apart: swapping them changes the actions.
        assert np.abs(batch[1].actions - listed).max() > 1e-4
    np.testing.assert_array_equal(one.predict([wide], "x", state).actions, one.predict(wide, "x", state).actions)


def test_two_camera_token_layout():
    config = VLAConfig.tiny(image_size=16, patch_size=8, max_text_tokens=5, state_dim=3, num_cameras=2)
    vla = ReferenceVLA(config)
    encoded = vla.encode(torch.zeros(2, 2, 16, 16, 3, dtype=torch.uint8), ["a b", ""], torch.zeros(2, 3))
    assert encoded.tokens.shape[1] == config.num_tokens == 2 * 4 + 5 + 1 + 1
    visual_tokens, visual_valid = encoded.modality_tokens(0)
    assert visual_tokens.shape[1] == 8 and visual_valid is None  # VISUAL: both cameras' patches, no padding
    assert encoded.segment.tolist() == [0] * 8 + [1] * 5 + [2, 3] and encoded.readout_span == slice(14, 15)
    assert vla.camera_embed.shape == (2, config.width)
    # Camera 0's patches come first and differ from camera 1's only by the camera embedding.
    torch.testing.assert_close(encoded.tokens[:, 4:8] - encoded.tokens[:, :4],
                               (vla.camera_embed[1] - vla.camera_embed[0]).expand(2, 4, -1))
    with pytest.raises(ValueError, match=r"\(B, 2, 16, 16, 3\).*resize_rgb.*\(2, 16, 16, 3\)"):
        vla.encode(torch.zeros(2, 16, 16, 3, dtype=torch.uint8), ["a", "b"], torch.zeros(2, 3))
    with pytest.raises(ValueError, match="num_cameras"):
        VLAConfig(num_cameras=0)


SHIPPED_STUDENT = Path(__file__).resolve().parents[1] / "weights" / "metaworld" / "student"


@pytest.mark.skipif(not (SHIPPED_STUDENT / "card.json").is_file(), reason="shipped weights not in this checkout")
def test_shipped_single_camera_weights_keep_the_single_camera_layout():
    """Cards written before multi-camera support load as one camera and encode as before: patch
    embedding of the (B, 3, S, S) image plus positions, no camera embedding."""
    policy = Policy.load(SHIPPED_STUDENT, device="cpu")
    vla, config = policy.vla, policy.vla.config
    assert policy.num_cameras == 1 and policy.card.num_cameras == 1 and vla.camera_embed is None
    images, instructions, states = _observations(config, 3)
    pixels = torch.from_numpy(np.stack([resize_rgb(f, config.image_size) for f in images]))
    with torch.no_grad():
        encoded = vla.encode(pixels, instructions, torch.from_numpy(states))
        unit = pixels.permute(0, 3, 1, 2).float() / 255.0 * 2.0 - 1.0
        visual = vla.patch_embed(unit).flatten(2).transpose(1, 2) + vla.visual_pos
    assert encoded.tokens.shape[1] == config.num_patches + config.max_text_tokens + 2
    # encode computes the patch embedding as one matmul over patch rows: the conv's function, up to
    # float summation order.
    torch.testing.assert_close(encoded.tokens[:, : config.num_patches], visual, atol=2e-5, rtol=1e-5)
    assert torch.equal(vla.encode(pixels[:, None], instructions, torch.from_numpy(states)).tokens, encoded.tokens)
    from_frames = policy.predict_batch(images, instructions, states)
    from_pixels = policy.predict_batch(pixels.numpy(), instructions, states)
    for a, b in zip(from_frames, from_pixels):
        np.testing.assert_array_equal(a.actions, b.actions)
        assert a.executed_layers == b.executed_layers


def test_policy_resizes_camera_frames_exactly_like_the_bag_reader(tmp_path):
    """Issue: training read frames with INTER_AREA while run time resized with torch bilinear.
    Now both go through resize_rgb: a 640x480 frame gives the model the same pixels either way."""
    from actdistill_ros.data import read_episode, write_episode_bag
    from actdistill_ros.policy import _stack_images

    yy, xx = np.mgrid[0:480, 0:640]
    frames = np.stack([np.stack([(xx * 7 + yy * 3 + 40 * t) % 256, (xx ^ yy) % 256, (yy * 5) % 256], axis=2)
                       for t in range(2)]).astype(np.uint8)  # fine detail: where resampling methods differ
    write_episode_bag(tmp_path / "ep", images=frames, instruction="open the drawer", states=np.zeros((2, 4)),
                      actions=np.zeros((2, 4)))
    policy = Policy.load(create_untrained_policy(tmp_path / "w", size="tiny", student=False), device="cpu")
    size = policy.vla.config.image_size
    episode = read_episode(tmp_path / "ep", image_size=size)  # what training sees
    np.testing.assert_array_equal(_stack_images(list(frames), size, 1), episode.images)  # what the Policy feeds
    for t in range(2):
        live = policy.predict(frames[t], "open the drawer", np.zeros(4)).actions
        trained = policy.predict(episode.images[t, 0], "open the drawer", np.zeros(4)).actions
        np.testing.assert_array_equal(live, trained)
    # The torch bilinear resize the model used to apply gives other pixels: the check above can fail.
    bilinear = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=(size, size),
                                               mode="bilinear", antialias=True, align_corners=False)
    bilinear = bilinear.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    assert np.abs(bilinear.astype(int) - episode.images[:, 0]).max() > 10
