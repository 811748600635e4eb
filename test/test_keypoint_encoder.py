"""The reference VLA's keypoint image encoder (a conv encoder trained from scratch, spatial soft-argmax):
its coordinates, that it learns to find an object, and teacher cards that carry it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from actdistill_ros.policies.vla import ReferenceVLA, VLAConfig
from actdistill_ros.policies.vla.keypoints import SpatialKeypointEncoder
from actdistill_ros.policy import Policy


def _blob_images(rng: np.random.Generator, count: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey images with one bright 3 px square at a random place, and its centre in [-1, 1] (x, y)."""
    images = np.full((count, 3, size, size), -0.5, np.float32)
    centres = rng.integers(2, size - 2, (count, 2))  # (col, row)
    for image, (col, row) in zip(images, centres):
        image[:, row - 1: row + 2, col - 1: col + 2] = 1.0
    return torch.from_numpy(images), torch.from_numpy(centres / (size - 1) * 2 - 1).float()


def test_a_sharp_map_gives_its_cells_coordinates():
    encoder = SpatialKeypointEncoder(num_keypoints=2, channels=4)
    size = SpatialKeypointEncoder.output_size(32)
    assert size == 8
    maps = torch.full((1, 2, size, size), -30.0)
    maps[0, 0, 0, size - 1] = 30.0  # top right
    maps[0, 1, 5, 2] = 30.0
    coordinates = encoder.soft_argmax(maps)
    step = 2 / (size - 1)
    torch.testing.assert_close(coordinates[0], torch.tensor([[1.0, -1.0], [-1 + 2 * step, -1 + 5 * step]]))
    flat = encoder.soft_argmax(torch.zeros(1, 2, size, size))  # nothing found: the centre
    torch.testing.assert_close(flat, torch.zeros(1, 2, 2), atol=1e-6, rtol=0)


def test_it_learns_where_an_object_is():
    """A few hundred steps teach the encoder (and a linear readout) to locate a 3 px blob anywhere in a
    32 px image to within a few pixels; its untrained output does not."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    encoder = SpatialKeypointEncoder(num_keypoints=4, channels=16)
    readout = torch.nn.Linear(8, 2)
    test_images, test_centres = _blob_images(rng, 256, 32)

    def error() -> float:
        with torch.no_grad():
            return float((readout(encoder(test_images).flatten(1)) - test_centres).norm(dim=1).mean())

    before = error()
    optimizer = torch.optim.Adam([*encoder.parameters(), *readout.parameters()], lr=3e-3)
    for _ in range(300):
        images, centres = _blob_images(rng, 32, 32)
        loss = (readout(encoder(images).flatten(1)) - centres).pow(2).sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = error()
    pixel = 2 / 31
    assert before > 8 * pixel and after < 2 * pixel, (before / pixel, after / pixel)


def test_config_and_flops():
    config = VLAConfig(image_size=128, image_encoder="keypoints", num_keypoints=16, width=64, num_layers=2)
    assert config.num_patches == 16 and config.num_tokens == 16 + 16 + 1 + 1
    model = ReferenceVLA(config)
    assert model.patch_embed is None and model.visual_pos.shape == (1, 16, 64)
    convs = 2 * (64 * 64 * 32 * 3 * 9 + 32 * 32 * 32 * 32 * 9 * 3)
    assert model.image_encoder.flops(128) == convs + 2 * 32 * 32 * 16 * (32 + 2)
    assert model.vision_flops() == model.image_encoder.flops(128) + 2 * 16 * (2 + 64) * 64
    with pytest.raises(ValueError, match="num_keypoints"):
        VLAConfig(image_encoder="keypoints", num_keypoints=0)


def _train_keypoint_teacher(tmp_path, *extra):
    from actdistill_ros.cli import main as cli
    from actdistill_ros.data.synthetic import write_synthetic_demos

    demos = write_synthetic_demos(tmp_path / "bags", episodes=4, length=8)
    out = tmp_path / "teacher_run"
    assert cli(["train-teacher", "--data", str(demos), "--out", str(out), "--size", "tiny", "--image-encoder",
                "keypoints", "--num-keypoints", "8", "--steps", "3", "--batch-size", "4", "--val-fraction", "0",
                "--action-space", "metaworld", "--device", "cpu", *extra]) == 0
    return demos, out / "teacher"


def test_teacher_trains_its_encoder_and_a_student_copies_it(tmp_path, capsys):
    from actdistill_ros.cli import main as cli
    from actdistill_ros.policies.actdistill import RouterConfig, RoutedStudent
    from actdistill_ros.policy import make_card, save_model

    torch.manual_seed(0)
    initial = ReferenceVLA(VLAConfig.tiny(image_encoder="keypoints", num_keypoints=8)).state_dict()
    demos, teacher_dir = _train_keypoint_teacher(tmp_path)
    card = json.loads((teacher_dir / "card.json").read_text())
    assert (card["vla_config"]["image_encoder"], card["vla_config"]["num_keypoints"]) == ("keypoints", 8)
    assert "trained from scratch" in card["provenance"]["image_encoder"]
    weights = load_file(str(teacher_dir / "model.safetensors"))
    # Trained with the model, not frozen (the seed gives train-teacher the same initial weights).
    assert not torch.equal(weights["image_encoder.convs.0.weight"], initial["image_encoder.convs.0.weight"])
    assert not any(name.startswith("patch_embed") for name in weights)

    teacher = Policy.load(teacher_dir, device="cpu")
    image, state = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8), np.zeros(4, np.float32)
    expected = teacher.predict(image, "push", state)
    assert expected.actions.shape == (4, 4) and np.isfinite(expected.actions).all()
    student = RoutedStudent.derive_from(teacher.vla, RouterConfig())
    student.keep_fraction = 1.0
    student_dir = save_model(tmp_path / "student", student, make_card(student, teacher.card.action_space,
                                                                      norm_stats=teacher.card.norm_stats))
    np.testing.assert_allclose(Policy.load(student_dir, device="cpu").predict(image, "push", state).actions,
                               expected.actions, rtol=0, atol=1e-5)

    # --init-from keeps the encoder; it cannot swap one encoder for another.
    assert cli(["train-teacher", "--data", str(demos), "--out", str(tmp_path / "again"), "--init-from",
                str(teacher_dir), "--layers", "2", "--steps", "1", "--batch-size", "4", "--val-fraction", "0",
                "--action-space", "metaworld", "--device", "cpu"]) == 0
    assert Policy.load(tmp_path / "again" / "teacher", device="cpu").vla.config.num_keypoints == 8
    capsys.readouterr()
    assert cli(["train-teacher", "--data", str(demos), "--out", str(tmp_path / "swap"), "--init-from",
                str(teacher_dir), "--image-encoder", "patch", "--steps", "1", "--device", "cpu"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "keypoints encoder" in error, error
