"""`actdistill bench-node`: the policy node under a 640x480 camera, each side in its own process.

Processes: the policy node (config/policy.yaml, ee_twist, control rate = camera rate unless
``--control-rate``); a helper that publishes rgb8 frames at ``--rate`` (Fast DDS large-image
profile), a latched command and the robot state, and records what the node publishes (RouterStats,
/action, /diagnostics); and this one, which starts both, samples the node's RSS, prints progress and
reports. ``--stress N`` starts N busy processes beside the node once it answers (CPU starvation).

Reported (JSON):
- ``node_latency_ms``: camera message received -> first action of its chunk published (node clock);
- ``inference_ms``: the policy call alone; ``overhead_ms`` = node latency - inference, per frame;
- ``end_to_end_ms``: camera message published -> its RouterStats received here (adds transport of
  the frame and of the stats message);
- ``control``: commands per second on /action, the interval between consecutive motion commands
  (p50/p99/max) and its deviation from the control period (jitter), hold episodes (an explicit
  stop after motion) and the fraction of the window spent holding;
- ``node_rss_mb``: the node's resident memory (VmRSS) at the start and end of the window, and its peak.
Target: overhead p50 <= 10% of the student's inference p50.

The helper writes its result to a file before it tears ROS down; a helper that exits non-zero after
writing a complete result costs a warning, never the result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from actdistill_ros.ros.env import REPO_ROOT, config_file, ros_environment
from actdistill_ros.ros.launch_arguments import card_dry_run_action_scale
from actdistill_ros.ros.ros_process import NodeProcess, node_command, rss_bytes

POLICY_YAML = config_file("policy.yaml")
NODE_NAME = "policy_node"
START_TIMEOUT_S = 120.0  # node start-up (model load) until its first RouterStats
INSTRUCTION = "push the puck to the goal"
HELPER_COMMAND = [sys.executable, "-m", "actdistill_ros.ros.bench_node"]  # + the helper's arguments
NODE_COUNTERS = ("chunks_started", "chunks_superseded", "chunks_dropped_stale", "chunks_dropped_holding",
                 "commands_sent", "stops_sent")  # /diagnostics values of the policy node


class BenchError(RuntimeError):
    """The run produced no result; the message is one line, the logs' tails follow it."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench-node", help="policy node: camera-to-action latency, overhead over inference, "
                                                  "control-rate jitter (optionally under CPU stress)")
    add_rig_arguments(p, duration=20.0)
    p.add_argument("--stress", type=int, default=0, metavar="N",
                   help="start N busy processes beside the node for the run (CPU starvation)")
    p.add_argument("--json", type=Path, help="also write the result to this file")
    p.set_defaults(func=run)


def add_rig_arguments(p: argparse.ArgumentParser, duration: float) -> None:
    """Arguments of the node + camera rig (shared with `actdistill soak`)."""
    p.add_argument("--weights", type=Path, help="weights directory (default: untrained --size student)")
    p.add_argument("--size", default="bench", choices=["tiny", "bench", "default"])
    p.add_argument("--keep", type=float, default=0.5, help="layer fraction an untrained router keeps")
    p.add_argument("--device", default="auto")
    p.add_argument("--threshold", type=float, help="router threshold (default: the card's)")
    p.add_argument("--duration", type=float, default=duration, help="measured seconds (after --warmup)")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--rate", type=float, default=30.0, help="camera rate (Hz)")
    p.add_argument("--control-rate", type=float, help="node control_rate_hz (default: the camera rate)")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)


# ============================================================================ this process
@dataclass
class RigRun:
    """What one run of the rig produced: the helper's recordings plus the node's RSS samples."""

    recording: dict[str, Any]  # the helper's result file (see _helper) plus the run's settings
    rss: list[tuple[float, float]]  # (system time s, node VmRSS in MB)
    warnings: list[str] = field(default_factory=list)


def run_rig(args: argparse.Namespace, work_dir: Path, *, label: str, progress_period_s: float,
            rss_period_s: float = 2.0, stress: int = 0) -> RigRun:
    """Start the node and the camera helper, sample the node's RSS until the helper is done.

    Raises BenchError (one line) when there is no result; the node's and helper's output are in
    ``work_dir`` (node.log, helper.log).
    """
    weights = args.weights
    if weights is None:
        from actdistill_ros.policy import create_untrained_policy
        weights = create_untrained_policy(work_dir / "weights", size=args.size, student=True, keep=args.keep)
    # config/policy.yaml leaves router.threshold unset (= the card's); pass it explicitly so the
    # measured threshold never depends on what a params file says.
    from actdistill_ros.weights import read_card, resolve_weights_path
    threshold = (float(args.threshold) if args.threshold is not None
                 else float(read_card(resolve_weights_path(weights)[1]).default_threshold))
    control_rate = float(args.control_rate or args.rate)
    env = ros_environment()  # loopback, own domain, built messages, Fast DDS large-image profile
    env["ROS_LOG_DIR"] = str(work_dir / "ros_log")
    result_path = work_dir / "helper_result.json"
    helper_cmd = [*HELPER_COMMAND, "--result", str(result_path),
                  "--duration", str(args.duration), "--warmup", str(args.warmup), "--rate", str(args.rate),
                  "--width", str(args.width), "--height", str(args.height),
                  "--progress-period", str(progress_period_s), "--start-timeout", str(START_TIMEOUT_S)]
    node = NodeProcess(node_command("actdistill_ros.ros.policy_node", {
        "weights_path": str(weights), "device": args.device, "control_rate_hz": control_rate,
        "router.threshold": threshold, "enable_output": True, **card_dry_run_action_scale(weights),
        # A threshold given on the command line means threshold routing (a keep fraction overrides it).
        **({"router.keep_fraction": 0.0} if args.threshold is not None else {})}, POLICY_YAML), work_dir / "node.log", env=env, cwd=REPO_ROOT, name=NODE_NAME)
    rss: list[tuple[float, float]] = []
    warnings: list[str] = []
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(_stop_node, node, warnings)
        helper_log = cleanup.enter_context((work_dir / "helper.log").open("wb"))
        helper = subprocess.Popen(helper_cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=helper_log)
        cleanup.callback(_kill, helper)
        events = _line_events(helper.stdout)
        stress_processes = cleanup.enter_context(_BusyProcesses())
        progress = _Progress(label, args.duration, args.warmup, rss)
        deadline = time.monotonic() + START_TIMEOUT_S + args.warmup + args.duration + 120.0
        next_sample = time.monotonic()
        while helper.poll() is None:
            now = time.monotonic()
            if now >= next_sample:
                value = rss_bytes(node.proc.pid)
                if value is not None:
                    rss.append((time.time(), value / 1e6))
                next_sample = max(next_sample + rss_period_s, now)
            for event in _drain(events):
                if event.get("event") == "ready" and stress:
                    stress_processes.start(stress)
                progress.on_event(event)
            if not node.alive():
                raise BenchError(f"the policy node exited during the run: {node.failure()}")
            if now > deadline:
                raise BenchError("the camera helper did not finish in time")
            progress.tick()
            time.sleep(0.1)
        for event in _drain(events):
            progress.on_event(event)
        recording = _read_result(result_path)
        if recording is None:
            raise BenchError(f"the camera helper exited with code {helper.returncode} before writing its result: "
                             f"{_last_line(work_dir / 'helper.log')}")
        if helper.returncode != 0:
            warnings.append(f"the camera helper exited with code {helper.returncode} after writing its complete "
                            f"result (teardown); result kept")
    for line in warnings:
        print(f"{label}: warning: {line}", file=sys.stderr)
    recording.update({"model": args.size if args.weights is None else str(args.weights),
                      "device_requested": args.device, "threshold_requested": threshold,
                      "control_rate_hz": control_rate, "stress_processes": stress})
    return RigRun(recording, rss, warnings)


def _stop_node(node: NodeProcess, warnings: list[str]) -> None:
    code = node.stop(timeout=15.0)
    if code not in (0, None):
        warnings.append(f"the policy node exited with code {code} when stopped")


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


def _line_events(stream) -> "queue.Queue[dict]":
    """JSON lines of ``stream`` as dicts in a queue (a reader thread; other lines are skipped)."""
    events: queue.Queue[dict] = queue.Queue()

    def read() -> None:
        for raw in stream:
            with contextlib.suppress(ValueError):
                event = json.loads(raw)
                if isinstance(event, dict):
                    events.put(event)

    threading.Thread(target=read, name="helper_events", daemon=True).start()
    return events


def _drain(events: "queue.Queue[dict]") -> Iterator[dict]:
    while True:
        try:
            yield events.get_nowait()
        except queue.Empty:
            return


def _read_result(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


class _BusyProcesses:
    """N single-core busy loops, killed on exit (``python -S``: no site, so no ROS bootstrap re-exec)."""

    def __init__(self):
        self.processes: list[subprocess.Popen] = []

    def start(self, count: int) -> None:
        if not self.processes:
            self.processes = [subprocess.Popen([sys.executable, "-S", "-c", "while True: pass"])
                              for _ in range(count)]

    def __enter__(self) -> "_BusyProcesses":
        return self

    def __exit__(self, *exc) -> None:
        for process in self.processes:
            _kill(process)


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


class _Progress:
    """Progress lines (stderr): while the node starts, then one per helper progress event with
    elapsed / duration, ETA, node RSS (and its change since the window started), recent latency, holds."""

    def __init__(self, label: str, duration_s: float, warmup_s: float, rss: list[tuple[float, float]]):
        self.label, self.duration_s, self.warmup_s, self.rss = label, duration_s, warmup_s, rss
        self.started = time.monotonic()
        self.measure_from: float | None = None  # system time
        self._next_wait_line = self.started + 10.0

    def _print(self, text: str) -> None:
        print(f"{self.label}: {text}", file=sys.stderr, flush=True)

    def _rss_now(self) -> float:
        return self.rss[-1][1] if self.rss else float("nan")

    def tick(self) -> None:
        if self.measure_from is None and time.monotonic() >= self._next_wait_line:
            self._next_wait_line += 10.0
            self._print(f"waiting for the node's first RouterStats ({time.monotonic() - self.started:.0f} s; "
                        f"model loading), node RSS {self._rss_now():.1f} MB")

    def on_event(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "ready":
            self._print(f"node answering after {time.monotonic() - self.started:.1f} s; warm-up {self.warmup_s:g} s")
        elif kind == "measuring":
            self.measure_from = float(event["from"])
        elif kind == "progress" and self.measure_from is not None:
            elapsed = min(self.duration_s, time.time() - self.measure_from)
            at_start = next((mb for t, mb in self.rss if t >= self.measure_from), self._rss_now())
            self._print(
                f"{_clock(elapsed)} / {_clock(self.duration_s)} ({100 * elapsed / self.duration_s:.0f}%), "
                f"ETA {_clock(self.duration_s - elapsed)} | node RSS {self._rss_now():.1f} MB "
                f"({self._rss_now() - at_start:+.1f} since the window started) | camera->action p50 "
                f"{event['latency_ms_p50']:.1f} ms p99 {event['latency_ms_p99']:.1f} ms over the last "
                f"{event['period_s']:.0f} s ({event['inferences']} inferences) | hold episodes {event['holds']}")


# ---------------------------------------------------------------------------- analysis (shared with soak)
def percentiles(values) -> dict[str, float]:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return {"p50": float("nan"), "p99": float("nan"), "n": 0}
    return {"p50": round(float(np.percentile(values, 50)), 3), "p99": round(float(np.percentile(values, 99)), 3),
            "n": int(values.size)}


def control_summary(commands: list[list[float]], control_rate_hz: float, window_s: float) -> dict[str, Any]:
    """Rate, jitter and holds from /action commands ``[[t_s, moving], ...]`` (t: header stamp).

    Jitter is measured between consecutive motion commands (a node may send one stop per hold, so
    intervals that span a hold say nothing about the timer). A hold episode is a stop command after
    motion; its time runs until the next motion command (or the end of the window).
    """
    period_ms = 1000.0 / control_rate_hz
    t = np.array([c[0] for c in commands], dtype=np.float64)
    moving = np.array([bool(c[1]) for c in commands])
    both_moving = moving[1:] & moving[:-1] if t.size > 1 else np.zeros(0, bool)
    intervals_ms = np.diff(t)[both_moving] * 1000.0 if t.size > 1 else np.zeros(0)
    holds, hold_time, hold_start = 0, 0.0, None
    for i in range(t.size):
        if not moving[i] and hold_start is None:
            hold_start = t[i]
            holds += int(i > 0 and moving[i - 1])
        elif moving[i] and hold_start is not None:
            hold_time += t[i] - hold_start
            hold_start = None
    if hold_start is not None:
        hold_time += window_s - hold_start
    interval = percentiles(intervals_ms)
    return {
        "control_rate_hz": control_rate_hz,
        "commands_per_s": round(t.size / window_s, 3) if window_s > 0 else float("nan"),
        "motion_interval_ms": {**interval, "max": round(float(intervals_ms.max()), 3) if intervals_ms.size else None},
        "jitter_ms": percentiles(np.abs(intervals_ms - period_ms)),
        "hold_episodes": holds,
        "stop_commands": int((~moving).sum()),
        "hold_time_fraction": round(hold_time / window_s, 4) if window_s > 0 else float("nan"),
    }


def rss_in_window(rss: list[tuple[float, float]], window: tuple[float, float]) -> list[tuple[float, float]]:
    """RSS samples as (seconds since the window start, MB) within the window."""
    return [(t - window[0], mb) for t, mb in rss if window[0] <= t <= window[1]]


def summarize(run: RigRun) -> dict[str, Any]:
    """The bench-node report of one rig run."""
    rec = run.recording
    window_s = rec["window"][1] - rec["window"][0]
    rows = np.array(rec["inferences"], dtype=np.float64).reshape(-1, 5)
    node_latency, inference, end_to_end = rows[:, 1], rows[:, 2], rows[:, 3]
    acted = np.isfinite(node_latency)
    overhead = node_latency[acted] - inference[acted]
    diag = rec["diagnostics"]
    inference_p50 = percentiles(inference[acted])["p50"]
    overhead_p50 = percentiles(overhead)["p50"]
    rss = rss_in_window(run.rss, tuple(rec["window"]))
    return {
        "camera": rec["camera"], "frames_published": rec["frames_published"], "inferences_measured": len(rows),
        # chunks whose first step never went out (superseded before a control tick, or dropped while holding)
        "chunks_not_executed": int((~acted).sum()),
        "node_latency_ms": percentiles(node_latency), "inference_ms": percentiles(inference[acted]),
        "overhead_ms": percentiles(overhead),
        "overhead_fraction_of_inference_p50": round(overhead_p50 / inference_p50, 4) if inference_p50 else None,
        "target_overhead_le_10pct": bool(overhead_p50 <= 0.1 * inference_p50),
        # Waiting for the worker to finish the previous frame is camera sampling, not processing:
        # with inference slower than the frame period the newest frame is ~half a period old when
        # picked up. Approximate (difference of medians) processing overhead without it:
        "overhead_excluding_frame_wait_ms_p50_approx": round(
            overhead_p50 - float(diag.get("frame_wait_ms_p50", "nan")), 3),
        "end_to_end_ms": percentiles(end_to_end),
        # Where the overhead goes (node diagnostics, p50): middleware receipt -> image callback,
        # callback -> inference start (worker still busy with the previous frame), inference end
        # -> action published.
        "node_executor_delay_ms_p50": float(diag.get("executor_delay_ms_p50", "nan")),
        "node_frame_wait_ms_p50": float(diag.get("frame_wait_ms_p50", "nan")),
        "node_after_inference_ms_p50": float(diag.get("after_inference_ms_p50", "nan")),
        "node_frames_received": int(diag.get("frames_received", "0")),
        "node_frames_dropped_newer_frame_arrived": int(diag.get("frames_dropped", "0")),
        # The node's chunk accounting since it started (what became of each chunk, stops it sent).
        "node_chunk_counts": {key: int(diag[key]) for key in NODE_COUNTERS if key in diag},
        "executed_fraction": float(rows[-1, 4]) if len(rows) else None,
        "threshold": rec.get("threshold"),
        "device": diag.get("device"),
        "control": control_summary(rec["commands"], rec["control_rate_hz"], window_s),
        "node_rss_mb": {"start": round(rss[0][1], 1) if rss else None, "end": round(rss[-1][1], 1) if rss else None,
                        "peak": round(max(mb for _, mb in rss), 1) if rss else None},
        "stress_processes": rec["stress_processes"],
        "model": rec["model"], "device_requested": rec["device_requested"],
        "threshold_requested": rec["threshold_requested"],
        "warnings": run.warnings,
    }


def report_failure(label: str, err: BenchError, work_dir: Path) -> int:
    """One error line, then the tails of the node's and the helper's output; exit code 1."""
    print(f"actdistill {label}: error: {err}", file=sys.stderr)
    for name in ("node.log", "helper.log"):
        path = work_dir / name
        if path.is_file() and path.stat().st_size:
            tail = path.read_text(errors="replace").strip().splitlines()[-15:]
            print(f"--- last lines of {name}:\n" + "\n".join(tail), file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    if args.stress < 0:
        raise ValueError(f"--stress: expected a number of busy processes >= 0, got {args.stress}")
    with tempfile.TemporaryDirectory(prefix="actdistill_bench_node_") as tmp:
        work_dir = Path(tmp)
        try:
            rig = run_rig(args, work_dir, label="bench-node", progress_period_s=5.0, stress=args.stress)
        except BenchError as err:
            return report_failure("bench-node", err, work_dir)
    result = summarize(rig)
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0


# ============================================================================ the helper process
class _Recorder:
    """What the helper hears from the node; appended by the spin thread, read as snapshots."""

    def __init__(self):
        # (received ns, frame stamp ns, camera_to_action ms, inference ms, executed fraction, threshold)
        self.stats: list[tuple] = []
        self.commands: list[tuple[int, bool]] = []  # (header stamp ns, moving)
        self.diagnostics: dict[str, str] = {}

    def on_stats(self, msg) -> None:
        self.stats.append((time.time_ns(), _stamp_ns(msg.header.stamp), msg.camera_to_action_ms, msg.inference_ms,
                           msg.executed_fraction, msg.threshold))

    def on_twist(self, msg) -> None:
        v = msg.twist
        moving = any(x != 0.0 for x in (v.linear.x, v.linear.y, v.linear.z, v.angular.x, v.angular.y, v.angular.z))
        self.commands.append((_stamp_ns(msg.header.stamp), moving))

    def on_diagnostics(self, msg) -> None:
        self.diagnostics = {kv.key: kv.value for s in msg.status for kv in s.values}


def _hold_episodes(commands: list[tuple[int, bool]]) -> int:
    return sum(1 for (_, before), (_, now) in zip(commands, commands[1:]) if before and not now)


def _helper(args: argparse.Namespace, emit: Callable[[dict], None], save: Callable[[dict], None]) -> None:
    """Publish frames, command and state; record the node's output; ``save`` the result before ROS goes down."""
    from geometry_msgs.msg import TwistStamped
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import String

    from actdistill_ros.msg import RouterStats
    from actdistill_ros.ros.node_common import ACTION_QOS, LATCHED_QOS, SENSOR_QOS, STATS_QOS
    from actdistill_ros.ros.ros_process import BackgroundRos

    recorder = _Recorder()
    with BackgroundRos("bench_camera") as ros:
        node = ros.node
        camera_pub = node.create_publisher(Image, "/camera/image_raw", SENSOR_QOS)
        state_pub = node.create_publisher(JointState, "/joint_states", SENSOR_QOS)
        node.create_publisher(String, "/instruction", LATCHED_QOS).publish(String(data=INSTRUCTION))
        node.create_subscription(RouterStats, f"/{NODE_NAME}/router_stats", recorder.on_stats, STATS_QOS)
        node.create_subscription(TwistStamped, "/action", recorder.on_twist, ACTION_QOS)
        node.create_subscription(DiagnosticArray, "/diagnostics", recorder.on_diagnostics, STATS_QOS)

        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8).tobytes() for _ in range(8)]
        start_deadline = time.monotonic() + args.start_timeout
        published = 0
        period = 1.0 / args.rate
        measure_from = measure_to = None  # system time, s
        progress = {"at": 0.0, "stats_seen": 0}

        def report_progress(now_wall: float) -> None:
            stats = list(recorder.stats)
            recent = [s[2] for s in stats[progress["stats_seen"]:] if s[1] >= measure_from * 1e9]
            latency = percentiles(recent)
            commands = [c for c in list(recorder.commands) if c[0] >= measure_from * 1e9]
            emit({"event": "progress", "period_s": now_wall - progress["at"], "inferences": len(recent),
                  "latency_ms_p50": latency["p50"], "latency_ms_p99": latency["p99"],
                  "holds": _hold_episodes(commands)})
            progress.update(at=now_wall, stats_seen=len(stats))

        next_time = time.monotonic()
        while True:
            now_wall = time.time()
            if measure_from is None and recorder.stats:
                measure_from = now_wall + args.warmup
                measure_to = measure_from + args.duration
                progress["at"] = measure_from
                emit({"event": "ready"})
                emit({"event": "measuring", "from": measure_from, "to": measure_to})
            if measure_to is not None and now_wall >= measure_to:
                break
            if measure_from is None and time.monotonic() > start_deadline:
                raise RuntimeError(f"the policy node published no RouterStats within {args.start_timeout:g} s")
            msg = Image(height=args.height, width=args.width, encoding="rgb8", step=args.width * 3)
            msg.header.frame_id = "camera"
            msg.data = frames[published % len(frames)]
            msg.header.stamp = _system_stamp()
            camera_pub.publish(msg)
            state_pub.publish(JointState(position=[0.0, 0.6, 0.2, 1.0]))
            if measure_from is not None and now_wall >= measure_from:
                published += 1
                if now_wall >= progress["at"] + args.progress_period:
                    report_progress(now_wall)
            next_time += period
            time.sleep(max(0.0, next_time - time.monotonic()))
        if time.time() - progress["at"] >= 0.5:
            report_progress(time.time())
        time.sleep(0.5)  # let the last stats and commands arrive
        lo, hi = int(measure_from * 1e9), int(measure_to * 1e9)
        stats = [s for s in list(recorder.stats) if lo <= s[1] < hi]
        save({
            "camera": f"{args.width}x{args.height} rgb8 at {args.rate:g} Hz for {args.duration:g} s",
            "window": [measure_from, measure_to], "frames_published": published,
            # [t since window start s, camera_to_action ms, inference ms, end-to-end ms, executed fraction]
            "inferences": [[round((stamp - lo) / 1e9, 4), cta, inf, round((rx - stamp) / 1e6, 3), fraction]
                           for rx, stamp, cta, inf, fraction, _ in stats],
            # [header stamp since window start s, moving (1) or stop (0)]
            "commands": [[round((t - lo) / 1e9, 4), int(moving)] for t, moving in list(recorder.commands)
                         if lo <= t < hi],
            "threshold": float(stats[-1][5]) if stats else None,
            "diagnostics": dict(recorder.diagnostics),
        })


def _system_stamp():
    from builtin_interfaces.msg import Time
    ns = time.time_ns()
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def _stamp_ns(stamp) -> int:
    return stamp.sec * 1_000_000_000 + stamp.nanosec


def main(argv: list[str] | None = None) -> int:
    """The camera/recording helper (started by `run_rig` with the ROS environment already set).

    Events go to stdout as JSON lines; the result goes to ``--result`` before ROS is torn down.
    """
    from actdistill_ros.sim.report import write_json

    parser = argparse.ArgumentParser(description="bench-node camera helper (internal)")
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--warmup", type=float, required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--height", type=int, required=True)
    parser.add_argument("--progress-period", type=float, default=5.0)
    parser.add_argument("--start-timeout", type=float, default=START_TIMEOUT_S)
    args = parser.parse_args(argv)

    def emit(event: dict) -> None:
        print(json.dumps(event), flush=True)

    def save(result: dict) -> None:
        write_json(args.result, result)  # atomic rename: the parent sees all of it or nothing
        emit({"event": "done"})

    _helper(args, emit, save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
