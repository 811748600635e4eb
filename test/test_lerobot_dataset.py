"""LeRobotDataset v3 roots as demonstrations: the reader against a dataset written here (two
cameras of different sizes, three episodes sharing one parquet file and one mp4 per camera, AV1
when this PyAV encodes it), `actdistill dataset-info`, train-teacher on the root, and one test
per kind of bad dataset."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from actdistill_ros.cli import main as cli
from actdistill_ros.data.dataset import DemoDataset
from actdistill_ros.data.lerobot_dataset import (DatasetError, LeRobotDatasetReader, is_lerobot_dataset,
                                                 read_lerobot_episodes)
from actdistill_ros.data.synthetic import write_synthetic_demos
from actdistill_ros.distill.demos import check_policy_takes_demos, load_demonstrations
from actdistill_ros.data import TopicConfig
from actdistill_ros.policy import Policy

from lerobot_dataset_writer import (ACTION_NAMES, CAMERAS, STATE_NAMES, camera_frame, encode_video, frame_number,
                                    write_lerobot_dataset)

LENGTHS = (10, 12, 14)
TOP, WRIST = CAMERAS
# Recorded by LeRobot 0.4.4 itself (scripts/make_lerobot_dataset_fixture.py): the reader's oracle for
# the layout, the column names and types and the video timing LeRobot really writes.
LEROBOT_MADE = Path(__file__).parent / "fixtures" / "lerobot_dataset_v3"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("lerobot") / "tiny_arm_demos"
    return root, write_lerobot_dataset(root, LENGTHS)


@pytest.fixture
def copy(written, tmp_path):
    """A private copy of the dataset, for a test that damages it."""
    root = tmp_path / "damaged"
    shutil.copytree(written[0], root)
    return root


def _one_line_error(capfd, argv) -> str:
    capfd.readouterr()
    assert cli(argv) == 2
    err = capfd.readouterr().err
    # The error is one line; the progress bar of the episodes read before it may precede it.
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("reading episodes")]
    assert len(lines) == 1 and "Traceback" not in err, lines
    return lines[0]


def test_the_writer_uses_lerobots_default_codec_when_this_pyav_has_it(written):
    import av
    _, expected = written
    if "libsvtav1" in av.codecs_available:
        assert expected["codec"] == "libsvtav1"
    with av.open(str(written[0] / "videos" / TOP / "chunk-000" / "file-000.mp4")) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name in ("libdav1d", "libaom-av1", "av1")) == (expected["codec"] == "libsvtav1")
        assert stream.frames == sum(LENGTHS)  # all three episodes in one file


def test_metadata_episodes_tasks_features_and_stats(written):
    root, expected = written
    assert is_lerobot_dataset(root) and not is_lerobot_dataset(root / "meta")
    reader = LeRobotDatasetReader(root)
    assert reader.fps == 10 and reader.camera_keys == [TOP, WRIST]
    assert reader.action_names == ACTION_NAMES and reader.state_names == STATE_NAMES
    assert reader.features[TOP].image_hw == (48, 64) and reader.features[WRIST].image_hw == (32, 40)
    assert reader.tasks == {0: "pick up the red cube", 1: "open the drawer"}
    assert [e.length for e in reader.episodes] == list(LENGTHS)
    assert [e.tasks for e in reader.episodes] == [[t] for t in expected["tasks"]]
    spans = [e.videos[WRIST] for e in reader.episodes]
    assert [(s.from_timestamp, s.to_timestamp) for s in spans] == [(0.0, 1.0), (1.0, 2.2), (2.2, 3.6)]
    assert {e.data_file_index for e in reader.episodes} == {0}
    assert reader.referenced_files() == [root / "data/chunk-000/file-000.parquet",
                                         root / f"videos/{TOP}/chunk-000/file-000.mp4",
                                         root / f"videos/{WRIST}/chunk-000/file-000.mp4"]
    np.testing.assert_allclose(reader.stats["action"]["std"], expected["stats"]["action"]["std"])
    assert min(reader.stats["action"]["std"]) > 0.05  # the stats are not trivial
    assert np.asarray(reader.stats[TOP]["mean"]).shape == (3, 1, 1)


def test_decoded_frames_match_the_encoded_ones_with_exact_episode_boundaries(written):
    root, expected = written
    reader = LeRobotDatasetReader(root)
    for key, (height, width) in CAMERAS.items():
        for entry, start in zip(reader.episodes, expected["starts"]):
            rows = reader.read_rows(entry)
            np.testing.assert_allclose(rows["timestamps"], np.arange(entry.length) / 10, atol=1e-6)
            frames = reader.decode_video(key, entry, rows["timestamps"])
            assert frames.shape == (entry.length, height, width, 3) and frames.dtype == np.uint8
            # Timing is exact: each frame is the one encoded at that position of the shared file.
            assert [frame_number(f) for f in frames] == list(range(start, start + entry.length)), (key, entry.index)
            error = np.abs(frames.astype(np.int16) - expected["frames"][key][entry.index].astype(np.int16))
            assert error.mean() < 3.0, (key, entry.index, error.mean())  # lossy 4:2:0 video of smooth ramps


# (libx265 is left out: this wheel's x265 corrupts its heap encoding two small sizes in one process.)
@pytest.mark.parametrize("codec", ["libsvtav1", "libx264", "mpeg4"])
def test_frames_are_exact_in_time_for_each_codec_and_a_long_keyframe_interval(codec, tmp_path):
    import av
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV cannot encode {codec}")
    # A keyframe every 8 frames (and B-frames, for H.264): episodes 1 and 2 start between keyframes.
    expected = write_lerobot_dataset(tmp_path / "ds", LENGTHS, codec=codec, gop=8)
    for episode, start in zip(read_lerobot_episodes(tmp_path / "ds", progress=False), expected["starts"]):
        for camera in range(len(CAMERAS)):
            assert [frame_number(f) for f in episode.images[:, camera]] == list(range(start, start + len(episode)))
    reader = LeRobotDatasetReader(tmp_path / "ds")
    entry = reader.episodes[1]
    frames = reader.decode_video(WRIST, entry, reader.read_rows(entry)["timestamps"])
    assert np.abs(frames.astype(np.int16) - expected["frames"][WRIST][1]).mean() < 3.0


def test_episodes_are_the_bag_readers_episodes(written):
    root, expected = written
    episodes = read_lerobot_episodes(root, image_size=32, progress=False)
    assert [e.key for e in episodes] == ["episode_000000", "episode_000001", "episode_000002"]
    for episode, length, actions, states, task, start in zip(episodes, LENGTHS, expected["actions"], expected["states"],
                                                             expected["tasks"], expected["starts"]):
        assert episode.images.shape == (length, 2, 32, 32, 3) and episode.images.dtype == np.uint8
        assert episode.camera_topics == [TOP, WRIST] and episode.source_image_sizes == [(48, 64), (32, 40)]
        np.testing.assert_array_equal(episode.actions, actions)
        np.testing.assert_array_equal(episode.states, states)
        assert episode.instructions == [task] * length
        assert episode.stamps_ns.tolist() == [round(t * 1e8) for t in range(length)]
        assert episode.action_names == ACTION_NAMES and episode.state_names == STATE_NAMES
        # Both cameras (resized to 32 px) keep their frame numbers: no frame of a neighbour episode.
        assert [frame_number(f) for f in episode.images[:, 1]] == list(range(start, start + length))
    # The last chunk of an episode is padded with its own last action, never the next episode's.
    dataset = DemoDataset(episodes, chunk_size=4)
    item = dataset[LENGTHS[0] - 1]
    np.testing.assert_array_equal(item["actions"].numpy(), np.repeat(expected["actions"][0][-1:], 4, axis=0))
    assert item["chunk_valid"].tolist() == [True, False, False, False]
    assert item["image"].shape == (2, 32, 32, 3) and item["instruction"] == expected["tasks"][0]
    # Without a size, every camera comes at the first camera's size.
    (first,) = read_lerobot_episodes(root, episodes=[1], progress=False)
    assert first.images.shape == (12, 2, 48, 64, 3) and first.key == "episode_000001"


def test_a_dataset_recorded_by_lerobot_reads_frame_exact():
    reader = LeRobotDatasetReader(LEROBOT_MADE)
    assert reader.camera_keys == [TOP, WRIST] and reader.fps == 10
    assert reader.features[TOP].codec == "av1" and reader.action_names == ACTION_NAMES
    assert reader.tasks == {0: "pick up the red cube", 1: "open the drawer"}
    episodes = read_lerobot_episodes(LEROBOT_MADE, progress=False)
    assert [len(e) for e in episodes] == list(LENGTHS)
    start = 0
    for episode, task in zip(episodes, ["pick up the red cube", "open the drawer", "pick up the red cube"]):
        n = np.arange(start, start + len(episode))
        np.testing.assert_array_equal(episode.actions, np.stack([n, -n, n / 2, n % 2], axis=1).astype(np.float32))
        np.testing.assert_allclose(episode.states, np.sin(n[:, None] * [0.1, 0.2, 0.3]), atol=1e-6)
        assert episode.instructions == [task] * len(episode)
        for camera in range(2):  # both cameras, the wrist one resized to the top one's 48 x 64
            assert [frame_number(f) for f in episode.images[:, camera]] == n.tolist(), (episode.key, camera)
        start += len(episode)
    reader = LeRobotDatasetReader(LEROBOT_MADE)
    entry = reader.episodes[2]
    frames = reader.decode_video(WRIST, entry, reader.read_rows(entry)["timestamps"])
    assert frames.shape == (14, 32, 40, 3)
    original = np.stack([camera_frame(32, 40, n, 1) for n in range(22, 36)])
    assert np.abs(frames.astype(np.int16) - original).mean() < 3.0


def test_a_camera_stored_as_images_reads_lossless_beside_a_video_camera():
    root = LEROBOT_MADE.with_name("lerobot_dataset_v3_image")  # LeRobot embeds PNG bytes in the parquet
    reader = LeRobotDatasetReader(root)
    assert [reader.features[k].dtype for k in reader.camera_keys] == ["video", "image"]
    entry = reader.episodes[1]
    rows = reader.read_rows(entry)
    frames = reader.decode_images(WRIST, entry, rows["table"])
    np.testing.assert_array_equal(frames, np.stack([camera_frame(32, 40, n, 1) for n in range(10, 22)]))
    episodes = read_lerobot_episodes(root, image_size=32, progress=False)
    assert [[frame_number(f) for f in e.images[:, 1]] for e in episodes] == \
        [list(range(0, 10)), list(range(10, 22)), list(range(22, 36))]


def test_load_demonstrations_takes_a_dataset_root(written):
    root, _ = written
    demos = load_demonstrations([root], TopicConfig(), image_size=32, chunk_size=4, val_fraction=0.34, seed=0,
                                progress=False)
    assert demos.camera_names == [TOP, WRIST] and demos.action_names == ACTION_NAMES
    assert demos.state_names == STATE_NAMES and len(demos.bags) == 3
    assert len(demos.train) + len(demos.val) == sum(LENGTHS) and demos.stats.action_dim == 4


def test_dataset_info_prints_episodes_features_and_tasks(written, capsys):
    root, _ = written
    assert cli(["dataset-info", str(root)]) == 0
    text = capsys.readouterr().out
    assert "3 episodes, 36 frames at 10 fps" in text
    assert f"{TOP}" in text and "[48, 64, 3]" in text and "[32, 40, 3]" in text and "open the drawer" in text
    assert cli(["dataset-info", str(root), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [e["length"] for e in summary["episodes"]] == list(LENGTHS) and summary["fps"] == 10
    assert summary["features"]["action"] == {"dtype": "float32", "shape": [4], "names": ACTION_NAMES}
    assert summary["features"][WRIST]["shape"] == [32, 40, 3] and summary["cameras"] == [TOP, WRIST]
    assert summary["tasks"] == [{"task_index": 0, "task": "pick up the red cube"},
                                {"task_index": 1, "task": "open the drawer"}]


@pytest.fixture(scope="module")
def teacher_run(written, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher_run")
    assert cli(["train-teacher", "--data", str(written[0]), "--out", str(out), "--size", "tiny", "--steps", "6",
                "--batch-size", "8", "--val-fraction", "0.34", "--checkpoint-every", "100"]) == 0
    return out


def test_train_teacher_runs_on_a_dataset_root(teacher_run, written):
    out = teacher_run
    policy = Policy.load(out / "teacher", device="cpu")
    assert policy.card.camera_names == [TOP, WRIST] and policy.vla.config.num_cameras == 2
    assert policy.card.state_names == STATE_NAMES and policy.card.action_space.names == ACTION_NAMES
    assert policy.card.provenance["bags"] == ["episode_000000", "episode_000001", "episode_000002"]
    assert policy.card.provenance["data"] == [str(written[0])]


def test_distill_runs_on_a_dataset_root(written, teacher_run, tmp_path):
    out = tmp_path / "distill"
    assert cli(["distill", "--teacher", str(teacher_run / "teacher"), "--data", str(written[0]), "--out", str(out),
                "--probe-steps", "3", "--distill-steps", "4", "--batch-size", "8", "--checkpoint-every", "100"]) == 0
    student = Policy.load(out / "student", device="cpu")
    assert student.card.is_student and student.card.camera_names == [TOP, WRIST]


def test_bag_topic_flags_and_mixed_data_are_refused(written, tmp_path, capfd):
    root, _ = written
    line = _one_line_error(capfd, ["train-teacher", "--data", str(root), "--out", str(tmp_path / "x"),
                                   "--camera-topic", "/camera/image_raw"])
    assert "--camera-topic" in line and str(root) in line and "LeRobotDataset root" in line
    bags = write_synthetic_demos(tmp_path / "bags", episodes=1, length=3)
    line = _one_line_error(capfd, ["train-teacher", "--data", str(root), str(bags), "--out", str(tmp_path / "x")])
    assert str(root) in line and str(bags) in line
    assert not (tmp_path / "x").exists()


# ---- bad datasets: one line naming the file and what is wrong -----------------------------------
def test_a_missing_data_file_is_named(copy, capfd):
    data = copy / "data/chunk-000/file-000.parquet"
    data.unlink()
    line = _one_line_error(capfd, ["dataset-info", str(copy)])
    assert str(data) in line and "missing" in line
    with pytest.raises(DatasetError, match=f"{data}: missing"):
        read_lerobot_episodes(copy, progress=False)


def test_a_missing_video_file_is_named(copy, capfd):
    video = copy / f"videos/{WRIST}/chunk-000/file-000.mp4"
    video.unlink()
    line = _one_line_error(capfd, ["dataset-info", str(copy)])
    assert str(video) in line and "missing" in line


def test_a_missing_metadata_file_is_named(copy, capfd):
    (copy / "meta/tasks.parquet").unlink()
    line = _one_line_error(capfd, ["dataset-info", str(copy)])
    assert str(copy / "meta/tasks.parquet") in line and "missing" in line
    (copy / "meta/info.json").unlink()
    line = _one_line_error(capfd, ["dataset-info", str(copy)])
    assert str(copy / "meta/info.json") in line and "missing" in line


def test_a_video_shorter_than_its_episode_is_refused(copy, written, tmp_path, capfd):
    _, expected = written
    video = copy / f"videos/{TOP}/chunk-000/file-000.mp4"
    frames = np.concatenate(expected["frames"][TOP])
    encode_video(video, frames[:-4], fps=10, codec=expected["codec"])  # the last episode loses 4 frames
    reader = LeRobotDatasetReader(copy)
    assert len(read_lerobot_episodes(copy, episodes=[0, 1], progress=False)) == 2  # earlier episodes still read
    with pytest.raises(DatasetError) as caught:
        reader.read_episode(2)
    message = str(caught.value)
    assert message.startswith(f"{video}:") and "episode 2 frame 10" in message and "shorter than its episode" in message
    line = _one_line_error(capfd, ["train-teacher", "--data", str(copy), "--out", str(tmp_path / "x"),
                                   "--size", "tiny", "--steps", "1"])
    assert str(video) in line and "shorter than its episode" in line


def test_an_unknown_codec_is_refused(copy):
    video = copy / f"videos/{WRIST}/chunk-000/file-000.mp4"
    payload = video.read_bytes()
    # Rename the sample entry of the stream's codec (av01 / avc1 / mp4v) to one FFmpeg does not know.
    renamed = payload
    for fourcc in (b"av01", b"avc1", b"mp4v"):
        renamed = renamed.replace(fourcc, b"zz01")
    assert renamed != payload
    video.write_bytes(renamed)
    with pytest.raises(DatasetError) as caught:
        read_lerobot_episodes(copy, episodes=[0], progress=False)
    message = str(caught.value)
    assert message.startswith(f"{video}:") and "codec is unknown" in message and "\n" not in message


def test_a_corrupt_video_is_refused(copy):
    video = copy / f"videos/{TOP}/chunk-000/file-000.mp4"
    video.write_bytes(b"not an mp4 at all" * 10)
    with pytest.raises(DatasetError, match=f"{video}: not a readable video"):
        read_lerobot_episodes(copy, episodes=[0], progress=False)


def _edit_info(root: Path, edit) -> Path:
    path = root / "meta/info.json"
    info = json.loads(path.read_text())
    edit(info["features"])
    path.write_text(json.dumps(info))
    return path


@pytest.mark.parametrize("feature, shape, what", [
    ("action", [2, 2], "the policy takes a vector"),
    ("observation.state", [3, 1], "the policy takes a vector"),
    (WRIST, [32, 40, 1], "the policy takes RGB frames"),
])
def test_a_feature_shape_the_policy_does_not_take_is_refused(copy, capfd, feature, shape, what):
    info = _edit_info(copy, lambda features: features[feature].update(shape=shape))
    line = _one_line_error(capfd, ["dataset-info", str(copy)])
    assert line.startswith(f"actdistill dataset-info: error: {info}: ")
    assert f"feature {feature!r} has shape {shape}, {what}" in line


def test_a_dataset_the_teacher_does_not_take_is_refused_before_decoding(written):
    root, _ = written
    info = root / "meta/info.json"
    with pytest.raises(DatasetError, match=rf"{info}: feature 'action' has shape \[4\], teacher/ predicts \[7\]"):
        check_policy_takes_demos([root], TopicConfig(), "teacher/", num_cameras=2, action_dim=7, state_dim=3)
    with pytest.raises(DatasetError, match=rf"{info}: feature 'observation.state' has shape \[3\], teacher/ takes \[5\]"):
        check_policy_takes_demos([root], TopicConfig(), "teacher/", num_cameras=2, action_dim=4, state_dim=5)
    with pytest.raises(DatasetError, match=rf"{info}: 2 camera feature\(s\) .* teacher/ takes 1"):
        check_policy_takes_demos([root], TopicConfig(), "teacher/", num_cameras=1, action_dim=4, state_dim=0)
    check_policy_takes_demos([root], TopicConfig(), "teacher/", num_cameras=2, action_dim=4, state_dim=0)


def test_distill_refuses_a_dataset_whose_actions_the_teacher_does_not_predict(copy, teacher_run, tmp_path, capfd):
    info = _edit_info(copy, lambda features: features["action"].update(shape=[6], names=None))
    line = _one_line_error(capfd, ["distill", "--teacher", str(teacher_run / "teacher"), "--data", str(copy),
                                   "--out", str(tmp_path / "o")])
    assert f"{info}: feature 'action' has shape [6], {teacher_run / 'teacher'} predicts [4]" in line
    assert not (tmp_path / "o").exists()


def test_rows_that_disagree_with_the_episode_table_are_refused(copy):
    data = copy / "data/chunk-000/file-000.parquet"
    table = pq.read_table(data)
    pq.write_table(table.slice(0, table.num_rows - 2), data)  # the last episode loses two rows
    with pytest.raises(DatasetError, match=f"{data}: holds 12 rows of episode 2, file-000.parquet says its length is 14"):
        read_lerobot_episodes(copy, episodes=[2], progress=False)


def test_an_older_layout_is_refused_with_the_way_out(copy):
    path = copy / "meta/info.json"
    info = json.loads(path.read_text())
    path.write_text(json.dumps({**info, "codebase_version": "v2.1"}))
    with pytest.raises(DatasetError, match=f"{path}: codebase_version 'v2.1', expected v3.0"):
        LeRobotDatasetReader(copy)
