"""Write test/fixtures/lerobot_dataset_v3/ and lerobot_dataset_v3_image/: tiny LeRobotDataset v3
roots recorded by LeRobot itself, the oracle for the reader in actdistill_ros/data/lerobot_dataset.py
(test/test_lerobot_dataset.py).

LeRobot is never a dependency of this package; run this with the throwaway environment that
scripts/make_lerobot_fixtures.sh builds (lerobot 0.4.4 beside the CPU torch):

    "$LEROBOT_VENV/bin/python" scripts/make_lerobot_dataset_fixture.py [FIXTURES_DIR]

Two cameras of different sizes, three episodes (10, 12, 14 frames at 10 fps) that LeRobot
concatenates into one data parquet file and one AV1 mp4 per camera. In the _image variant the
wrist camera is a feature of dtype "image": LeRobot embeds its frames as PNG bytes in the parquet. Frame n of the dataset (its
global index) has blue level 16 + 6 n, action [n, -n, n / 2, n % 2] and state sin(n * [0.1, 0.2, 0.3]),
so a reader's episode boundaries and frame timing can be checked exactly.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "test"))
from lerobot_dataset_writer import camera_frame  # noqa: E402  (numpy only; same frames as the test writer)

from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: E402

LENGTHS = (10, 12, 14)
TASKS = ("pick up the red cube", "open the drawer", "pick up the red cube")
CAMERAS = {"observation.images.top": (48, 64), "observation.images.wrist": (32, 40)}


def frame_values(n: int) -> tuple[np.ndarray, np.ndarray]:
    action = np.array([n, -n, n / 2, n % 2], dtype=np.float32)
    state = np.sin(n * np.array([0.1, 0.2, 0.3])).astype(np.float32)
    return action, state


def write(out: Path, image_cameras: tuple[str, ...] = ()) -> None:
    shutil.rmtree(out, ignore_errors=True)
    features = {key: {"dtype": "image" if key in image_cameras else "video", "shape": (h, w, 3),
                      "names": ["height", "width", "channels"]} for key, (h, w) in CAMERAS.items()}
    features["observation.state"] = {"dtype": "float32", "shape": (3,), "names": ["joint_0", "joint_1", "joint_2"]}
    features["action"] = {"dtype": "float32", "shape": (4,), "names": ["x", "y", "z", "gripper"]}
    dataset = LeRobotDataset.create(repo_id="actdistill/tiny_arm", fps=10, features=features, root=out,
                                    robot_type="tiny_arm", use_videos=True)
    n = 0
    for length, task in zip(LENGTHS, TASKS):
        for _ in range(length):
            action, state = frame_values(n)
            frame = {key: camera_frame(h, w, n, camera) for camera, (key, (h, w)) in enumerate(CAMERAS.items())}
            dataset.add_frame({**frame, "observation.state": state, "action": action, "task": task})
            n += 1
        dataset.save_episode()
    dataset.finalize()
    print(f"wrote {out}")


if __name__ == "__main__":
    fixtures = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "test" / "fixtures"
    write(fixtures / "lerobot_dataset_v3")
    write(fixtures / "lerobot_dataset_v3_image", image_cameras=("observation.images.wrist",))
