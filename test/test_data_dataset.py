"""DemoDataset, norm stats and episode split over episodes read from real bags."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from actdistill_ros.data import TopicConfig, read_episode, read_episodes, write_episode_bag
from actdistill_ros.data.images import resize_rgb
from actdistill_ros.data.synthetic import synthetic_camera_frames, write_synthetic_demos
from actdistill_ros.data.dataset import DemoDataset, NormStats, collate_samples, compute_norm_stats, split_episodes
from actdistill_ros.data.stats import STD_FLOOR

ACTION_NAMES = ["delta_x", "delta_y", "delta_z", "gripper"]


def write_bags(root, lengths, state=True, storage="mcap"):
    rng = np.random.default_rng(0)
    topics = TopicConfig() if state else TopicConfig(state_topic=None)
    arrays = []
    for i, num in enumerate(lengths):
        images = rng.integers(0, 256, (num, 12, 16, 3), dtype=np.uint8)
        actions = rng.normal(size=(num, 4))
        actions[:, 3] = 1.0  # a gripper held open the whole time: std hits the floor
        states = rng.normal(size=(num, 3)) if state else None
        write_episode_bag(root / f"ep_{i:02d}", images=images, instruction=f"task {i}", states=states,
                          actions=actions, topics=topics, storage=storage, action_names=ACTION_NAMES)
        arrays.append((images, states, actions))
    return topics, arrays


def test_items_chunks_padding_and_collate(tmp_path):
    topics, arrays = write_bags(tmp_path, [5, 3], storage="sqlite3")
    episodes = read_episodes(tmp_path, topics, progress=False)
    ds = DemoDataset(episodes, chunk_size=4)
    assert len(ds) == 8

    item = ds[1]
    images, states, actions = arrays[0]
    assert item["key"] == episodes[0].sample_key(1) and item["key"].startswith("ep_00//camera/image_raw@")
    assert item["image"].dtype == torch.uint8 and tuple(item["image"].shape) == (1, 12, 16, 3)  # (cameras, h, w, 3)
    assert torch.equal(item["image"][0], torch.from_numpy(images[1]))
    assert item["instruction"] == "task 0"
    assert item["state"].dtype == torch.float32 and torch.equal(item["state"], torch.from_numpy(states[1].astype(np.float32)))
    assert torch.equal(item["actions"], torch.from_numpy(actions[1:5].astype(np.float32)))  # raw, un-normalised
    assert item["chunk_valid"].tolist() == [True] * 4

    last = ds[6]  # ep_01 frame 1 of 3: actions 1, 2, then 2 repeated twice
    acts = arrays[1][2].astype(np.float32)
    assert torch.equal(last["actions"], torch.from_numpy(acts[[1, 2, 2, 2]]))
    assert last["chunk_valid"].tolist() == [True, True, False, False]
    assert ds[7]["chunk_valid"].tolist() == [True, False, False, False]
    assert ds.keys() == [ds.key(i) for i in range(len(ds))] and len(set(ds.keys())) == 8

    batch = next(iter(DataLoader(ds, batch_size=8, shuffle=False, collate_fn=collate_samples)))
    assert tuple(batch["image"].shape) == (8, 1, 12, 16, 3) and tuple(batch["actions"].shape) == (8, 4, 4)
    assert tuple(batch["state"].shape) == (8, 3) and batch["chunk_valid"].dtype == torch.bool
    assert batch["key"] == ds.keys() and batch["instruction"] == ["task 0"] * 5 + ["task 1"] * 3
    with pytest.raises(IndexError):
        ds[8]
    with pytest.raises(ValueError, match="chunk_size"):
        DemoDataset(episodes, chunk_size=0)


def test_two_camera_items_stack_the_cameras_in_topic_order(tmp_path):
    cameras = ["/cam/scene", "/cam/wrist"]
    write_synthetic_demos(tmp_path, episodes=2, length=5, storage="sqlite3", size=24, cameras=cameras)
    topics = TopicConfig(cameras=cameras)
    episodes = read_episodes(tmp_path, topics, image_size=16, progress=False)
    ds = DemoDataset(episodes, chunk_size=3)
    views, *_ = synthetic_camera_frames(0, 5, 24, 2)
    item = ds[2]
    assert tuple(item["image"].shape) == (2, 16, 16, 3) and item["key"].startswith("episode_0000//cam/scene@")
    for camera in range(2):  # each camera's own frame, resized like the Policy resizes it
        assert torch.equal(item["image"][camera], torch.from_numpy(resize_rgb(views[camera][2], 16)))
    assert not torch.equal(item["image"][0], item["image"][1])
    batch = collate_samples([ds[i] for i in range(4)])
    assert tuple(batch["image"].shape) == (4, 2, 16, 16, 3) and batch["image"].dtype == torch.uint8
    one_camera = read_episodes(tmp_path, TopicConfig(camera_topic=cameras[0]), image_size=16, progress=False)
    with pytest.raises(ValueError, match="cameras"):
        DemoDataset([episodes[0], one_camera[1]], chunk_size=3)


def test_stateless_episodes_give_empty_state(tmp_path):
    topics, _ = write_bags(tmp_path, [2], state=False)
    ds = DemoDataset([read_episode(tmp_path / "ep_00", topics)], chunk_size=2)
    assert ds[0]["state"].shape == (0,) and collate_samples([ds[0], ds[1]])["state"].shape == (2, 0)
    stats = compute_norm_stats(ds.episodes)
    assert stats.state_mean == [] and stats.state_dim == 0


def test_norm_stats_values_floor_and_json_round_trip(tmp_path):
    topics, arrays = write_bags(tmp_path, [4, 6])
    episodes = read_episodes(tmp_path, topics, progress=False)
    stats = compute_norm_stats(episodes)
    actions = np.concatenate([a for _, _, a in arrays]).astype(np.float32).astype(np.float64)
    states = np.concatenate([s for _, s, _ in arrays]).astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(stats.action_mean, actions.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.action_std[:3], actions.std(0)[:3], rtol=1e-6)
    assert stats.action_std[3] == STD_FLOOR  # constant gripper dimension
    np.testing.assert_allclose(stats.action_min, actions.min(0))
    np.testing.assert_allclose(stats.action_max, actions.max(0))
    np.testing.assert_allclose(stats.state_mean, states.mean(0), rtol=1e-6)
    assert stats.num_frames == 10 and stats.num_episodes == 2

    restored = NormStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert restored == stats
    normed = stats.normalize_actions(actions)
    np.testing.assert_allclose(normed[:, :3].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(stats.unnormalize_actions(normed), actions, atol=1e-5)
    with pytest.raises(ValueError, match="action_std"):
        NormStats.from_dict({**stats.to_dict(), "action_std": [1.0]})
    with pytest.raises(ValueError, match="unknown keys"):
        NormStats.from_dict({**stats.to_dict(), "acton_mean": [0.0]})
    with pytest.raises(ValueError, match="finite"):
        NormStats.from_dict({**stats.to_dict(), "action_mean": [0.0, float("nan"), 0.0, 0.0]})


def test_split_by_episode_is_deterministic(tmp_path):
    topics, _ = write_bags(tmp_path, [2] * 10)
    episodes = read_episodes(tmp_path, topics, progress=False)
    train, val = split_episodes(episodes, 0.2, seed=3)
    assert len(train) == 8 and len(val) == 2
    assert {e.key for e in train}.isdisjoint({e.key for e in val})
    assert {e.key for e in train} | {e.key for e in val} == {e.key for e in episodes}
    again = split_episodes(list(reversed(episodes)), 0.2, seed=3)
    assert [e.key for e in again[1]] == [e.key for e in val]
    assert len({tuple(e.key for e in split_episodes(episodes, 0.2, seed=s)[1]) for s in range(6)}) > 1
    assert len(split_episodes(episodes[:2], 0.01, seed=0)[1]) == 1  # a requested split is never empty
    assert len(split_episodes(episodes[:1], 0.5, seed=0)[0]) == 1  # ...nor the training side
    assert split_episodes(episodes, 0.0)[1] == []
    with pytest.raises(ValueError, match="val_fraction"):
        split_episodes(episodes, 1.0)
