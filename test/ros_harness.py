"""Shared plumbing for tests that run real ROS 2 nodes over Fast DDS (loopback only).

- ``NodeProcess`` / ``start_policy_node``: a node as a subprocess with its own ROS env
  (``actdistill_ros.ros.ros_process.NodeProcess``).
- ``RosSide``: this test process's rclpy context, node and executor (``BackgroundRos``).
- ``Recorder`` and ``wait_until``: collect messages and wait on conditions with a deadline.
- Message builders and parameter service calls (SetParameters etc., exactly what `ros2 param` sends).
- ``skip_or_fail`` / ``require_rclpy``: a missing ROS part skips the test, or fails it when
  ACTDISTILL_REQUIRE_ROS=1 (`make test`), so a broken message build cannot pass as skipped tests.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from actdistill_ros.ros import env as ros_env
from actdistill_ros.ros import ros_process
from actdistill_ros.ros.ros_process import param_arg as _param_arg  # noqa: F401 - used by the node tests

REPO_ROOT = Path(__file__).resolve().parents[1]
POLICY_YAML = ros_env.config_file("policy.yaml")
REQUIRE_ROS_VARIABLE = "ACTDISTILL_REQUIRE_ROS"

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


# ---------------------------------------------------------------- skip, or fail where ROS is required
def ros_required() -> bool:
    return os.environ.get(REQUIRE_ROS_VARIABLE) == "1"


def skip_or_fail(reason: str) -> None:
    """Skip (a machine without the ROS parts), or fail when ACTDISTILL_REQUIRE_ROS=1. Works at module level."""
    if ros_required():
        pytest.fail(f"{reason} ({REQUIRE_ROS_VARIABLE}=1: the ROS 2 parts must be present)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_rclpy():
    """The rclpy module, or skip_or_fail."""
    try:
        return importlib.import_module("rclpy")
    except ImportError as err:
        skip_or_fail(f"rclpy not importable ({err}): install requirements-ros.txt")


# ---------------------------------------------------------------- messages built by colcon
def load_router_stats_type():
    """actdistill_ros.msg.RouterStats in this (already running) process, or skip_or_fail if not built."""
    try:
        from actdistill_ros.msg import RouterStats
        return RouterStats
    except ImportError:
        pass
    site_packages = ros_env.built_messages_path()
    if site_packages is None:
        skip_or_fail("actdistill_ros messages (RouterStats, ActionChunk) not built: run scripts/build_msgs.sh")
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
class NodeProcess(ros_process.NodeProcess):
    """A node subprocess (whole ``argv``) with its output in ``log_dir``/output.txt; ``stop()`` sends SIGINT
    and returns the exit code."""

    def __init__(self, argv: list[str], env: dict[str, str], log_dir: Path):
        super().__init__(argv, Path(log_dir) / "output.txt", env=env, cwd=REPO_ROOT)


def node_environment(domain_id: int, log_dir: Path) -> dict[str, str]:
    env = ros_env.ros_environment(domain_id=domain_id)
    env["ROS_LOG_DIR"] = str(log_dir)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_policy_node(weights: Path | str, domain_id: int, work_dir: Path, params: dict[str, Any] | None = None,
                      params_file: Path | None = POLICY_YAML, node_name: str | None = None,
                      module: str = "actdistill_ros.ros.policy_node") -> NodeProcess:
    """``module``: actdistill_ros.ros.policy_lifecycle_node for the managed node."""
    argv = ros_process.node_command(module, {"weights_path": str(weights), **(params or {})}, params_file, node_name)
    return NodeProcess(argv, node_environment(domain_id, work_dir / "ros_log"), work_dir)


# ---------------------------------------------------------------- this process's ROS side
class Recorder:
    """Thread-safe list of (receive time, message); ``clock``: time.time to compare with header stamps."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._lock = threading.Lock()
        self._clock = clock
        self._items: list[tuple[float, Any]] = []

    def __call__(self, msg) -> None:
        with self._lock:
            self._items.append((self._clock(), msg))

    def snapshot(self) -> list[tuple[float, Any]]:
        with self._lock:
            return list(self._items)

    def messages(self, since: float = float("-inf"), until: float = float("inf")) -> list[Any]:
        return [msg for t, msg in self.snapshot() if since <= t < until]

    def wait_for(self, predicate: Callable[[Any], bool] = lambda m: True, timeout: float = 10.0,
                 since: float = float("-inf"), count: int = 1) -> list[Any] | None:
        """The matching messages once at least ``count`` arrived after ``since``, else None."""
        def matching():
            found = [m for m in self.messages(since) if predicate(m)]
            return found if len(found) >= count else None
        return wait_until(matching, timeout)


class RosSide(ros_process.BackgroundRos):
    """rclpy context + node + executor thread for the test process, on ``domain_id``."""

    def __init__(self, domain_id: int, name: str = "test_side"):
        super().__init__(name, domain_id)

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


def compressed_msg(data: bytes, fmt: str = "jpeg", stamp=None):
    from sensor_msgs.msg import CompressedImage

    msg = CompressedImage()
    msg.format = fmt
    msg.data = bytes(data)
    msg.header.frame_id = "camera"
    if stamp is not None:
        msg.header.stamp = stamp
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
