"""Shared plumbing for tests that run real ROS 2 nodes over Fast DDS (loopback only).

- ``NodeProcess`` / ``start_policy_node``: the policy node as a subprocess with its own ROS env.
- ``RosSide``: this test process's rclpy context, node and executor (spinning in a thread).
- ``Recorder`` and ``wait_until``: collect messages and wait on conditions with a deadline.
- Message builders and parameter service calls (SetParameters etc., exactly what `ros2 param` sends).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from actdistill_ros.ros import env as ros_env

REPO_ROOT = Path(__file__).resolve().parents[1]
POLICY_YAML = REPO_ROOT / "config" / "policy.yaml"

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` s pass (None)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


# ---------------------------------------------------------------- messages built by colcon
def load_router_stats_type():
    """actdistill_ros.msg.RouterStats in this (already running) process, or skip if not built."""
    try:
        from actdistill_ros.msg import RouterStats
        return RouterStats
    except ImportError:
        pass
    site_packages = ros_env.built_messages_path()
    if site_packages is None:
        pytest.skip("RouterStats not built: run scripts/build_msgs.sh")
    import actdistill_ros
    lib_dir = ros_env.ROS_INSTALL_DIR / "lib"
    # The loader read LD_LIBRARY_PATH at start-up: preload the message libraries by path, and
    # extend the variable for the typesupport lookup that rosidl does at run time.
    os.environ["LD_LIBRARY_PATH"] = f"{lib_dir}{os.pathsep}{os.environ.get('LD_LIBRARY_PATH', '')}"
    for part in ("generator_c", "typesupport_c", "generator_py", "typesupport_fastrtps_c",
                 "typesupport_introspection_c"):
        ctypes.CDLL(str(lib_dir / f"libactdistill_ros__rosidl_{part}.so"), mode=ctypes.RTLD_GLOBAL)
    package_dir = str(site_packages / "actdistill_ros")
    if package_dir not in actdistill_ros.__path__:
        actdistill_ros.__path__.append(package_dir)
    from actdistill_ros.msg import RouterStats
    return RouterStats


# ---------------------------------------------------------------- node subprocess
def _param_arg(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # keeps the decimal point: 1.0 stays a double
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_param_arg(v) for v in value) + "]"
    return str(value)


class NodeProcess:
    """A node subprocess with its output in files; ``stop()`` sends SIGINT and returns the exit code."""

    def __init__(self, argv: list[str], env: dict[str, str], log_dir: Path):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
        self._stdout, self._stderr = self.stdout_path.open("wb"), self.stderr_path.open("wb")
        self.proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=self._stdout, stderr=self._stderr)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._close()

    def stop(self, timeout: float = 10.0) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close()
        return self.proc.returncode

    def _close(self) -> None:
        self._stdout.close()
        self._stderr.close()


def node_environment(domain_id: int, log_dir: Path) -> dict[str, str]:
    env = ros_env.ros_environment(domain_id=domain_id)
    env["ROS_LOG_DIR"] = str(log_dir)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_policy_node(weights: Path | str, domain_id: int, work_dir: Path, params: dict[str, Any] | None = None,
                      params_file: Path | None = POLICY_YAML, node_name: str | None = None) -> NodeProcess:
    argv = [sys.executable, "-m", "actdistill_ros.ros.policy_node", "--ros-args"]
    if node_name:
        argv += ["-r", f"__node:={node_name}"]
    if params_file is not None:
        argv += ["--params-file", str(params_file)]
    for name, value in {"weights_path": str(weights), **(params or {})}.items():
        argv += ["-p", f"{name}:={_param_arg(value)}"]
    return NodeProcess(argv, node_environment(domain_id, work_dir / "ros_log"), work_dir)


# ---------------------------------------------------------------- this process's ROS side
class Recorder:
    """Thread-safe list of (monotonic receive time, message)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._items: list[tuple[float, Any]] = []

    def __call__(self, msg) -> None:
        with self._lock:
            self._items.append((time.monotonic(), msg))

    def messages(self, since: float = float("-inf")) -> list[Any]:
        with self._lock:
            return [msg for t, msg in self._items if t >= since]

    def wait_for(self, predicate: Callable[[Any], bool] = lambda m: True, timeout: float = 10.0,
                 since: float = float("-inf"), count: int = 1) -> list[Any] | None:
        """The matching messages once at least ``count`` arrived after ``since``, else None."""
        def matching():
            found = [m for m in self.messages(since) if predicate(m)]
            return found if len(found) >= count else None
        return wait_until(matching, timeout)


class RosSide:
    """rclpy context + node + executor thread for the test process, on ``domain_id``."""

    def __init__(self, domain_id: int, name: str = "test_side"):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException
        try:
            while self.context.ok():
                self.executor.spin_once(timeout_sec=0.05)
        except (ExternalShutdownException, RuntimeError):
            pass

    def record(self, msg_type, topic: str, qos) -> Recorder:
        recorder = Recorder()
        self.node.create_subscription(msg_type, topic, recorder, qos)
        return recorder

    def call(self, srv_type, service: str, request, timeout: float = 10.0):
        client = self.node.create_client(srv_type, service)
        try:
            if not client.wait_for_service(timeout_sec=timeout):
                raise TimeoutError(f"service {service} not available after {timeout} s")
            future = client.call_async(request)
            if not wait_until(future.done, timeout):
                raise TimeoutError(f"service {service} did not answer within {timeout} s")
            return future.result()
        finally:
            self.node.destroy_client(client)

    def set_parameters(self, node_name: str, values: dict[str, Any], atomically: bool = False):
        """SetParameters (what `ros2 param set` sends) -> list of results, or one result if atomically."""
        from rcl_interfaces.srv import SetParameters, SetParametersAtomically
        from rclpy.parameter import Parameter

        params = [Parameter(name, value=value).to_parameter_msg() for name, value in values.items()]
        if atomically:
            return self.call(SetParametersAtomically, f"/{node_name}/set_parameters_atomically",
                             SetParametersAtomically.Request(parameters=params)).result
        return self.call(SetParameters, f"/{node_name}/set_parameters",
                         SetParameters.Request(parameters=params)).results

    def get_parameters(self, node_name: str, names: list[str]) -> dict[str, Any]:
        from rcl_interfaces.srv import GetParameters
        from rclpy.parameter import parameter_value_to_python

        response = self.call(GetParameters, f"/{node_name}/get_parameters", GetParameters.Request(names=names))
        return {name: parameter_value_to_python(value) for name, value in zip(names, response.values)}

    def list_parameters(self, node_name: str) -> list[str]:
        from rcl_interfaces.srv import ListParameters

        response = self.call(ListParameters, f"/{node_name}/list_parameters", ListParameters.Request())
        return list(response.result.names)

    def close(self) -> None:
        self.context.try_shutdown()
        self._thread.join(timeout=5.0)
        self.executor.shutdown(timeout_sec=1.0)


class Streamer:
    """Publishes ``make_msg()`` on ``publisher`` at ``rate_hz`` from a thread; pausable."""

    def __init__(self, publisher, make_msg: Callable[[], Any], rate_hz: float = 20.0):
        self._publisher, self._make_msg, self._period = publisher, make_msg, 1.0 / rate_hz
        self._running = threading.Event()
        self._closed = threading.Event()
        self.published = 0
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        next_time = time.monotonic()
        while not self._closed.is_set():
            if self._running.is_set():
                self._publisher.publish(self._make_msg())
                self.published += 1
            next_time += self._period
            time.sleep(max(0.0, next_time - time.monotonic()))

    def resume(self) -> None:
        self._running.set()

    def pause(self) -> None:
        self._running.clear()

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2.0)


# ---------------------------------------------------------------- message builders
def image_msg(frame: np.ndarray, encoding: str = "rgb8", stamp=None, step: int | None = None):
    """sensor_msgs/Image from an (h, w, c) or (h, w) uint8 array (bytes assigned: the fast path)."""
    from sensor_msgs.msg import Image

    msg = Image()
    msg.height, msg.width = int(frame.shape[0]), int(frame.shape[1])
    msg.encoding = encoding
    msg.step = int(step if step is not None else frame.shape[1] * (frame.shape[2] if frame.ndim == 3 else 1))
    msg.data = np.ascontiguousarray(frame).tobytes()
    if stamp is not None:
        msg.header.stamp = stamp
    msg.header.frame_id = "camera"
    return msg


def compressed_msg(data: bytes, fmt: str = "jpeg"):
    from sensor_msgs.msg import CompressedImage

    msg = CompressedImage()
    msg.format = fmt
    msg.data = bytes(data)
    msg.header.frame_id = "camera"
    return msg


def serialized_string(raw: bytes) -> bytes:
    """CDR bytes of a std_msgs/String whose data is ``raw`` (any bytes, e.g. invalid UTF-8)."""
    payload = raw + b"\x00"
    body = len(payload).to_bytes(4, "little") + payload
    return b"\x00\x01\x00\x00" + body + b"\x00" * (-len(body) % 4)


def diagnostic_values(array_msg) -> dict[str, str]:
    return {kv.key: kv.value for status in array_msg.status for kv in status.values}


def reserve_domain() -> int:
    return ros_env.reserve_domain_id()
