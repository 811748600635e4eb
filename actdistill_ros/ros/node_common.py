"""What the policy node and the sim arm node share: QoS profiles, latched-or-live subscriptions,
parameter declaration, throttled bad-input logging and the process main loop."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any, Callable, Protocol

import rclpy
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.exceptions import ParameterException
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions

BAD_LOG_PERIOD_S = 5.0  # at most one error line per kind of bad input per period

# Sensor data (camera, robot state): only the newest sample matters, never block the driver.
SENSOR_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT,
                        durability=DurabilityPolicy.VOLATILE)
# Instruction: latched, so a node started later still gets the last one.
LATCHED_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
# Robot commands: reliable so reliable controller subscriptions match; only the newest counts.
ACTION_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.VOLATILE)
# Per-inference statistics and diagnostics: reliable, a few deep.
STATS_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                       durability=DurabilityPolicy.VOLATILE)


# Same topic for publishers that are not latched (a transient-local reader does not match them).
LIVE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)


def subscribe_latched_and_live(node: Node, msg_type, topic: str, callback: Callable[[Any], None]) -> list:
    """Two subscriptions on ``topic``: a latched one (gets what a transient-local publisher sent before
    this node existed) and a volatile one (matches the publishers that are not latched). The
    callback may see one message twice: it must be idempotent."""
    quiet = SubscriptionEventCallbacks(incompatible_qos=lambda event: None)  # volatile publishers: expected
    return [node.create_subscription(msg_type, topic, callback, LATCHED_QOS, event_callbacks=quiet),
            node.create_subscription(msg_type, topic, callback, LIVE_QOS)]


class StartupError(RuntimeError):
    """The node cannot start; the message is the one line that is logged."""


def declare(node: Node, name: str, default: Any, description: str, *, read_only: bool = False,
            float_range: tuple[float, float] | None = None, int_range: tuple[int, int] | None = None,
            constraints: str = "", array_type: Parameter.Type | None = None) -> bool:
    """Declare one parameter with its descriptor and a value; a bad override raises StartupError (one line).

    ``array_type`` gives an array parameter its type (that of [] cannot be inferred). An array left
    empty is still given its typed [] value, since one parameter without a value empties a whole
    `ros2 param dump`; as that takes a set, such a read-only parameter is declared writable and True
    is returned: the caller's on-set callback must refuse changes to it after start-up.
    """
    descriptor = ParameterDescriptor(description=description, read_only=read_only,
                                     additional_constraints=constraints)
    if float_range is not None:
        descriptor.floating_point_range = [FloatingPointRange(from_value=float(float_range[0]),
                                                              to_value=float(float_range[1]), step=0.0)]
    if int_range is not None:
        descriptor.integer_range = [IntegerRange(from_value=int(int_range[0]), to_value=int(int_range[1]), step=1)]
    typed_empty = array_type is not None and not default
    if typed_empty:
        descriptor.read_only = False
    try:
        declared = node.declare_parameter(name, array_type if typed_empty else default, descriptor)
    except ParameterException as err:  # e.g. `-p router.threshold:=1` (an integer) or out of range
        expected = type(default).__name__ if array_type is None else array_type.name.lower()
        bounds = float_range or int_range
        raise StartupError(f"parameter {name}: {err} (expected {expected}"
                           f"{'' if bounds is None else f' in [{bounds[0]:g}, {bounds[1]:g}]'})") from None
    if typed_empty and declared.type_ == Parameter.Type.NOT_SET:
        node.set_parameters([Parameter(name, array_type, [])])
    return typed_empty and read_only


class BadInputLog:
    """Counts bad inputs per kind and logs them, at most once per kind every BAD_LOG_PERIOD_S."""

    def __init__(self, logger, noun: str = "input"):
        self._logger = logger
        self._noun = noun  # "dropped bad <kind> <noun>"
        self.counts: dict[str, int] = {}
        self._last_log: dict[str, float] = {}

    def report(self, kind: str, text: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        now = time.monotonic()
        if now - self._last_log.get(kind, float("-inf")) >= BAD_LOG_PERIOD_S:
            self._last_log[kind] = now
            self._logger.error(f"dropped bad {kind} {self._noun} ({self.counts[kind]} so far): {text}")


class RunnableNode(Protocol):
    def start(self) -> None: ...  # raise StartupError when the node cannot run
    def stop(self) -> None: ...
    def failure(self) -> str | None: ...  # set (and already logged) when the node cannot go on
    def destroy_node(self) -> None: ...
    def get_logger(self): ...


def run_node(factory: Callable[[], RunnableNode], node_name: str, args: list[str] | None = None) -> int:
    """Create, start and spin one node until SIGINT/SIGTERM; 0 on a clean stop, 1 on any failure."""
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node = None
    try:
        try:
            node = factory()
            node.start()
        except StartupError as err:
            logger = node.get_logger() if node is not None else rclpy.logging.get_logger(node_name)
            logger.fatal(str(err))
            return 1
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        while not stop.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=0.1)  # short timeout: signals are handled between calls
            if node.failure() is not None:
                return 1
        return 0
    finally:
        if node is not None:
            node.stop()
            node.destroy_node()
        rclpy.try_shutdown()
