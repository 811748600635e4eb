"""One Meta-World v3 task with camera images, a language instruction and its scripted expert.

``MetaWorldTask`` hides the benchmark's quirks:
  * fast offscreen rendering (no shadow map, no multisampling) through our own ``mujoco.Renderer``;
  * the ``corner*`` cameras render upside down, so their frames are rotated by 180 degrees;
  * several cameras can render each step ("corner4,topview"), in that order;
  * ``reset(seed)`` gives a fresh, reproducible object/goal placement (Meta-World ignores the
    gymnasium seed; its own seeded RNG must be switched on), bit-identical across processes;
  * every goal marker gets the same colour, so only the instruction tells reach/push/pick-place apart.
"""

from __future__ import annotations

import os

# The GL backend is chosen when mujoco is imported; EGL renders offscreen without a display.
os.environ.setdefault("MUJOCO_GL", "egl")

import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402

from actdistill_ros.data.config import DEFAULT_CAMERA_TOPIC  # noqa: E402

# Seeds of demonstration episodes count up from 0; evaluation episodes from 10000 up. The two
# ranges must never overlap, or evaluation would replay placements seen in training.
COLLECTION_SEED_BASE = 0
EVAL_SEED_BASE = 10_000

STATE_NAMES = ("hand_x", "hand_y", "hand_z", "gripper_opening")
ACTION_NAMES = ("delta_x", "delta_y", "delta_z", "gripper")
ACTION_LOW = -1.0
ACTION_HIGH = 1.0

# One colour for every goal marker (Meta-World colours them per task: red/green/blue).
GOAL_MARKER_RGBA = (0.95, 0.75, 0.1, 1.0)
GOAL_MARKER_SITES = ("goal",)

# MT10 tasks: short name -> (Meta-World v3 env name, instruction).
MT10_TASKS: dict[str, tuple[str, str]] = {
    "reach": ("reach-v3", "reach the goal with the gripper"),
    "push": ("push-v3", "push the puck to the goal"),
    "pick-place": ("pick-place-v3", "pick up the puck and place it at the goal"),
    "door-open": ("door-open-v3", "open the door"),
    "drawer-open": ("drawer-open-v3", "open the drawer"),
    "drawer-close": ("drawer-close-v3", "close the drawer"),
    "button-press-topdown": ("button-press-topdown-v3", "press the button from the top"),
    "peg-insert-side": ("peg-insert-side-v3", "insert the peg into the hole from the side"),
    "window-open": ("window-open-v3", "slide the window open"),
    "window-close": ("window-close-v3", "slide the window closed"),
}
MT10 = tuple(MT10_TASKS)
CI_TASKS = ("reach", "push")


def camera_names(camera: str) -> tuple[str, ...]:
    """'corner4' or 'corner4,topview' -> the Meta-World camera names, in order."""
    names = tuple(name.strip() for name in str(camera).split(","))
    if not all(names) or len(set(names)) != len(names):
        raise ValueError(f"camera {camera!r}: expected Meta-World camera names separated by commas, each once")
    return names


def check_camera_count(camera: str, num_cameras: int) -> str:
    """``camera`` if it names as many cameras as a policy takes images, else a one-line ValueError."""
    if len(camera_names(camera)) != num_cameras:
        raise ValueError(f"camera {camera!r}: the policy takes {num_cameras} camera image(s) per observation; give "
                         "as many Meta-World cameras, in its order, separated by commas (e.g. corner4,topview)")
    return camera


def camera_topics(camera: str) -> list[str]:
    """The topic of each camera in bags and on the simulated arm: the first on /camera/image_raw
    (as with one camera), the others on /camera_<name>/image_raw."""
    return [DEFAULT_CAMERA_TOPIC, *(f"/camera_{name}/image_raw" for name in camera_names(camera)[1:])]


def canonical_task_name(name: str) -> str:
    """'push' or 'push-v3' -> 'push'. Raises ValueError naming the known tasks."""
    short = name.strip().lower()
    if short.endswith("-v3"):
        short = short[: -len("-v3")]
    if short not in MT10_TASKS:
        raise ValueError(
            f"unknown Meta-World task {name!r}: expected one of {', '.join(MT10)} (optionally with -v3)"
        )
    return short


def instruction_for(name: str) -> str:
    return MT10_TASKS[canonical_task_name(name)][1]


def parse_task_list(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """'mt10' | 'reach,push' | ['reach', 'push-v3'] -> canonical short names, order kept, no duplicates."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names: list[str] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            expanded = list(MT10) if part.lower() == "mt10" else [canonical_task_name(part)]
            names.extend(n for n in expanded if n not in names)
    if not names:
        raise ValueError(f"no tasks given in {text!r}: expected e.g. 'reach,push' or 'mt10'")
    return names


@dataclass
class StepInfo:
    """What one ``step`` reports besides success."""

    step: int  # steps taken since reset, including this one
    reward: float
    truncated: bool  # the horizon is reached: call reset() next
    success_step: int | None  # first step at which the task succeeded, if it has


class MetaWorldTask:
    """A Meta-World v3 task rendering ``image_size`` px RGB frames from ``camera`` (one name, or
    several separated by commas).

    ``observe()`` -> (one rgb uint8 (S, S, 3) per camera, state float32 (4,) = hand xyz + gripper opening);
    ``step(action)`` -> (success, StepInfo); ``expert_action()`` -> the scripted expert's action.
    """

    def __init__(
        self,
        name: str,
        image_size: int = 96,
        camera: str = "corner4",
        horizon: int = 200,
        seed: int = COLLECTION_SEED_BASE,
    ) -> None:
        import metaworld
        import metaworld.policies
        import mujoco

        self._renderer = None
        self._env = None
        self.name = canonical_task_name(name)
        self.env_name, self.instruction = MT10_TASKS[self.name]
        if not isinstance(image_size, (int, np.integer)) or not 16 <= image_size <= 1024:
            raise ValueError(f"image_size {image_size!r}: expected an integer in [16, 1024]")
        self.image_size = int(image_size)
        self.horizon = horizon  # checked by the setter; applied to the env once it exists
        self.camera = camera

        # MT1 tasks are fully observable (goal position in the state vector), which the expert needs.
        benchmark = metaworld.MT1(self.env_name, seed=0)
        env = benchmark.train_classes[self.env_name]()
        env.set_task(benchmark.train_tasks[0])
        self._env = env
        self.horizon = self._horizon

        model = env.model
        self._camera_ids = []
        for name in camera_names(camera):
            camera_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, name)
            if camera_id < 0:
                known = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(model.ncam)]
                raise ValueError(f"camera {name!r} not in the Meta-World scene: expected one of {known}")
            self._camera_ids.append((camera_id, name.startswith("corner")))  # corner* are mounted upside down

        for site in GOAL_MARKER_SITES:
            site_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, site)
            if site_id >= 0:
                model.site_rgba[site_id] = GOAL_MARKER_RGBA

        # The default 4096 px shadow map with 4x MSAA costs ~100 ms/frame on llvmpipe; without them
        # a frame takes ~10-15 ms and looks the same at policy resolutions. Must precede the context.
        model.vis.quality.shadowsize = 0
        model.vis.quality.offsamples = 0
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.image_size)
        model.vis.global_.offheight = max(model.vis.global_.offheight, self.image_size)
        try:
            self._renderer = mujoco.Renderer(model, self.image_size, self.image_size)
        except Exception as err:  # GLFW without a display, missing EGL/Mesa libraries, ...
            raise RuntimeError(
                f"offscreen rendering failed ({str(err).splitlines()[0]}): set MUJOCO_GL=egl before mujoco is "
                "imported and install libegl1 libegl-mesa0 libgl1-mesa-dri libgbm1"
            ) from None

        self._expert = metaworld.policies.ENV_POLICY_MAP[self.env_name]()
        self.control_period_s = float(env.dt)  # 5 physics substeps per action: 80 Hz
        self.seed: int | None = None
        self._next_seed = int(seed)
        self._obs: np.ndarray | None = None
        self._frames: list[np.ndarray] | None = None
        self.steps = 0
        self.success_step: int | None = None
        self.reset(seed)

    # ------------------------------------------------------------------ episode control
    @property
    def horizon(self) -> int:
        """Steps per episode; Meta-World refuses to step past its own ``max_path_length``, so
        setting the horizon sets that too (takes effect for the running episode as well)."""
        return self._horizon

    @horizon.setter
    def horizon(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"horizon {value!r}: expected a positive integer")
        self._horizon = int(value)
        if self._env is not None:
            self._env.max_path_length = self._horizon

    def reset(self, seed: int | None = None, hand_offset=None) -> None:
        """Start an episode; the same seed gives the same placement (and bit-identical frames).
        ``hand_offset`` (x, y, z metres): the hand starts that far from the task's fixed start, clipped
        to the hand's workspace (demonstrations only; evaluation always starts at the fixed start)."""
        import mujoco

        if seed is None:
            seed = self._next_seed
        seed = int(seed)
        env = self._env
        # Meta-World ignores gymnasium's reset(seed=...): placements come from env.np_random only
        # when seeded_rand_vec is on and the frozen per-task vector is released.
        env.seeded_rand_vec = True
        env._freeze_rand_vec = False
        env.seed(seed)
        fixed_start = np.array(env.hand_init_pos, dtype=np.float64)
        if hand_offset is not None:
            offset = np.asarray(hand_offset, dtype=np.float64).reshape(-1)
            if offset.shape != (3,) or not np.all(np.isfinite(offset)):
                raise ValueError(f"hand_offset {np.asarray(hand_offset).tolist()}: expected 3 finite metres (x, y, z)")
            # 2 cm inside the workspace bounds: the mocap weld cannot pull the hand onto them.
            env.hand_init_pos = np.clip(fixed_start + offset, np.asarray(env.hand_low) + 0.02,
                                        np.asarray(env.hand_high) - 0.02)
        try:
            obs, _ = env.reset()
        finally:
            env.hand_init_pos = fixed_start
        # reset() moves the goal site in the model without recomputing positions, so site_xpos
        # would keep values from the previous episode (frames would depend on episode history).
        mujoco.mj_forward(env.model, env.data)
        self._obs = obs
        self._frames = None
        self.seed = seed
        self._next_seed = seed + 1
        self.steps = 0
        self.success_step = None

    @property
    def num_cameras(self) -> int:
        return len(self._camera_ids)

    def observe(self) -> tuple[list[np.ndarray], np.ndarray]:
        """(one rgb uint8 (S, S, 3) per camera, state float32 (4,)). Frames are rendered once per step."""
        if self._frames is None:
            self._frames = []
            for camera_id, upside_down in self._camera_ids:
                self._renderer.update_scene(self._env.data, camera=camera_id)
                frame = self._renderer.render()
                self._frames.append(np.ascontiguousarray(frame[::-1, ::-1] if upside_down else frame))
        return self._frames, self.state()

    def state(self) -> np.ndarray:
        """float32 (4,): hand x, y, z in metres and gripper opening in [0, 1]."""
        return np.asarray(self._obs[:4], dtype=np.float32)

    def step(self, action) -> tuple[bool, StepInfo]:
        """Apply one action (4,) in [-1, 1] (clipped). Returns (success now, StepInfo)."""
        action = np.asarray(action, dtype=np.float32).reshape(-1)
        if action.shape != (4,) or not np.all(np.isfinite(action)):
            raise ValueError(
                f"action {np.asarray(action).tolist()}: expected 4 finite values {list(ACTION_NAMES)}"
            )
        if self.steps >= self.horizon:
            raise RuntimeError(f"episode reached its horizon of {self.horizon} steps: call reset() first")
        action = np.clip(action, ACTION_LOW, ACTION_HIGH)
        obs, reward, _terminated, truncated, info = self._env.step(action)
        self._obs = obs
        self._frames = None
        self.steps += 1
        success = bool(info.get("success", 0.0) >= 1.0)
        if success and self.success_step is None:
            self.success_step = self.steps
        return success, StepInfo(
            step=self.steps,
            reward=float(reward),
            truncated=bool(truncated) or self.steps >= self.horizon,
            success_step=self.success_step,
        )

    def expert_action(self) -> np.ndarray:
        """The scripted Meta-World expert's action for the current state, float32 (4,) in [-1, 1]."""
        with warnings.catch_warnings():
            # The experts' proportional controllers saturate on purpose and warn at every step.
            warnings.simplefilter("ignore", UserWarning)
            action = self._expert.get_action(self._obs)
        return np.clip(np.asarray(action, dtype=np.float32), ACTION_LOW, ACTION_HIGH)

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        if self._env is not None:
            self._env.close()
            self._env = None

    def __enter__(self) -> "MetaWorldTask":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
