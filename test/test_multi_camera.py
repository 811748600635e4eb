"""Several cameras end to end, without ROS: two-camera rosbags (mcap and sqlite3) -> dataset ->
`actdistill train-teacher` (real training, tiny model) -> Policy.predict with one frame per camera."""

import argparse
import json

import numpy as np
import pytest
import torch

from actdistill_ros.cli import main as cli
from actdistill_ros.data import TopicConfig, read_episodes
from actdistill_ros.data.dataset import DemoDataset, collate_samples
from actdistill_ros.data.synthetic import synthetic_camera_frames, write_synthetic_demos
from actdistill_ros.distill.demos import add_data_arguments, topics_from_args
from actdistill_ros.policy import Policy, create_untrained_policy

CAMERAS = ["/cam/scene", "/cam/wrist"]
CAMERA_FLAGS = [flag for camera in CAMERAS for flag in ("--camera-topic", camera)]


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_camera_bags")
    write_synthetic_demos(root, episodes=3, length=8, storage="mcap", cameras=CAMERAS)
    write_synthetic_demos(root, episodes=3, length=8, storage="sqlite3", seed=3, cameras=CAMERAS)
    return root


@pytest.fixture(scope="module")
def teacher(demos, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_camera_teacher")
    assert cli(["train-teacher", "--data", str(demos), "--out", str(out), "--size", "tiny", "--steps", "8",
                "--batch-size", "8", "--checkpoint-every", "4", "--action-space", "metaworld", *CAMERA_FLAGS]) == 0
    return out


def test_two_camera_bags_make_two_image_samples(demos):
    episodes = read_episodes(demos, TopicConfig(cameras=CAMERAS), image_size=32, progress=False)
    storages = sorted({next(p.suffix for p in e.bag_path.iterdir() if p.suffix in (".mcap", ".db3")) for e in episodes})
    assert storages == [".db3", ".mcap"] and len(episodes) == 6
    assert all(e.images.shape == (8, 2, 32, 32, 3) for e in episodes)
    assert episodes[0].source_image_sizes == [(32, 32), (48, 48)]  # the wrist camera has its own resolution
    batch = collate_samples([DemoDataset(episodes, chunk_size=4)[i] for i in range(5)])
    assert tuple(batch["image"].shape) == (5, 2, 32, 32, 3)


def test_train_teacher_on_two_cameras_gives_a_two_camera_policy(teacher):
    rows = [json.loads(line) for line in (teacher / "train_log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if row.get("stage") == "teacher" and "loss" in row]
    assert losses and np.isfinite(losses).all()
    policy = Policy.load(teacher / "teacher", device="cpu")
    assert policy.num_cameras == 2 and policy.card.camera_names == CAMERAS
    assert policy.card.vla_config["num_cameras"] == 2 and "camera_embed" in policy.vla.state_dict()

    views, instruction, states, _ = synthetic_camera_frames(42, 4, 48, 2)  # 48 and 64 px: not the model's 32
    scene, wrist = views[0][0], views[1][0]
    assert scene.shape != wrist.shape
    out = policy.predict([scene, wrist], instruction, states[0])
    assert out.actions.shape == (policy.card.chunk_size, 4) and np.isfinite(out.actions).all()
    # The second camera reaches the actions: another wrist frame, other actions.
    other = policy.predict([scene, views[1][3]], instruction, states[0])
    assert np.abs(other.actions - out.actions).max() > 1e-5
    with pytest.raises(ValueError, match="takes 2 camera image"):
        policy.predict(scene, instruction, states[0])


def test_a_camera_missing_from_the_bags_is_one_line(demos, tmp_path, capsys):
    code = cli(["train-teacher", "--data", str(demos), "--out", str(tmp_path / "t"), "--size", "tiny", "--steps", "1",
                "--camera-topic", "/cam/scene", "--camera-topic", "/cam/side"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "episode_0000" in err and "'/cam/side'" in err and "not in bag" in err, err
    assert not (tmp_path / "t" / "teacher").exists()


def test_topics_yaml_lists_the_cameras_and_distill_checks_their_count(demos, teacher, tmp_path, capsys):
    topics = tmp_path / "topics.yaml"
    topics.write_text("cameras:\n  - /cam/scene\n  - /cam/wrist\n")
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    assert topics_from_args(parser.parse_args(["--data", str(demos), "--topics", str(topics)])).cameras == CAMERAS
    flags = parser.parse_args(["--data", str(demos), "--topics", str(topics), "--camera-topic", "/cam/wrist"])
    assert topics_from_args(flags).cameras == ["/cam/wrist"]  # flags replace the file's list

    code = cli(["distill", "--teacher", str(teacher / "teacher"), "--data", str(demos), "--out", str(tmp_path / "d"),
                "--camera-topic", "/cam/scene"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "takes 2 camera(s)" in err and "--camera-topic once per camera" in err, err


def test_a_single_camera_model_refuses_two_frames_and_a_model_refuses_float_pixels(tmp_path):
    policy = Policy.load(create_untrained_policy(tmp_path / "one", size="tiny"), device="cpu")
    frame = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match=r"^images: this policy takes 1 camera image\(s\) per observation, got 2$"):
        policy.predict([frame, frame], "open the drawer", np.zeros(4))
    two = Policy.load(create_untrained_policy(tmp_path / "two", size="tiny", camera_names=CAMERAS), device="cpu")
    assert two.num_cameras == 2 and two.card.camera_names == CAMERAS
    assert two.predict([frame, np.zeros((10, 20, 3), np.uint8)], "x", np.zeros(4)).actions.shape == (4, 4)
    # The model itself takes uint8 pixels only: float frames in [0, 1] would be read as near-black.
    pixels = torch.zeros(1, 2, two.vla.config.image_size, two.vla.config.image_size, 3)
    with pytest.raises(ValueError, match=r"^images: expected uint8 RGB \(0\.\.255\), got torch.float32$"):
        two.vla.encode(pixels, ["x"], torch.zeros(1, 4))
