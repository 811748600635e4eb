"""Collect scripted-expert demonstrations on Meta-World, one rosbag2 per successful episode.

Seeds count up from ``seed_base`` per task; a seed whose episode fails is skipped and the next one
tried, so a task's bags are always the first N successful seeds (whatever the worker scheduling).
Existing bags are kept, which makes an interrupted collection resumable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import multiprocessing as mp

import numpy as np

from .metaworld_env import (
    ACTION_HIGH,
    ACTION_LOW,
    ACTION_NAMES,
    COLLECTION_SEED_BASE,
    EVAL_SEED_BASE,
    STATE_NAMES,
    MetaWorldTask,
    camera_topics,
    instruction_for,
    parse_task_list,
)

COLLECTION_FILE = "collection.json"
STORAGES = ("mcap", "sqlite3")
# Settings that must match for bags of a resumed collection to be mixed with new ones.
_RESUME_KEYS = ("image_size", "camera", "horizon", "action_noise", "storage", "image_format", "seed_base",
                "hold_steps", "start_jitter_m")
# rgb8 keeps frames exact (~2 MB per 96 px episode); png is lossless and smaller; jpeg is lossy.
IMAGE_FORMATS = ("rgb8", "png", "jpeg")


def bag_name(task: str, seed: int) -> str:
    return f"{task}_s{seed:05d}"


@dataclass(frozen=True)
class EpisodeSpec:
    task: str
    seed: int
    image_size: int
    camera: str
    horizon: int
    action_noise: float
    storage: str
    bag_path: str
    image_format: str = "rgb8"
    hold_steps: int = 0  # expert steps recorded after the first success (within the horizon)
    start_jitter_m: float = 0.0  # the hand starts up to this far from its default, per axis (metres)


@dataclass
class EpisodeResult:
    task: str
    seed: int
    success: bool
    steps: int
    wall_s: float
    skipped: bool = False  # the bag already existed
    fps: float | None = None  # the simulator's control rate (None for skipped bags)


def _noise_rng(task: str, seed: int) -> np.random.Generator:
    # Python's hash() is salted per process; crc32 keeps the noise identical in every worker.
    return np.random.default_rng([seed, zlib.crc32(task.encode())])


_worker_tasks: dict[tuple, MetaWorldTask] = {}


def _worker_init() -> None:
    os.environ["MUJOCO_GL"] = os.environ.get("MUJOCO_GL", "egl") or "egl"
    # Workers share the CPU with each other: one llvmpipe thread each avoids oversubscription.
    os.environ.setdefault("LP_NUM_THREADS", "1")


def run_episode(spec: EpisodeSpec) -> EpisodeResult:
    """Run the expert for one seed; write the bag only if the episode succeeds."""
    from actdistill_ros.data.bag_writer import write_episode_bag
    from actdistill_ros.data.config import TopicConfig

    start = time.perf_counter()
    key = (spec.task, spec.image_size, spec.camera, spec.horizon)
    task = _worker_tasks.get(key)
    if task is None:
        task = _worker_tasks[key] = MetaWorldTask(
            spec.task, image_size=spec.image_size, camera=spec.camera, horizon=spec.horizon, seed=spec.seed
        )
    rng = _noise_rng(spec.task, spec.seed)
    # Drawn first, and only with a jitter, so that episodes without one keep their noise sequence.
    offset = rng.uniform(-spec.start_jitter_m, spec.start_jitter_m, 3) if spec.start_jitter_m > 0 else None
    task.reset(spec.seed, hand_offset=offset)
    per_camera, states, actions = [[] for _ in range(task.num_cameras)], [], []
    success_at: int | None = None
    for _ in range(spec.horizon):
        frames, state = task.observe()
        action = task.expert_action()
        executed = action
        if spec.action_noise > 0:
            executed = np.clip(action + rng.normal(0.0, spec.action_noise, action.shape), ACTION_LOW, ACTION_HIGH)
        # The bag records the expert's clean action, not the noisy executed one: the noise only
        # widens the visited states, and the label for each state should be the expert's intent
        # (the correction back towards the expert's path), not a random perturbation.
        for images, frame in zip(per_camera, frames):
            images.append(frame)
        states.append(state)
        actions.append(action)
        success_now, _info = task.step(executed)
        if success_now and success_at is None:
            success_at = len(actions)
        # After the first success the expert goes on for hold_steps: a policy then learns to stay
        # at the goal, not only to arrive (the demos would otherwise end where it should settle).
        if success_at is not None and len(actions) >= success_at + spec.hold_steps:
            break
    success = success_at is not None
    if success:
        write_episode_bag(
            spec.bag_path,
            images=np.stack(per_camera[0]) if task.num_cameras == 1 else [np.stack(images) for images in per_camera],
            topics=TopicConfig(cameras=camera_topics(spec.camera)),
            instruction=task.instruction,
            states=np.stack(states),
            actions=np.stack(actions),
            fps=1.0 / task.control_period_s,
            storage=spec.storage,
            image_format=spec.image_format,
            state_names=STATE_NAMES,
            action_names=ACTION_NAMES,
        )
    return EpisodeResult(spec.task, spec.seed, success, len(actions), time.perf_counter() - start,
                         fps=1.0 / task.control_period_s)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class _Record:
    """collection.json, rewritten atomically after every episode so a killed run keeps its log."""

    def __init__(self, out_dir: Path, settings: dict[str, Any], tasks: list[str], episodes_per_task: int):
        self.path = out_dir / COLLECTION_FILE
        previous: dict[str, Any] = {}
        if self.path.exists():
            try:
                previous = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"{self.path}: unreadable collection record ({err}); remove it to start over") from None
            for key in _RESUME_KEYS:
                if key in previous and previous[key] != settings[key]:
                    raise ValueError(
                        f"{out_dir}: holds a collection with {key}={previous[key]!r}, this run asks for "
                        f"{settings[key]!r}; use another --out or the same settings"
                    )
        self.episodes: dict[str, dict[str, Any]] = dict(previous.get("episodes", {}))
        self.data = {
            **settings,
            "fps": previous.get("fps"),  # control rate, filled in by the first episode run
            "tasks": tasks,
            "instructions": {t: instruction_for(t) for t in tasks},
            "episodes_per_task": episodes_per_task,
        }

    def add(self, result: EpisodeResult) -> None:
        entry = {"task": result.task, "seed": result.seed, "success": result.success, "steps": result.steps}
        self.episodes[bag_name(result.task, result.seed)] = entry

    def write(self, per_task: dict[str, Any], complete: bool, wall_s: float) -> dict[str, Any]:
        self.data.update(per_task=per_task, complete=complete, wall_s=round(wall_s, 2))
        self.data["episodes"] = dict(sorted(self.episodes.items()))
        _write_json_atomic(self.path, self.data)
        return self.data


class _TaskProgress:
    """Hands out seeds in order while successes + in-flight episodes < the target."""

    def __init__(self, task: str, target: int, seed_base: int, max_attempts: int):
        self.task, self.target = task, target
        self.next_seed, self.seed_end = seed_base, seed_base + max_attempts
        self.in_flight = 0
        self.success_seeds: list[int] = []
        self.failed_seeds: list[int] = []
        self.steps: list[int] = []
        self.skipped = 0

    def wants_more(self) -> bool:
        return len(self.success_seeds) + self.in_flight < self.target and self.next_seed < self.seed_end

    def summary(self) -> dict[str, Any]:
        return {
            "successes": len(self.success_seeds),
            "attempts": len(self.success_seeds) + len(self.failed_seeds),
            "reused_bags": self.skipped,
            "seeds": sorted(self.success_seeds),
            "failed_seeds": sorted(self.failed_seeds),
            "frames": int(sum(self.steps)),
            "median_steps": float(np.median(self.steps)) if self.steps else None,
        }


def collect(
    tasks: str | list[str],
    episodes_per_task: int,
    out_dir: str | Path,
    image_size: int = 96,
    horizon: int = 200,
    action_noise: float = 0.1,
    seed_base: int = COLLECTION_SEED_BASE,
    workers: int = 2,
    storage: str = "mcap",
    camera: str = "corner4",
    max_attempts_per_task: int | None = None,
    image_format: str = "rgb8",
    hold_steps: int = 0,
    start_jitter_m: float = 0.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Collect ``episodes_per_task`` successful expert episodes per task into ``out_dir``.

    ``start_jitter_m``: each episode's hand starts at an offset drawn uniformly from +-this many metres
    per axis (within the hand's workspace) instead of at the task's fixed start. From a fixed start the
    hand's position along the expert's path already says where the goal is, and a policy cloned from
    such demos reads the goal from the hand, not from the image (docs/BENCHMARKS.md, issue 22).

    Returns the collection record (also written to ``out_dir/collection.json``).
    """
    task_names = parse_task_list(tasks)
    if not isinstance(episodes_per_task, int) or episodes_per_task < 1:
        raise ValueError(f"episodes_per_task {episodes_per_task!r}: expected a positive integer")
    if storage not in STORAGES:
        raise ValueError(f"storage {storage!r}: expected one of {list(STORAGES)}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format {image_format!r}: expected one of {list(IMAGE_FORMATS)}")
    if not (np.isfinite(action_noise) and action_noise >= 0):
        raise ValueError(f"action_noise {action_noise!r}: expected a finite value >= 0")
    if max_attempts_per_task is None:
        max_attempts_per_task = max(2 * episodes_per_task, episodes_per_task + 10)
    if max_attempts_per_task < episodes_per_task:
        raise ValueError(f"max_attempts_per_task {max_attempts_per_task}: expected >= episodes_per_task")
    if seed_base < 0:
        raise ValueError(f"seed_base {seed_base}: expected >= 0")
    if isinstance(hold_steps, bool) or not isinstance(hold_steps, int) or hold_steps < 0:
        raise ValueError(f"hold_steps {hold_steps!r}: expected an integer >= 0")
    if not (np.isfinite(start_jitter_m) and 0 <= start_jitter_m <= 0.3):
        raise ValueError(f"start_jitter_m {start_jitter_m!r}: expected metres in [0, 0.3]")
    topics = camera_topics(camera)  # checks the camera list before any worker starts
    # Demonstration placements must never be evaluation placements.
    if seed_base + max_attempts_per_task > EVAL_SEED_BASE:
        raise ValueError(f"collection seeds {seed_base}..{seed_base + max_attempts_per_task - 1} reach the "
                         f"evaluation range (>= {EVAL_SEED_BASE})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    settings = {
        "format": 1,
        "image_size": int(image_size),
        "camera": camera,
        "camera_topics": topics,
        "horizon": int(horizon),
        "action_noise": float(action_noise),
        "seed_base": int(seed_base),
        "hold_steps": int(hold_steps),
        "start_jitter_m": float(start_jitter_m),
        "storage": storage,
        "image_format": image_format,
        "max_attempts_per_task": int(max_attempts_per_task),
        "state_names": list(STATE_NAMES),
        "action_names": list(ACTION_NAMES),
        "action_low": ACTION_LOW,
        "action_high": ACTION_HIGH,
    }
    record = _Record(out_dir, settings, task_names, episodes_per_task)

    progress_by_task = {t: _TaskProgress(t, episodes_per_task, seed_base, max_attempts_per_task) for t in task_names}

    def next_specs():
        """Round-robin over tasks so the workers stay busy; existing bags are consumed inline."""
        while True:
            issued = False
            for state in progress_by_task.values():
                while state.wants_more():
                    seed = state.next_seed
                    state.next_seed += 1
                    path = out_dir / bag_name(state.task, seed)
                    if path.exists():
                        known = record.episodes.get(path.name, {})
                        yield EpisodeResult(state.task, seed, True, int(known.get("steps", 0)), 0.0, skipped=True)
                        continue
                    state.in_flight += 1
                    yield EpisodeSpec(state.task, seed, int(image_size), camera, int(horizon),
                                      float(action_noise), storage, str(path), image_format, int(hold_steps),
                                      float(start_jitter_m))
                    issued = True
                    break
            if not issued:
                return

    total = episodes_per_task * len(task_names)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="ep", desc="collect", dynamic_ncols=True, file=sys.stderr)
    start = time.perf_counter()

    def finish(result: EpisodeResult) -> None:
        state = progress_by_task[result.task]
        if not result.skipped:
            state.in_flight -= 1
        (state.success_seeds if result.success else state.failed_seeds).append(result.seed)
        if result.success and result.steps:
            state.steps.append(result.steps)
        state.skipped += int(result.skipped)
        record.add(result)
        if result.fps is not None:
            record.data["fps"] = result.fps
        if bar is not None and result.success:
            bar.update(1)
        if bar is not None:
            failed = sum(len(s.failed_seeds) for s in progress_by_task.values())
            bar.set_postfix(failed=failed, refresh=False)
        if not result.skipped:
            record.write({t: s.summary() for t, s in progress_by_task.items()}, False, time.perf_counter() - start)

    try:
        if workers <= 1:
            while True:
                # Specs come one at a time: a failure must be seen before the next seed is chosen.
                item = next(next_specs(), None)
                if item is None:
                    break
                finish(item if isinstance(item, EpisodeResult) else run_episode(item))
        else:
            context = mp.get_context("spawn")  # fork would copy a live GL context
            with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init) as pool:
                pending = set()
                try:
                    while True:
                        for item in next_specs():
                            if isinstance(item, EpisodeResult):
                                finish(item)
                            else:
                                pending.add(pool.submit(run_episode, item))
                            if len(pending) >= 2 * workers:
                                break
                        if not pending:
                            break
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for future in done:
                            finish(future.result())
                except BaseException:
                    for future in pending:
                        future.cancel()
                    raise
    finally:
        if bar is not None:
            bar.close()
        for task in _worker_tasks.values():
            task.close()
        _worker_tasks.clear()

    per_task = {t: s.summary() for t, s in progress_by_task.items()}
    complete = all(s["successes"] >= episodes_per_task for s in per_task.values())
    data = record.write(per_task, complete, time.perf_counter() - start)
    for t, s in per_task.items():
        if s["successes"] < episodes_per_task:
            print(f"warning: {t}: only {s['successes']}/{episodes_per_task} successful episodes in "
                  f"{s['attempts']} attempts (max_attempts_per_task={max_attempts_per_task})", file=sys.stderr)
    return data


# ---------------------------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "collect",
        help="record scripted-expert Meta-World demos as rosbag2 episodes",
        description="Run Meta-World's scripted experts and keep successful episodes as one rosbag2 "
        "per episode (camera, instruction, state, action). Resumable: existing bags are kept.",
    )
    parser.add_argument("--tasks", default="mt10", help="comma-separated tasks or 'mt10' (default: mt10)")
    parser.add_argument("--episodes", type=int, default=50, help="successful episodes per task (default: 50)")
    parser.add_argument("--out", required=True, help="output directory for the bags and collection.json")
    parser.add_argument("--image-size", type=int, default=96, help="square image size in px (default: 96)")
    parser.add_argument("--horizon", type=int, default=200, help="max steps per episode (default: 200)")
    parser.add_argument("--noise", type=float, default=0.1,
                        help="std of Gaussian noise added to executed actions; bags record the clean action (default: 0.1)")
    parser.add_argument("--workers", type=int, default=2, help="parallel simulator processes (default: 2)")
    parser.add_argument("--storage", choices=STORAGES, default="mcap", help="rosbag2 storage (default: mcap)")
    parser.add_argument("--image-format", choices=IMAGE_FORMATS, default="rgb8",
                        help="camera encoding in the bags: rgb8 (raw), png (lossless, smaller), jpeg (default: rgb8)")
    parser.add_argument("--camera", default="corner4",
                        help="Meta-World camera, or several separated by commas, e.g. corner4,topview: the first "
                             "is recorded on /camera/image_raw, each further one on /camera_<name>/image_raw "
                             "(default: corner4)")
    parser.add_argument("--hold-steps", type=int, default=0,
                        help="expert steps still recorded after the first success, within --horizon: demos that "
                             "show staying at the goal, not only arriving (default: 0)")
    parser.add_argument("--start-jitter", type=float, default=0.0, metavar="METRES",
                        help="start each episode's hand up to this far from the task's fixed start, per axis, in "
                             "metres (within the workspace; unrecorded): demos from which the goal must be read "
                             "from the image, not from where the hand is on the expert's path (default: 0)")
    parser.add_argument("--seed-base", type=int, default=COLLECTION_SEED_BASE, help="first seed per task (default: 0)")
    parser.add_argument("--max-attempts", type=int, default=None,
                        help="episodes tried per task before giving up (default: max(2N, N+10))")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        data = collect(
            args.tasks, args.episodes, args.out, image_size=args.image_size, horizon=args.horizon,
            action_noise=args.noise, seed_base=args.seed_base, workers=args.workers, storage=args.storage,
            camera=args.camera, max_attempts_per_task=args.max_attempts, image_format=args.image_format,
            hold_steps=args.hold_steps, start_jitter_m=args.start_jitter,
        )
    except ValueError as err:
        print(f"actdistill collect: {err}", file=sys.stderr)
        return 2
    for task, summary in data["per_task"].items():
        print(f"{task:22s} {summary['successes']:4d} ok / {summary['attempts']:4d} attempts  "
              f"{summary['frames']:6d} frames")
    print(f"wrote {Path(args.out) / COLLECTION_FILE} ({data['wall_s']:.1f} s)")
    return 0 if data["complete"] else 1
