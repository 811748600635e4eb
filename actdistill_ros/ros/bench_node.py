"""`actdistill bench-node`: camera-to-action latency of the running policy node, and its overhead.

The node runs as its own process (config/policy.yaml, ee_twist). A second process publishes
640x480 rgb8 frames at 30 Hz with the Fast DDS large-image profile, a latched command and the
robot state, and records RouterStats for ``--duration`` seconds. Reported (JSON):
- ``node_latency_ms``: camera message received -> first action of its chunk published (node clock);
- ``inference_ms``: the policy call alone; ``overhead_ms`` = node latency - inference, per frame;
- ``end_to_end_ms``: camera message published -> its RouterStats received here (adds transport of
  the frame and of the stats message).
Target: overhead p50 <= 10% of the student's inference p50.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from actdistill_ros.ros.env import REPO_ROOT, config_file, ros_environment

POLICY_YAML = config_file("policy.yaml")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench-node", help="policy node: camera-to-action latency and overhead over inference")
    _add_arguments(p)
    p.set_defaults(func=run)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", type=Path, help="weights directory (default: untrained --size student)")
    p.add_argument("--size", default="bench", choices=["tiny", "bench", "default"])
    p.add_argument("--keep", type=float, default=0.5, help="layer fraction an untrained router keeps")
    p.add_argument("--device", default="auto")
    p.add_argument("--threshold", type=float, help="router threshold (default: the card's)")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds (after --warmup)")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--rate", type=float, default=30.0, help="camera rate (Hz)")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "n": 0}
    return {"p50": round(float(np.percentile(values, 50)), 3), "p99": round(float(np.percentile(values, 99)), 3),
            "n": len(values)}


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="actdistill_bench_node_") as tmp:
        tmp_dir = Path(tmp)
        weights = args.weights
        if weights is None:
            from actdistill_ros.policy import create_untrained_policy
            weights = create_untrained_policy(tmp_dir / "weights", size=args.size, student=True, keep=args.keep)
        # config/policy.yaml leaves router.threshold unset (= the card's); pass it explicitly so the
        # measured threshold never depends on what a params file says.
        from actdistill_ros.weights import read_card, resolve_weights_path
        threshold = (float(args.threshold) if args.threshold is not None
                     else float(read_card(resolve_weights_path(weights)[1]).default_threshold))
        env = ros_environment()  # loopback, own domain, built messages, Fast DDS large-image profile
        env["ROS_LOG_DIR"] = str(tmp_dir / "ros_log")
        node_cmd = [sys.executable, "-m", "actdistill_ros.ros.policy_node", "--ros-args",
                    "--params-file", str(POLICY_YAML), "-p", f"weights_path:={weights}",
                    "-p", f"device:={args.device}", "-p", f"control_rate_hz:={float(args.rate)!r}",
                    "-p", f"router.threshold:={threshold!r}"]
        node_log = (tmp_dir / "node.log").open("wb")
        node = subprocess.Popen(node_cmd, cwd=REPO_ROOT, env=env, stdout=node_log, stderr=subprocess.STDOUT)
        try:
            camera_cmd = [sys.executable, "-m", "actdistill_ros.ros.bench_node", "--duration", str(args.duration),
                          "--warmup", str(args.warmup), "--rate", str(args.rate), "--width", str(args.width),
                          "--height", str(args.height)]
            camera = subprocess.run(camera_cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                                    timeout=args.duration + args.warmup + 120)
        finally:
            node.terminate()
            try:
                node.wait(timeout=15)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
            node_log.close()
        if camera.returncode != 0:
            sys.stderr.write(camera.stderr[-3000:])
            sys.stderr.write((tmp_dir / "node.log").read_text(errors="replace")[-3000:])
            raise RuntimeError(f"bench-node camera process failed (exit {camera.returncode})")
        result = json.loads(camera.stdout.strip().splitlines()[-1])
        result.update({"model_size": args.size if args.weights is None else str(args.weights),
                       "device_requested": args.device, "threshold_requested": threshold})
    print(json.dumps(result, indent=2))
    return 0


def _camera_side(args: argparse.Namespace) -> dict:
    """Runs in its own process: publish frames, command and state; record RouterStats."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import String

    from actdistill_ros.msg import RouterStats

    rclpy.init()
    node = rclpy.create_node("bench_camera")
    sensor = QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
    reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    camera_pub = node.create_publisher(Image, "/camera/image_raw", sensor)
    state_pub = node.create_publisher(JointState, "/joint_states", sensor)
    node.create_publisher(String, "/instruction", latched).publish(String(data="push the puck to the goal"))
    records: list[tuple[int, object]] = []
    diagnostics: list[dict] = []
    node.create_subscription(RouterStats, "/policy_node/router_stats",
                             lambda m: records.append((time.time_ns(), m)), reliable)
    node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: diagnostics.append(
        {kv.key: kv.value for s in m.status for kv in s.values}), reliable)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8).tobytes() for _ in range(8)]
    # Wait for the node to be up (its first RouterStats needs our frames: publish meanwhile).
    start_deadline = time.monotonic() + 90.0
    published = 0
    period = 1.0 / args.rate
    measure_from = measure_to = None
    next_time = time.monotonic()
    while True:
        now = time.monotonic()
        if measure_from is None and records:
            measure_from = now + args.warmup
            measure_to = measure_from + args.duration
        if measure_to is not None and now >= measure_to:
            break
        if measure_from is None and now > start_deadline:
            raise RuntimeError("the policy node published no RouterStats within 90 s")
        msg = Image(height=args.height, width=args.width, encoding="rgb8", step=args.width * 3)
        msg.header.frame_id = "camera"
        msg.data = frames[published % len(frames)]
        msg.header.stamp = _system_stamp()
        camera_pub.publish(msg)
        state_pub.publish(JointState(position=[0.0, 0.6, 0.2, 1.0]))
        if measure_from is not None and now >= measure_from:
            published += 1
        next_time += period
        time.sleep(max(0.0, next_time - time.monotonic()))
    time.sleep(0.5)  # let the last stats arrive
    window = [(rx, m) for rx, m in records
              if _stamp_ns(m.header.stamp) >= _mono_to_system_ns(measure_from)
              and _stamp_ns(m.header.stamp) < _mono_to_system_ns(measure_to)]
    node_latency = [m.camera_to_action_ms for _, m in window if np.isfinite(m.camera_to_action_ms)]
    inference = [m.inference_ms for _, m in window if np.isfinite(m.camera_to_action_ms)]
    overhead = [a - b for a, b in zip(node_latency, inference)]
    end_to_end = [(rx - _stamp_ns(m.header.stamp)) / 1e6 for rx, m in window]
    last_diag = diagnostics[-1] if diagnostics else {}
    inference_p50 = _percentiles(inference)["p50"]
    overhead_p50 = _percentiles(overhead)["p50"]
    result = {
        "camera": f"{args.width}x{args.height} rgb8 at {args.rate:g} Hz for {args.duration:g} s",
        "frames_published": published, "inferences_measured": len(window),
        "node_latency_ms": _percentiles(node_latency), "inference_ms": _percentiles(inference),
        "overhead_ms": _percentiles(overhead),
        "overhead_fraction_of_inference_p50": round(overhead_p50 / inference_p50, 4) if inference_p50 else None,
        "target_overhead_le_10pct": bool(overhead_p50 <= 0.1 * inference_p50),
        # Waiting for the worker to finish the previous frame is camera sampling, not processing:
        # with inference slower than the frame period the newest frame is ~half a period old when
        # picked up. Approximate (difference of medians) processing overhead without it:
        "overhead_excluding_frame_wait_ms_p50_approx": round(
            overhead_p50 - float(last_diag.get("frame_wait_ms_p50", "nan")), 3),
        "end_to_end_ms": _percentiles(end_to_end),
        # Where the overhead goes (node diagnostics, p50): middleware receipt -> image callback,
        # callback -> inference start (worker still busy with the previous frame), inference end
        # -> action published.
        "node_executor_delay_ms_p50": float(last_diag.get("executor_delay_ms_p50", "nan")),
        "node_frame_wait_ms_p50": float(last_diag.get("frame_wait_ms_p50", "nan")),
        "node_after_inference_ms_p50": float(last_diag.get("after_inference_ms_p50", "nan")),
        "node_frames_received": int(last_diag.get("frames_received", "0")),
        "node_frames_dropped_newer_frame_arrived": int(last_diag.get("frames_dropped", "0")),
        "executed_fraction": float(window[-1][1].executed_fraction) if window else None,
        "threshold": float(window[-1][1].threshold) if window else None,
        "device": last_diag.get("device"),
    }
    executor.shutdown(timeout_sec=1.0)
    node.destroy_node()
    rclpy.try_shutdown()
    return result


def _system_stamp():
    from builtin_interfaces.msg import Time
    ns = time.time_ns()
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def _stamp_ns(stamp) -> int:
    return stamp.sec * 1_000_000_000 + stamp.nanosec


def _mono_to_system_ns(mono: float) -> int:
    return time.time_ns() - int((time.monotonic() - mono) * 1e9)


def main(argv: list[str] | None = None) -> int:
    """The camera/measurement side (started by `run` with the ROS environment already set)."""
    parser = argparse.ArgumentParser(description="bench-node camera side (internal)")
    _add_arguments(parser)
    print(json.dumps(_camera_side(parser.parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
