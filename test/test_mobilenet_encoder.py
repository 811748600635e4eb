"""The ImageNet MobileNetV2 image encoder of the reference VLA: its architecture, the conversion of
torchvision's weights to safetensors, teacher cards that carry it, and bad weight files."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from actdistill_ros.policies.vla import ReferenceVLA, VLAConfig
from actdistill_ros.policies.vla.mobilenet_v2 import (REFERENCE_PREFIX, MobileNetV2Features,
                                                     convert_torchvision_weights, installed_torchvision_file,
                                                     read_imagenet_weights, reference_input)
from actdistill_ros.policy import Policy


@pytest.fixture(scope="module")
def imagenet_weights(tmp_path_factory):
    """torchvision's file from the pip package (scripts/setup.sh installs it), converted here."""
    return convert_torchvision_weights(installed_torchvision_file(),
                                       tmp_path_factory.mktemp("imagenet") / "mobilenet_v2.safetensors")


@pytest.mark.parametrize("blocks, shape", [(7, (2, 32, 16, 16)), (14, (2, 96, 8, 8)), (18, (2, 320, 4, 4))])
def test_features_have_torchvisions_shapes_at_128_px(blocks, shape):
    encoder = MobileNetV2Features(blocks).eval()
    assert encoder(torch.zeros(2, 3, 128, 128)).shape == shape
    assert (encoder.out_channels, encoder.stride) == (shape[1], 128 // shape[2])


def test_flops_count_every_convolution_once():
    encoder = MobileNetV2Features(14).eval()
    counted = []

    def count(module, inputs, output):
        counted.append(2 * output.numel() * (module.in_channels // module.groups) * module.kernel_size[0] ** 2)

    for module in encoder.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(count)
    encoder(torch.zeros(1, 3, 128, 128))
    assert len(counted) == 1 + 2 + 12 * 3 and counted[0] == 2 * 32 * 27 * 64 * 64  # stem: 3x3x3 -> 32 at 64x64
    assert encoder.flops(128) == sum(counted)


def test_converted_safetensors_reproduce_the_forward_of_the_unpickled_weights(imagenet_weights):
    stored = load_file(str(imagenet_weights))
    encoder = MobileNetV2Features(18).eval()
    encoder.load_state_dict(read_imagenet_weights(imagenet_weights, 18))
    torch.testing.assert_close(stored[f"{REFERENCE_PREFIX}input"], reference_input(), rtol=0, atol=0)
    hidden = stored[f"{REFERENCE_PREFIX}input"]
    with torch.no_grad():
        for index, block in enumerate(encoder.features):
            hidden = block(hidden)
            torch.testing.assert_close(hidden, stored[f"{REFERENCE_PREFIX}features.{index}"], rtol=1e-5, atol=1e-5)
    # ImageNet weights, not an initialisation: batch-norm statistics were learnt.
    assert not torch.allclose(encoder.features[0][1].running_var, torch.ones(32))


def test_batch_norm_keeps_imagenet_statistics_while_training(imagenet_weights):
    encoder = MobileNetV2Features(7)
    encoder.load_state_dict(read_imagenet_weights(imagenet_weights, 7))
    before = encoder.features[3].conv[0][1].running_mean.clone()
    encoder.train()
    encoder(torch.rand(4, 3, 32, 32)).sum().backward()
    torch.testing.assert_close(encoder.features[3].conv[0][1].running_mean, before, rtol=0, atol=0)
    assert encoder.features[3].conv[0][0].weight.grad is not None


def _train_mobilenet_teacher(tmp_path, imagenet_weights, *extra):
    from actdistill_ros.cli import main as cli
    from actdistill_ros.data.synthetic import write_synthetic_demos

    demos = write_synthetic_demos(tmp_path / "bags", episodes=4, length=8)
    out = tmp_path / "teacher_run"
    assert cli(["train-teacher", "--data", str(demos), "--out", str(out), "--size", "tiny", "--image-encoder",
                "mobilenet_v2", "--encoder-blocks", "7", "--encoder-weights", str(imagenet_weights), "--steps", "2",
                "--batch-size", "4", "--val-fraction", "0", "--action-space", "metaworld", "--device", "cpu",
                *extra]) == 0
    return demos, out / "teacher"


def test_teacher_card_round_trip_and_a_student_of_it(tmp_path, imagenet_weights, capsys):
    from actdistill_ros.policies.actdistill import RouterConfig, RoutedStudent
    from actdistill_ros.policy import make_card, save_model

    _, teacher_dir = _train_mobilenet_teacher(tmp_path, imagenet_weights)
    card = json.loads((teacher_dir / "card.json").read_text())
    config = card["vla_config"]
    assert (config["image_encoder"], config["encoder_blocks"], config["patch_size"]) == ("mobilenet_v2", 7, 8)
    assert "MobileNetV2 features[:7]" in card["provenance"]["image_encoder"]
    assert "frozen" in card["provenance"]["image_encoder"]
    weights = load_file(str(teacher_dir / "model.safetensors"))
    for name, tensor in read_imagenet_weights(imagenet_weights, 7).items():  # frozen: exactly ImageNet's
        torch.testing.assert_close(weights[f"image_encoder.{name}"], tensor, rtol=0, atol=0)
    assert not any(name.startswith("patch_embed") for name in weights)

    teacher = Policy.load(teacher_dir, device="cpu")
    image, state = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8), np.zeros(4, np.float32)
    expected = teacher.predict(image, "push", state)
    assert expected.actions.shape == (4, 4) and np.isfinite(expected.actions).all()
    assert teacher.vla.vision_flops() == MobileNetV2Features(7).flops(32) + 2 * 16 * 32 * 64

    student = RoutedStudent.derive_from(teacher.vla, RouterConfig())
    student.keep_fraction = 1.0
    student_dir = save_model(tmp_path / "student", student, make_card(student, teacher.card.action_space,
                                                                      norm_stats=teacher.card.norm_stats))
    loaded = Policy.load(student_dir, device="cpu")
    assert loaded.vla.config.image_encoder == "mobilenet_v2"
    np.testing.assert_allclose(loaded.predict(image, "push", state).actions, expected.actions, rtol=0, atol=1e-5)

    from actdistill_ros.cli import main as cli

    capsys.readouterr()
    assert cli(["bench", "--teacher", str(teacher_dir), "--student", str(student_dir), "--iters", "2", "--warmup", "1",
                "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["vision_gflops"] == round(teacher.vla.vision_flops() / 1e9, 4) > 0


def test_init_from_a_patch_teacher_keeps_the_backbone(tmp_path, imagenet_weights):
    from actdistill_ros.cli import main as cli
    from actdistill_ros.data.synthetic import write_synthetic_demos
    from actdistill_ros.policy import create_untrained_policy

    patch_teacher = create_untrained_policy(tmp_path / "patch", size="tiny", student=False)  # 32 px, 8 px patches
    demos = write_synthetic_demos(tmp_path / "bags", episodes=4, length=8)
    assert cli(["train-teacher", "--data", str(demos), "--out", str(tmp_path / "run"), "--init-from",
                str(patch_teacher), "--image-encoder", "mobilenet_v2", "--encoder-blocks", "7", "--encoder-weights",
                str(imagenet_weights), "--steps", "2", "--batch-size", "4", "--lr", "1e-7", "--val-fraction", "0",
                "--action-space", "metaworld", "--device", "cpu"]) == 0
    before = load_file(str(patch_teacher / "model.safetensors"))
    after = load_file(str(tmp_path / "run" / "teacher" / "model.safetensors"))
    for name in ("visual_pos", "layers.3.fc2.weight", "word_embed.weight", "action_head.2.weight"):
        torch.testing.assert_close(after[name], before[name], atol=1e-4, rtol=0)
    assert "image_encoder.features.0.0.weight" in after and "patch_embed.weight" not in after


def test_bad_weights_files_are_one_line(tmp_path, imagenet_weights, capsys):
    from actdistill_ros.cli import main as cli
    from actdistill_ros.policies.vla.mobilenet_v2 import main as convert_main

    fake = tmp_path / "mobilenet_v2-b0353104.pth"
    fake.write_bytes(pickle.dumps({"features.0.0.weight": [1.0]}))
    assert convert_main([str(fake), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(fake) in err and "SHA-256" in err, err

    pickled = tmp_path / "encoder.safetensors"
    pickled.write_bytes(pickle.dumps({"x": 1}))
    partial = tmp_path / "partial.safetensors"
    save_file({"features.0.0.weight": torch.zeros(32, 3, 3, 3)}, str(partial))
    from actdistill_ros.data.synthetic import write_synthetic_demos

    demos = write_synthetic_demos(tmp_path / "bags", episodes=2, length=6)
    for weights, expected in ((pickled, "refusing to unpickle"), (partial, "missing"),
                              (tmp_path / "absent.safetensors", "scripts/setup.sh")):
        assert cli(["train-teacher", "--data", str(demos), "--out", str(tmp_path / "run"), "--size", "tiny",
                    "--image-encoder", "mobilenet_v2", "--encoder-weights", str(weights), "--steps", "1",
                    "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and str(weights) in err and expected in err, err
    with pytest.raises(ValueError, match="stride of MobileNetV2"):
        VLAConfig(image_encoder="mobilenet_v2", encoder_blocks=14, patch_size=8, image_size=64)
    with pytest.raises(ValueError, match="image_encoder"):
        ReferenceVLA(VLAConfig(image_encoder="resnet"))


def test_distill_takes_a_mobilenet_teacher(tmp_path, imagenet_weights):
    """The encoder is part of the teacher's weights: the student copies it and routes the backbone."""
    from actdistill_ros.cli import main as cli

    demos, teacher_dir = _train_mobilenet_teacher(tmp_path, imagenet_weights)
    out, config = tmp_path / "distill", tmp_path / "distill.yaml"
    config.write_text("freeze_vision: true\n")  # the encoder and its projection stay the teacher's
    assert cli(["distill", "--teacher", str(teacher_dir), "--data", str(demos), "--out", str(out), "--config",
                str(config), "--probe-steps", "2", "--distill-steps", "4", "--batch-size", "4", "--checkpoint-every",
                "2", "--device", "cpu"]) == 0
    student = Policy.load(out / "student", device="cpu")
    assert student.card.is_student and student.vla.config.image_encoder == "mobilenet_v2"
    teacher_weights = load_file(str(teacher_dir / "model.safetensors"))
    student_weights = load_file(str(out / "student" / "model.safetensors"))
    for name in ("image_encoder.features.3.conv.1.0.weight", "encoder_proj.weight", "visual_pos"):
        torch.testing.assert_close(student_weights[f"vla.{name}"], teacher_weights[name], rtol=0, atol=0)
    assert not torch.equal(student_weights["vla.layers.0.fc1.weight"], teacher_weights["layers.0.fc1.weight"])
    output = student.predict(np.zeros((32, 32, 3), np.uint8), "push", np.zeros(4, np.float32))
    assert len(output.executed_layers) == 2 and np.isfinite(output.actions).all()  # keep 0.5 of 4 layers
