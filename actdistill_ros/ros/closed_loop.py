"""Closed-loop Meta-World evaluation through ROS 2: the sim arm and the policy as two node processes.

``sim_arm_node`` and ``policy_node`` talk over real Fast DDS (loopback only, a private domain id);
this process only orchestrates: it sets the sim's ``task``/``seed`` parameters, calls its
``~/reset`` service, and reads the latched episode status, which carries the success flag and the
policy's RouterStats figures (camera-to-action latency, inference time, executed layers) of the
episode. Only standard messages are used here, so no built message package is needed in this process.

Lockstep (default): the sim steps once per policy answer to each frame, so every step runs a
fresh inference and executes the first action of its chunk (``execute_steps`` = 1, taken from the
frame's ActionChunk); results do not depend on timing. Real time: the sim steps at ``control_rate_hz`` and the policy node executes
its chunks on its own timer, as on a robot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from actdistill_ros.ros.env import REPO_ROOT, config_file, ros_environment
from actdistill_ros.ros.ros_process import BackgroundRos, NodeProcess, node_command
from actdistill_ros.sim.evaluate import check_eval_seeds
from actdistill_ros.sim.report import (EpisodeOutcome, episode_dict, eval_markdown, fmt, plot_success_per_task, pyplot,
                                       save_figure, summarise, write_json, write_text)
from actdistill_ros.sim.metaworld_env import EVAL_SEED_BASE, camera_topics, check_camera_count, parse_task_list
from actdistill_ros.weights import WeightsError, load_card

POLICY_NODE = "policy_node"
SIM_NODE = "sim_arm_node"
STARTUP_TIMEOUT_S = 180.0  # model load + first mujoco/EGL start on a busy 2-core machine
SERVICE_TIMEOUT_S = 30.0


def sim_linear_scale() -> float:
    """m/s per Meta-World action unit, as the simulated arm inverts it (config/sim_arm.yaml); the
    policy node's action.scale for x, y, z must be the same (config/sim_arm_policy.yaml)."""
    document = yaml.safe_load(config_file("sim_arm.yaml").read_text())
    (section,) = document.values()
    return float(section["ros__parameters"]["action"]["linear_scale"])


# Benchmark runs: the sim clips to [-1, 1] itself, and no speed or acceleration limit may bite, so a
# step's action is a function of its frame alone (as in the in-process loop).
UNLIMITED = {"action.max_linear_velocity": 100.0, "action.max_angular_velocity": 100.0,
             "action.max_linear_acceleration": 1000.0, "action.max_angular_acceleration": 1000.0,
             "action.max_gripper_velocity": 1000.0}


@dataclass
class RosLoopConfig:
    weights: Path
    first_task: str
    image_size: int
    horizon: int
    camera: str = "corner4"
    sync: bool = True
    control_rate_hz: float = 20.0  # the policy node's control timer (and the sim's step rate in real time)
    threshold: float | None = None  # None: the card's default threshold
    device: str = "auto"
    record_frames: bool = False
    log_dir: Path | None = None  # node stdout/stderr; a temp dir when None


@dataclass
class RosEpisode:
    outcome: EpisodeOutcome
    status: dict[str, Any]  # the sim's final episode status
    camera_to_action_ms: list[float]
    frames: list[np.ndarray] = field(default_factory=list, repr=False)


class NodeProcessError(RuntimeError):
    """A node process died or did not come up; the message ends with its last output lines."""


class RosClosedLoop:
    """Starts both nodes and runs episodes through them. Use as a context manager."""

    def __init__(self, config: RosLoopConfig):
        self.config = config
        self.card = load_card(config.weights)
        self._processes: list[NodeProcess] = []
        self._ros: BackgroundRos | None = None
        self._lock = threading.Lock()
        self._statuses: list[dict[str, Any]] = []
        self._frames: list[np.ndarray] = []
        self._recording = False
        self._policy_up = threading.Event()

    # ---------------------------------------------------------------- start / stop
    def __enter__(self) -> "RosClosedLoop":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        cfg = self.config
        log_dir = Path(cfg.log_dir) if cfg.log_dir else Path(tempfile.mkdtemp(prefix="actdistill_ros_loop_"))
        log_dir.mkdir(parents=True, exist_ok=True)
        env = ros_environment()
        env["ROS_LOG_DIR"] = str(log_dir / "ros_log")
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("MUJOCO_GL", "egl")
        self.domain_id = int(env["ROS_DOMAIN_ID"])
        linear_scale = sim_linear_scale()
        threshold = self.card.default_threshold if cfg.threshold is None else float(cfg.threshold)
        policy_params = {
            "weights_path": str(Path(cfg.weights).resolve()), "device": cfg.device,
            "router.threshold": float(threshold), "action.mode": "ee_twist",
            # An explicit threshold means threshold routing (a card's keep fraction would override it).
            **({"router.keep_fraction": 0.0} if cfg.threshold is not None else {}),
            "action.scale": [linear_scale] * 3 + [1.0], **UNLIMITED,
            "state.enabled": self.card.state_dim > 0,
            "topics.cameras": camera_topics(cfg.camera),  # what sim_arm_node publishes, one topic per camera
            # Commands leave only on the node's control timer; lockstep pairs each frame with its own
            # ActionChunk instead (sim_arm_node), and the frame's RouterStats follow at the next tick.
            "control_rate_hz": float(cfg.control_rate_hz),
        }
        sim_params = {
            "task": cfg.first_task, "horizon": int(cfg.horizon), "image_size": int(cfg.image_size),
            "camera": cfg.camera, "sync_mode": bool(cfg.sync), "control_rate_hz": float(cfg.control_rate_hz),
            "action.linear_scale": linear_scale, "episode.start_on_launch": False, "episode.auto_reset": False,
            "topics.router_stats": f"/{POLICY_NODE}/router_stats",
        }
        self.threshold = float(threshold)
        # This process joins the same private, loopback-only domain.
        os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
        os.environ.setdefault("ROS_LOG_DIR", env["ROS_LOG_DIR"])
        self._start_ros_side()
        self._processes.append(self._launch("policy_node", "actdistill_ros.ros.policy_node",
                                            ["policy.yaml", "sim_arm_policy.yaml"], policy_params, env, log_dir))
        self._processes.append(self._launch("sim_arm_node", "actdistill_ros.ros.sim_arm_node", ["sim_arm.yaml"],
                                            sim_params, env, log_dir))
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        self._wait_service(self._reset_client, "reset", deadline)
        self._wait_service(self._set_params_client, "set_parameters", deadline)
        while not self._policy_up.wait(0.2):  # its /diagnostics start once the model is loaded
            self._check_alive()
            if time.monotonic() > deadline:
                raise NodeProcessError(f"policy_node not up after {STARTUP_TIMEOUT_S:g} s")

    def _launch(self, name, module, params_files, params, env, log_dir) -> NodeProcess:
        return NodeProcess(node_command(module, params, [config_file(f) for f in params_files]),
                           log_dir / f"{name}.log", env=env, name=name, cwd=REPO_ROOT)

    def _start_ros_side(self) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from rcl_interfaces.srv import SetParameters
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image
        from std_msgs.msg import String
        from std_srvs.srv import Trigger

        self._ros = BackgroundRos("closed_loop_driver", self.domain_id)
        self._node = self._ros.node
        episode_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                                 durability=DurabilityPolicy.TRANSIENT_LOCAL)
        reliable = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)
        sensor = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
        self._node.create_subscription(String, f"/{SIM_NODE}/episode", self._on_status, episode_qos)
        self._node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, reliable)
        if self.config.record_frames:
            # Frames are recorded from the first camera, the one on the default camera topic.
            self._node.create_subscription(Image, camera_topics(self.config.camera)[0], self._on_image, sensor)
        self._reset_client = self._node.create_client(Trigger, f"/{SIM_NODE}/reset")
        self._set_params_client = self._node.create_client(SetParameters, f"/{SIM_NODE}/set_parameters")
        self._Trigger, self._SetParameters = Trigger, SetParameters

    def close(self) -> None:
        for process in reversed(self._processes):
            process.stop()
        if self._ros is not None:
            self._ros.close()
            self._ros = None

    # ---------------------------------------------------------------- callbacks (ROS thread)
    def _on_status(self, msg) -> None:
        with self._lock:
            self._statuses.append(json.loads(msg.data))

    def _on_diagnostics(self, msg) -> None:
        if any(status.name.startswith(f"{POLICY_NODE}:") for status in msg.status):
            self._policy_up.set()

    def _on_image(self, msg) -> None:
        if self._recording:
            frame = np.frombuffer(msg.data, np.uint8).reshape(msg.height, msg.width, 3).copy()
            with self._lock:
                self._frames.append(frame)

    # ---------------------------------------------------------------- service plumbing
    def _check_alive(self) -> None:
        for process in self._processes:
            if not process.alive():
                raise NodeProcessError(f"{process.name} exited with code {process.returncode}:\n"
                                       f"{process.tail()}")

    def _wait_service(self, client, name: str, deadline: float) -> None:
        while not client.wait_for_service(timeout_sec=0.5):
            self._check_alive()
            if time.monotonic() > deadline:
                raise NodeProcessError(f"{SIM_NODE} service {name} not available after {STARTUP_TIMEOUT_S:g} s")

    def _call(self, client, request, what: str):
        future = client.call_async(request)
        deadline = time.monotonic() + SERVICE_TIMEOUT_S * 4
        while not future.done():
            self._check_alive()
            if time.monotonic() > deadline:
                raise NodeProcessError(f"{what}: no answer from {SIM_NODE}")
            time.sleep(0.01)
        return future.result()

    def _set_sim_parameters(self, values: dict[str, Any]) -> None:
        from rclpy.parameter import Parameter

        request = self._SetParameters.Request(
            parameters=[Parameter(name, value=value).to_parameter_msg() for name, value in values.items()])
        for name, result in zip(values, self._call(self._set_params_client, request, "set_parameters").results):
            if not result.successful:
                raise ValueError(f"{SIM_NODE} refused {name}={values[name]!r}: {result.reason}")

    # ---------------------------------------------------------------- episodes
    def run_episode(self, task: str, seed: int, timeout_s: float | None = None) -> RosEpisode:
        """Reset the sim to (task, seed), let the policy drive it to the end, return the outcome."""
        self._set_sim_parameters({"task": task, "seed": int(seed), "horizon": int(self.config.horizon)})
        with self._lock:
            self._frames = []
        self._recording = self.config.record_frames
        response = self._call(self._reset_client, self._Trigger.Request(), "reset")
        if not response.success:
            raise NodeProcessError(f"{SIM_NODE} reset failed: {response.message}")
        episode_id = json.loads(response.message)["episode"]
        timeout_s = timeout_s or 60.0 + 2.0 * self.config.horizon
        deadline = time.monotonic() + timeout_s
        final = None
        while final is None:
            with self._lock:
                final = next((s for s in self._statuses if s["episode"] == episode_id and s["done"]), None)
            if final is None:
                self._check_alive()
                if time.monotonic() > deadline:
                    raise NodeProcessError(f"episode {task} seed {seed} did not end within {timeout_s:g} s")
                time.sleep(0.01)
        self._recording = False
        with self._lock:
            frames, self._frames = self._frames, []
        stats = final["router_stats"]
        fractions, gflops = stats["executed_fraction"], stats["backbone_gflops"]
        outcome = EpisodeOutcome(
            task=final["task"], seed=int(final["seed"]), success=bool(final["success"]), steps=int(final["steps"]),
            steps_to_success=final["success_step"], policy_calls=int(stats["inferences"]),
            predict_ms=list(stats["inference_ms"]),
            executed_fraction=float(np.mean(fractions)) if fractions else 0.0,
            backbone_gflops=float(np.mean(gflops)) if gflops else 0.0,
            full_backbone_gflops=float(stats["full_backbone_gflops"]))
        return RosEpisode(outcome, final, list(stats["camera_to_action_ms"]), frames)


# ------------------------------------------------------------------------------------------ evaluation
def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def ros_figures(episodes: list[RosEpisode]) -> dict[str, Any]:
    """Transport-level figures of a through-ROS run."""
    latency = [v for e in episodes for v in e.camera_to_action_ms]
    waits = [v for e in episodes for v in e.status["action_wait_ms"]]
    steps = sum(e.outcome.steps for e in episodes)
    stepping_s = sum(e.status["stepping_wall_s"] for e in episodes)
    return {
        "camera_to_action_ms_p50": _percentile(latency, 50), "camera_to_action_ms_p99": _percentile(latency, 99),
        "camera_to_action_ms_mean": float(np.mean(latency)) if latency else None,
        "frame_to_step_ms_p50": _percentile(waits, 50),  # lockstep: frame published -> its action applied
        "steps_per_s": round(steps / stepping_s, 2) if stepping_s > 0 else None,
        "frames_republished": int(sum(e.status["frames_republished"] for e in episodes)),
        "zero_motion_steps": int(sum(e.status["timeouts_zero_motion"] for e in episodes)),
    }


def evaluate_through_ros(
    weights: str | Path,
    tasks: str | Sequence[str],
    episodes_per_task: int = 10,
    horizon: int = 200,
    seed_base: int = EVAL_SEED_BASE,
    image_size: int | None = None,
    camera: str = "corner4",
    threshold: float | None = None,
    device: str = "auto",
    sync: bool = True,
    control_rate_hz: float = 20.0,
    out_dir: str | Path | None = None,
    progress: bool = True,
    record_frames: bool = False,
) -> tuple[dict[str, Any], list[RosEpisode]]:
    """Like ``evaluate_policy``, with the sim and the policy as ROS 2 nodes. Returns (result, episodes).

    With ``out_dir``: eval.json, eval.md, success_per_task.png, camera_to_action_ms.png and the nodes'
    logs under ros_logs/.
    """
    task_names = parse_task_list(tasks)
    if episodes_per_task < 1:
        raise ValueError(f"episodes_per_task {episodes_per_task}: expected >= 1")
    seeds = check_eval_seeds(seed_base, episodes_per_task)
    card = load_card(weights)
    check_camera_count(camera, card.num_cameras)
    image_size = int(image_size or card.image_size)
    out = Path(out_dir) if out_dir is not None else None
    config = RosLoopConfig(Path(weights), task_names[0], image_size, horizon, camera, sync, control_rate_hz,
                           threshold, device, record_frames, out / "ros_logs" if out is not None else None)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(task_names) * len(seeds), unit="ep", desc="eval through ROS", dynamic_ncols=True,
                   file=sys.stderr)
    episodes: list[RosEpisode] = []
    start = time.perf_counter()
    try:
        with RosClosedLoop(config) as loop:
            used_threshold = loop.threshold
            for name in task_names:
                for seed in seeds:
                    episodes.append(loop.run_episode(name, seed))
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(success=f"{np.mean([e.outcome.success for e in episodes]):.2f}",
                                        refresh=False)
    finally:
        if bar is not None:
            bar.close()
    wall_s = round(time.perf_counter() - start, 2)
    outcomes = [e.outcome for e in episodes]
    execute_steps: Any = 1 if sync else "policy timer"
    per_task = {n: summarise([o for o in outcomes if o.task == n], execute_steps) for n in task_names}
    overall = {**summarise(outcomes, execute_steps), "wall_s": wall_s, **ros_figures(episodes)}
    result = {
        "benchmark": "metaworld-v3", "tasks": task_names, "seeds": seeds, "horizon": horizon,
        "image_size": image_size, "camera": camera, "device": device, "chunk_size": card.chunk_size,
        "num_layers": card.num_layers, "is_student": card.is_student, "threshold": used_threshold,
        "through_ros": {"mode": "lockstep" if sync else f"real time {control_rate_hz:g} Hz",
                        "middleware": "Fast DDS, loopback"},
        "overall": overall, "per_task": per_task,
        "episodes": [{**episode_dict(e.outcome), "camera_to_action_ms_p50": _percentile(e.camera_to_action_ms, 50)}
                     for e in episodes],
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "eval.json", result)
        write_text(out / "eval.md", ros_eval_markdown(result))
        plot_success_per_task(result, out / "success_per_task.png")
        plot_latency(episodes, out / "camera_to_action_ms.png")
    return result, episodes


def ros_eval_markdown(result: dict[str, Any]) -> str:
    o = result["overall"]
    return eval_markdown(result) + "\n".join([
        "",
        f"Through ROS 2 ({result['through_ros']['mode']}, {result['through_ros']['middleware']}): "
        f"sim_arm_node and policy_node as separate processes; predict ms = the node's inference time.",
        "",
        "| camera-to-action ms p50 / p99 | frame-to-step ms p50 | sim steps/s | frames re-sent | wall s |",
        "|---|---|---|---|---|",
        f"| {fmt(o['camera_to_action_ms_p50'], '.1f')} / {fmt(o['camera_to_action_ms_p99'], '.1f')} "
        f"| {fmt(o['frame_to_step_ms_p50'], '.1f')} | {fmt(o['steps_per_s'], '.1f')} "
        f"| {o['frames_republished']} | {o['wall_s']:.1f} |",
        "",
    ])


def plot_latency(episodes: list[RosEpisode], path: str | Path) -> None:
    """Histogram of camera-to-action latency (RouterStats) over all inferences."""
    plt = pyplot()
    latency = np.array([v for e in episodes for v in e.camera_to_action_ms])
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    if latency.size:
        ax.hist(latency, bins=40, color="tab:blue")
        for q, style in ((50, "--"), (99, ":")):
            value = np.percentile(latency, q)
            ax.axvline(value, color="k", ls=style, lw=1, label=f"p{q} {value:.1f} ms")
        ax.legend(loc="upper right")
    ax.set_xlabel("camera-to-action latency (ms)")
    ax.set_ylabel("inferences")
    ax.set_title(f"Camera frame received -> first action published ({latency.size} inferences)")
    fig.tight_layout()
    save_figure(fig, Path(path))
    plt.close(fig)


# ------------------------------------------------------------------------------------------ CLI
def run_eval_sim(args: argparse.Namespace) -> int:
    """`actdistill eval-sim --through-ros` (the CLI hands the flag here; eval-sim's parser is in
    sim.evaluate): the same episodes and report, with sim_arm_node + policy_node over DDS."""
    if (args.sweep_threshold is not None or args.sweep_keep is not None or args.gif or args.execute_steps is not None
            or args.dtype != "float32"):
        print("actdistill eval-sim: --through-ros runs one threshold in float32 without GIFs; --sweep-threshold, "
              "--sweep-keep, --gif, --execute-steps and --dtype are in-process options", file=sys.stderr)
        return 2
    if args.realtime_hz is not None and not 0.1 <= args.realtime_hz <= 1000.0:
        print(f"actdistill eval-sim: --realtime-hz {args.realtime_hz}: expected 0.1..1000", file=sys.stderr)
        return 2
    try:
        result, _ = evaluate_through_ros(
            args.policy, args.tasks, episodes_per_task=args.episodes, horizon=args.horizon, seed_base=args.seed_base,
            image_size=args.image_size, camera=args.camera, threshold=args.threshold, device=args.device,
            sync=args.realtime_hz is None, control_rate_hz=args.realtime_hz or 20.0, out_dir=args.out)
    except (WeightsError, ValueError, NodeProcessError) as err:
        print(f"actdistill eval-sim: {err}", file=sys.stderr)
        return 2
    print(ros_eval_markdown(result))
    print(f"wrote {Path(args.out) / 'eval.json'}")
    return 0
