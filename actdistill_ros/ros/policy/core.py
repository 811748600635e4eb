"""``PolicyCore``: the whole policy node on top of an rclpy node it is given.

``PolicyNode`` (policy_node.py, a plain node that configures and activates itself) and
``PolicyLifecycleNode`` (policy_lifecycle_node.py, a managed node) share it. What the arm may do
is decided by the ROS-free ``MotionController`` and its safety contract (actdistill_ros.control);
this class feeds it the inputs with their stamps and publishes its results.

Threads: the executor runs the subscriptions, the timers and the services and never waits on
the model. One inference worker runs the policy on the newest frames and hands each chunk to
the controller; commands leave only on the control timer, at ``control_rate_hz``.
"""

from __future__ import annotations

import functools
import gc
import logging
import threading
import time
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped
from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Bool, Float64, String
from std_srvs.srv import SetBool

from actdistill_ros.control.commands import pose_from_command, select_named, twist_from_command
from actdistill_ros.control.motion import ChunkSource, MotionController, TickResult
from actdistill_ros.data.images import ImageDecodeError
from actdistill_ros.policy import Policy
from actdistill_ros.ros.node_common import (ACTION_QOS, SENSOR_QOS, STATS_QOS, BadInputLog, StartupError, declare,
                                            subscribe_latched_and_live)
from actdistill_ros.ros.policy import messages
from actdistill_ros.ros.policy.inputs import Frame, check_instruction, decode_frame, stamp_seconds
from actdistill_ros.ros.policy.parameters import (CARD_PARAMETERS, Settings, build_settings, camera_transports,
                                                  declare_card_parameters, declare_policy_parameters,
                                                  refuse_removed_parameters)
from actdistill_ros.ros.policy.statistics import NodeStatistics, level_and_message
from actdistill_ros.weights import WeightsError

NODE_NAME = "policy_node"
# Camera, state and measured pose: newest sample only, never block the driver.
CAMERA_QOS = STATE_QOS = SENSOR_QOS


class PendingStats:
    """A RouterStats whose camera_to_action_ms is filled when the chunk's first step is executed."""

    def __init__(self, msg: Any, received_ns: int, inference_end_ns: int):
        self.msg = msg
        self.received_ns = received_ns  # the oldest source frame's receipt (system clock)
        self.inference_end_ns = inference_end_ns


class _ForwardToRosLogger(logging.Handler):
    """Python `logging` records of the core (e.g. the CUDA fallback warning) -> the node's logger."""

    def __init__(self, ros_logger):
        super().__init__()
        self._ros_logger = ros_logger

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.levelno >= logging.ERROR:
            self._ros_logger.error(text)
        elif record.levelno >= logging.WARNING:
            self._ros_logger.warning(text)
        else:
            self._ros_logger.info(text)


class PolicyCore:
    """The policy node's logic on top of ``node`` (an rclpy Node or LifecycleNode).

    Life cycle: ``configure`` (load the weights, warm up, create topics and timers), ``activate``
    (start inferring and, with enable_output, commanding), ``deactivate`` (explicit stop, stop
    inferring), ``cleanup`` (free the model and the topics). The emergency stop exists for the node's
    whole life and its latch survives reconfiguration.
    """

    def __init__(self, node: Node, lifecycle: bool = False):
        self.node = node
        self._lifecycle = lifecycle
        self._log = node.get_logger()
        self._declared: dict[str, Parameter.Type | None] = {}
        self._startup_only: set[str] = set()  # read-only in effect, declared writable (node_common.declare)
        self._bad = BadInputLog(self._log, "input")
        self._failure: str | None = None  # set when the inference worker died: the process exits
        self._estop = False
        self._estop_lock = threading.Lock()
        self.policy: Policy | None = None
        self.controller: MotionController | None = None
        self._configuring = False
        self._worker: threading.Thread | None = None
        self._entities: list[tuple[str, Any]] = []  # (kind, handle) created by configure
        refuse_removed_parameters(node)
        declare_policy_parameters(self._declare, lifecycle)
        node.add_on_set_parameters_callback(self._validate_parameter_batch)
        node.add_post_set_parameters_callback(self._apply_parameter_batch)
        subscribe_latched_and_live(node, Bool, self._value("topics.emergency_stop"), self._on_estop_msg)
        node.create_service(SetBool, "~/emergency_stop", self._on_estop_service)

    # ================================================================ parameters
    def _declare(self, name: str, default: Any, description: str, **options) -> None:
        if declare(self.node, name, default, description, **options):
            self._startup_only.add(name)
        self._declared[name] = options.get("array_type")

    def _value(self, name: str) -> Any:
        return self.node.get_parameter(name).value

    def _parameter_values(self) -> dict[str, Any]:
        return {name: self._value(name) for name in self._declared}

    def _clock_s(self) -> float:
        """The controller's clock: the node's ROS clock, the one header stamps are written in."""
        return self.node.get_clock().now().nanoseconds * 1e-9

    def _validate_parameter_batch(self, params: list[Parameter]) -> SetParametersResult:
        """Check the whole batch against the current values before anything is applied."""
        if self._configuring:
            return SetParametersResult(successful=True)  # configure declares the card's parameters
        fixed = [param.name for param in params if param.name in self._startup_only]
        if fixed:
            return SetParametersResult(successful=False, reason=f"{fixed[0]} is read-only: set it at start-up")
        if any(param.name == "weights_path" for param in params) and self.policy is not None:
            return SetParametersResult(successful=False, reason="weights_path can change only while unconfigured: "
                                                                "deactivate and cleanup first, then configure")
        if self.policy is None:
            return SetParametersResult(successful=True)  # checked against the card at configure
        values = self._parameter_values()
        values.update({param.name: param.value for param in params})
        try:
            build_settings(values, self._mode, self.policy.card.action_space)
        except (ValueError, TypeError, KeyError) as err:
            return SetParametersResult(successful=False, reason=str(err))
        return SetParametersResult(successful=True)

    def _apply_parameter_batch(self, params: list[Parameter]) -> None:
        if self._configuring:
            return
        if self.controller is not None:
            was_enabled = self._settings.control.enable_output
            settings = self._settings = build_settings(self._parameter_values(), self._mode,
                                                       self.policy.card.action_space)
            self.controller.set_settings(settings.control)
            self._control_timer.timer_period_ns = int(round(settings.control.limits.period_s * 1e9))
            if was_enabled and not settings.control.enable_output:
                self._log.warning("enable_output false: stopping within the limits, then a dry run (no commands)")
        for param in params:
            self._log.info(f"parameter {param.name} set to {param.value!r}")

    # ================================================================ life cycle
    def configure(self) -> None:
        """Load the policy, warm it up, create the topics and timers; StartupError (one line) on failure."""
        self._configuring = True
        try:
            self._configure()
        except BaseException:
            self.cleanup()
            raise
        finally:
            self._configuring = False

    def _configure(self) -> None:
        if messages.RouterStats is None or messages.ActionChunk is None:
            raise StartupError("messages actdistill_ros/msg/RouterStats and ActionChunk are not available: build "
                               "them with scripts/build_msgs.sh (or colcon build) and source its install")
        policy = self.policy = self._load_policy()
        card = policy.card
        declare_card_parameters(self._declare, card)
        space = card.action_space
        self._gripper_index = space.gripper_index
        arm_index = [i for i in range(space.dim) if i != space.gripper_index]
        self._mode = self._value("action.mode")
        self._frame_id = self._value("action.frame_id")
        self._cameras = list(self._value("topics.cameras"))
        if len(self._cameras) != policy.num_cameras or not all(self._cameras):
            trained = f" (trained on {card.camera_names})" if card.camera_names else ""
            raise StartupError(f"topics.cameras lists {len(self._cameras)} topic(s) {self._cameras}, the policy takes "
                               f"{policy.num_cameras} camera image(s){trained}: give one topic per camera")
        try:
            self._transports = camera_transports(list(self._value("camera.transports")), self._cameras)
            self._settings = build_settings(self._parameter_values(), self._mode, space)
        except ValueError as err:
            raise StartupError(str(err)) from None
        self._age_from_stamp = self._value("watchdog.age_from") == "stamp"
        joint_names = list(self._value("action.joint_names"))
        if joint_names and len(joint_names) != len(arm_index):
            raise StartupError(f"action.joint_names has {len(joint_names)} names, the model has "
                               f"{len(arm_index)} non-gripper action dimensions")
        self._arm_names = joint_names or [space.names[i] for i in arm_index]
        self._state_dim = int(policy.vla.config.state_dim)
        self._use_state = bool(self._value("state.enabled")) and self._state_dim > 0
        if self._state_dim > 0 and not self._value("state.enabled"):
            raise StartupError(f"this policy needs the robot state ({self._state_dim} values, names "
                               f"{card.state_names or 'not in card'}): set state.enabled to true")
        if self._value("state.enabled") and self._state_dim == 0:
            self._log.warning("state.enabled is true but the policy takes no robot state: ignoring it as input")
        self._warm_up()

        # ---- run-time state ----
        self.controller = MotionController(self._mode, self._settings.control, cameras=self._cameras,
                                           needs_state=self._use_state, active=False,  # activate() starts motion
                                           clock=self._clock_s)
        with self._estop_lock:
            self.controller.emergency_stop(self._estop)
        self._inputs = threading.Condition()  # newest frames / command / state -> inference worker
        self._stopping = False
        self._active = False
        self._frames: list[Frame | None] = [None] * len(self._cameras)
        self._frame_seq = 0
        self._used_frame_seq = 0
        self._instruction: str | None = None
        self._instruction_s: float | None = None  # controller clock, when it arrived
        self._state: np.ndarray | None = None
        self._state_s: tuple[float, float] | None = None  # (effective stamp, receipt), controller clock
        self._stats = NodeStatistics()

        # ---- publishers (commands: lifecycle publishers in the managed node, silent while inactive) ----
        topic_action = self._value("topics.action")
        self._action_pub = self._command_publisher(messages.ACTION_TYPES[self._mode], topic_action)
        self._gripper_pub = (self._command_publisher(Float64, self._value("topics.gripper"))
                             if self._gripper_index is not None else None)
        self._stats_pub = self._add("publisher", self.node.create_publisher(
            messages.RouterStats, self._value("topics.router_stats"), STATS_QOS))
        # Evaluation and logging output: published even in a dry run (it commands nothing).
        self._chunk_pub = self._add("publisher", self.node.create_publisher(
            messages.ActionChunk, self._value("topics.action_chunk"), STATS_QOS))
        self._diag_pub = self._add("publisher", self.node.create_publisher(DiagnosticArray, "/diagnostics", STATS_QOS))

        # ---- subscriptions ----
        for index, (topic, transport) in enumerate(zip(self._cameras, self._transports)):
            self._add("subscription", self.node.create_subscription(
                Image if transport == "raw" else CompressedImage, topic, functools.partial(self._on_image, index),
                CAMERA_QOS))
        for subscription in subscribe_latched_and_live(self.node, String, self._value("topics.command"),
                                                       self._on_command):
            self._add("subscription", subscription)
        if self._use_state or self._mode in ("joint_state", "joint_trajectory"):
            self._add("subscription", self.node.create_subscription(JointState, self._value("topics.state"),
                                                                    self._on_state, STATE_QOS))
        if self._mode == "ee_pose":
            self._add("subscription", self.node.create_subscription(PoseStamped, self._value("topics.measured_pose"),
                                                                    self._on_measured_pose, STATE_QOS))

        self._control_timer = self._add("timer", self.node.create_timer(
            self._settings.control.limits.period_s, self._on_control_timer))
        self._add("timer", self.node.create_timer(1.0, self._publish_diagnostics))
        self._worker = threading.Thread(target=self._inference_loop, name="inference", daemon=True)
        self._worker.start()
        settings = self._settings
        cameras = ", ".join(f"{topic} ({transport})" for topic, transport in zip(self._cameras, self._transports))
        self._log.info(
            f"ready: {'student' if card.is_student else 'teacher'} ({policy.num_layers} layers, chunk "
            f"{policy.vla.config.chunk_size}) on {policy.device} {str(policy.dtype).split('.')[-1]}, "
            f"{self._routing(settings)}; cameras {cameras} -> {self._mode} on {topic_action} at "
            f"{settings.control.control_rate_hz:g} Hz; limits {settings.control.limits.describe(space.names)}")
        if not settings.control.enable_output:
            self._log.warning(f"output disabled (dry run: inference, stats and diagnostics, no commands). To move "
                              f"the arm: ros2 param set {self.node.get_fully_qualified_name()} enable_output true "
                              f"(or the launch argument enable_output:=true)")

    def activate(self) -> None:
        with self._inputs:
            self._active = True
            self._inputs.notify_all()
        self.controller.set_active(True)

    def deactivate(self) -> None:
        """Stop motion with an explicit stop (published now), then stop inferring."""
        self._publish_result(self.controller.set_active(False))
        with self._inputs:
            self._active = False

    def cleanup(self) -> None:
        """Stop the worker and free the model, the topics and the timers (safe after a failed configure)."""
        if self._worker is not None:
            with self._inputs:
                self._stopping = True
                self._inputs.notify_all()
            self._worker.join(timeout=10.0)
            if self._worker.is_alive():
                self._log.warning("the inference worker did not stop within 10 s; freeing the model anyway")
            self._worker = None
        for kind, handle in reversed(self._entities):
            getattr(self.node, f"destroy_{kind}")(handle)
        self._entities.clear()
        for name in CARD_PARAMETERS:
            if name in self._declared:
                self.node.undeclare_parameter(name)
                del self._declared[name]
        device = self.policy.device if self.policy is not None else None
        self.policy = self.controller = None
        gc.collect()
        if device is not None and device.type == "cuda":
            import torch
            torch.cuda.empty_cache()

    def stop(self) -> None:
        """Process shutdown: an explicit stop while publishing still works, then free everything."""
        if self.controller is not None and rclpy.ok(context=self.node.context):
            self._publish_result(self.controller.stop_now())
        self.cleanup()

    def failure(self) -> str | None:
        """Why the node cannot go on (already logged), or None."""
        return self._failure

    def _command_publisher(self, msg_type, topic: str):
        if self._lifecycle:
            return self._add("lifecycle_publisher", self.node.create_lifecycle_publisher(msg_type, topic, ACTION_QOS))
        return self._add("publisher", self.node.create_publisher(msg_type, topic, ACTION_QOS))

    def _add(self, kind: str, handle):
        self._entities.append((kind, handle))
        return handle

    def _load_policy(self) -> Policy:
        weights_path = self._value("weights_path")
        device, dtype = self._value("device"), self._value("dtype")
        if not weights_path:
            raise StartupError("weights_path is not set: pass -p weights_path:=<dir with model.safetensors and card.json>")
        core_logger = logging.getLogger("actdistill_ros")
        if not any(isinstance(h, _ForwardToRosLogger) for h in core_logger.handlers):
            core_logger.addHandler(_ForwardToRosLogger(self._log))
            core_logger.propagate = False
        try:
            return Policy.load(weights_path, device=device, dtype=dtype)
        except WeightsError as err:
            raise StartupError(f"cannot load weights: {err}") from None
        except ValueError as err:  # device or dtype refused by resolve_device / resolve_dtype
            raise StartupError(f"cannot start the policy on device {device!r}, dtype {dtype!r}: {err}") from None
        except OSError as err:
            raise StartupError(f"cannot load weights from {weights_path}: {err}") from None

    def _warm_up(self) -> None:
        """One inference on black frames: the first real one then runs at full speed."""
        policy, size = self.policy, self.policy.vla.config.image_size
        black = [np.zeros((size, size, 3), np.uint8)] * policy.num_cameras
        state = np.zeros(self._state_dim, np.float32) if self._state_dim else None
        started = time.perf_counter()
        policy.predict(black, "warm up", state)
        self._log.info(f"warm-up inference {1e3 * (time.perf_counter() - started):.1f} ms")

    @staticmethod
    def _routing(settings: Settings) -> str:
        if settings.keep_fraction > 0:
            return f"keep_fraction {settings.keep_fraction:g}"
        return f"threshold {settings.threshold:g}"

    # ================================================================ inputs (executor thread)
    def _report_bad(self, kind: str, text: str) -> None:
        """Count a bad input and log it, throttled per kind; the node carries on."""
        self._bad.report(kind, text)

    def _stamp_of(self, header) -> float | None:
        """The stamp the controller judges an input by (None: its receipt time, watchdog.age_from receipt)."""
        return stamp_seconds(header) if self._age_from_stamp else None

    def _warn_once(self, warning: str | None) -> None:
        if warning:
            self._log.warning(warning)

    def _on_estop_msg(self, msg: Bool) -> None:
        self._set_estop(bool(msg.data), "topic")

    def _on_estop_service(self, request, response):
        self._set_estop(bool(request.data), "service")
        response.success = True
        response.message = ("emergency stop engaged: motion stops within one control period and stays stopped "
                            "until released (software stop, not safety-rated)" if request.data else
                            "emergency stop released: motion resumes on fresh inputs, ramping up")
        return response

    def _set_estop(self, engaged: bool, via: str) -> None:
        with self._estop_lock:
            changed = engaged != self._estop
            self._estop = engaged
            if self.controller is not None:
                self.controller.emergency_stop(engaged)
        if changed and engaged:
            self._log.error(f"EMERGENCY STOP engaged ({via}): commanding a stop until released")
        elif changed:
            self._log.warning(f"emergency stop released ({via}): motion resumes on fresh inputs, ramping up "
                              f"from the measured state (ee_twist: from the last commanded twist)")

    def _on_image(self, camera: int, msg, info) -> None:
        received_ns = int(info.get("received_timestamp") or 0) or time.time_ns()
        self._stats.count("frames_received")
        try:
            rgb = decode_frame(msg, self._transports[camera])
        except ImageDecodeError as err:
            self._report_bad(f"image_{err.kind}", f"{self._cameras[camera]}: {err}")
            return
        received_s = self._clock_s()
        stamp_s, warning = self.controller.note_frame(camera, self._stamp_of(msg.header), received_s)
        self._warn_once(warning)
        with self._inputs:
            previous = self._frames[camera]
            if camera == 0 and previous is not None and previous.seq > self._used_frame_seq:
                self._stats.count("frames_dropped")  # replaced before the worker got to it
            self._frame_seq += 1
            self._frames[camera] = Frame(rgb, msg.header, stamp_s, received_s, received_ns, time.time_ns(),
                                         self._frame_seq)
            self._inputs.notify()

    def _on_command(self, msg: String) -> None:
        problem = check_instruction(msg.data)
        if problem is not None:
            self._report_bad(*problem)
            return
        text = msg.data.strip()
        with self._inputs:
            if text == (self._instruction or ""):
                return  # repeated (or received on both command subscriptions)
            self._instruction = text or None
            self._instruction_s = self.controller.note_command(bool(text))
            self._inputs.notify()
        if text:
            shown = text if len(text) <= 80 else text[:77] + "..."
            self._log.info(f"command: {shown!r}")
        else:
            self._log.info("empty command: no motion until the next command")

    def _on_state(self, msg: JointState) -> None:
        if self._mode in ("joint_state", "joint_trajectory"):
            try:
                measured = select_named(msg.name, msg.position, self._arm_names, "joint state")
                self._warn_once(self.controller.note_measured(measured, self._stamp_of(msg.header)))
            except ValueError as err:
                self._report_bad("measured_position", f"{err}: the measured joint positions motion starts from")
        if not self._use_state:
            return
        names = self.policy.card.state_names
        positions = np.asarray(msg.position, dtype=np.float64)
        try:
            if names:
                state = select_named(msg.name, positions, names, "joint state")
            elif positions.size == self._state_dim:
                state = positions
            else:
                raise ValueError(f"joint state has {positions.size} positions, expected {self._state_dim}")
        except ValueError as err:
            self._report_bad("state", str(err))
            return
        if not np.isfinite(state).all():
            self._report_bad("state", "joint state contains NaN or inf")
            return
        received_s = self._clock_s()
        stamp_s, warning = self.controller.note_state(self._stamp_of(msg.header), received_s)
        self._warn_once(warning)
        with self._inputs:
            self._state = state.astype(np.float32)
            self._state_s = (stamp_s, received_s)
            self._inputs.notify()

    def _on_measured_pose(self, msg: PoseStamped) -> None:
        if msg.header.frame_id and msg.header.frame_id != self._frame_id:
            self._report_bad("measured_position", f"measured pose is in frame {msg.header.frame_id!r}, commands "
                                                  f"in action.frame_id {self._frame_id!r}")
            return
        p, q = msg.pose.position, msg.pose.orientation
        try:
            self._warn_once(self.controller.note_measured(np.array([p.x, p.y, p.z, q.x, q.y, q.z, q.w]),
                                                          self._stamp_of(msg.header)))
        except ValueError as err:
            self._report_bad("measured_position", str(err))

    # ================================================================ inference (worker thread)
    def _ready_to_infer(self) -> bool:
        first = self._frames[0]
        return (self._active and first is not None and first.seq > self._used_frame_seq
                and all(frame is not None for frame in self._frames) and self._instruction is not None
                and (self._state is not None or not self._use_state))

    def _abandoned(self) -> bool:
        """True in a worker that cleanup gave up waiting for (an inference longer than its join
        timeout): it must neither touch the state of a later configure nor be taken for a failure."""
        return self._worker is not threading.current_thread()

    def _inference_loop(self) -> None:
        try:
            self._infer_until_stopped()
        except Exception as err:  # noqa: BLE001 - a bug here must end the process, not leave it idle
            if self._abandoned():
                return
            self._failure = f"inference worker stopped: {type(err).__name__}: {err}"
            self._log.fatal(self._failure)

    def _infer_until_stopped(self) -> None:
        while True:
            with self._inputs:
                self._inputs.wait_for(lambda: self._stopping or self._abandoned() or self._ready_to_infer())
                if self._stopping or self._abandoned():
                    return
                frames, instruction, instruction_s = list(self._frames), self._instruction, self._instruction_s
                state, state_s = (self._state, self._state_s) if self._use_state else (None, None)
                self._used_frame_seq = frames[0].seq
            settings = self._settings
            self.policy.threshold = settings.threshold
            self.policy.keep_fraction = settings.keep_fraction
            started_ns = time.time_ns()
            try:
                out = self.policy.predict([frame.rgb for frame in frames], instruction, state)
            except Exception as err:  # noqa: BLE001 - a failed inference must not end the node
                self._report_bad("inference", f"{type(err).__name__}: {err}")
                continue
            if self._abandoned():
                return  # cleanup freed (or a new configure replaced) what this chunk would go to
            finished_ns = time.time_ns()
            inference_ms = (finished_ns - started_ns) / 1e6
            oldest = min(frames, key=lambda frame: frame.received_s)
            self._stats.count("inferences")
            self._stats.executed_fraction = float(out.executed_fraction)
            self._stats.add(inference_ms=inference_ms, frame_wait_ms=(started_ns - frames[0].callback_ns) / 1e6,
                            executor_delay_ms=(frames[0].callback_ns - frames[0].received_ns) / 1e6)
            stats = messages.router_stats_msg(out, frames, self.policy.num_layers, inference_ms, settings.threshold,
                                              settings.keep_fraction)
            received = [frame.received_s for frame in frames] + ([] if state_s is None else [state_s[1]])
            source = ChunkSource(tuple(frame.stamp_s for frame in frames), None if state_s is None else state_s[0],
                                 PendingStats(stats, oldest.received_ns, finished_ns), instruction_s, min(received))
            chunk = self.controller.add_chunk(out.actions, source)
            if chunk is None:
                self._stats.count("nan_actions_dropped")
                self._report_bad("nan_action", "the model produced NaN/inf actions; chunk dropped")
                self._stats_pub.publish(stats)  # camera_to_action_ms stays NaN: never executed
                continue
            limits = settings.control.limits
            self._chunk_pub.publish(messages.action_chunk_msg(frames[0].header, self.policy.card.action_space,
                                                              chunk / limits.scale, settings.threshold,
                                                              out.executed_fraction))

    # ================================================================ control (timer)
    def _on_control_timer(self) -> None:
        result = self.controller.tick()
        if result.reason_changed:
            if not result.reason:
                self._log.info("inputs fresh: motion enabled" if self._settings.control.enable_output
                               else "inputs fresh (dry run: no commands)")
            elif "inactive" not in result.reason:
                self._log.warning(f"holding position: {result.reason}")
        self._publish_result(result)
        published_ns = time.time_ns()
        for pending in result.started:
            pending.msg.camera_to_action_ms = (published_ns - pending.received_ns) / 1e6
            self._stats.add(latency_ms=pending.msg.camera_to_action_ms,
                            after_inference_ms=(published_ns - pending.inference_end_ns) / 1e6)
            self._stats_pub.publish(pending.msg)
        for pending in result.dropped:
            self._stats_pub.publish(pending.msg)  # camera_to_action_ms stays NaN: never executed

    def _publish_result(self, result: TickResult) -> None:
        if result.arm is not None:
            stamp = self.node.get_clock().now().to_msg()
            if self._mode == "joint_trajectory":
                msg = messages.trajectory_msg(stamp, self._frame_id, self._arm_names, result.arm,
                                              self._settings.control.limits.period_s)
            elif self._mode == "ee_twist":
                msg = messages.twist_msg(stamp, self._frame_id, *twist_from_command(result.arm))
            elif self._mode == "ee_pose":
                pose = pose_from_command(result.arm)
                if pose is None:
                    self._report_bad("nan_action", "pose action has a zero quaternion; step skipped")
                    msg = None
                else:
                    msg = messages.pose_msg(stamp, self._frame_id, *pose)
            else:
                msg = messages.joint_state_msg(stamp, self._arm_names, result.arm)
            if msg is not None:
                self._action_pub.publish(msg)
        if result.gripper is not None and self._gripper_pub is not None:
            self._gripper_pub.publish(Float64(data=result.gripper))

    # ================================================================ diagnostics (1 Hz)
    def _publish_diagnostics(self) -> None:
        settings, controller = self._settings, self.controller
        extra = {"device": str(self.policy.device), "threshold": f"{settings.threshold:g}",
                 "keep_fraction": f"{settings.keep_fraction:g}",
                 "enable_output": str(settings.control.enable_output).lower(),
                 "emergency_stop": str(controller.emergency_stopped).lower(), "active": str(self._active).lower(),
                 "action_mode": self._mode, "cameras": ",".join(self._cameras),
                 **{f"age_s.{name}": f"{age:.3f}" for name, age in controller.input_ages().items()}}
        array = DiagnosticArray()
        array.header.stamp = self.node.get_clock().now().to_msg()
        array.status = [self._stats.status(f"{self.node.get_name()}: policy", str(self.policy.device),
                                           level_and_message(controller.emergency_stopped, controller.reason),
                                           extra, controller.counts, dict(self._bad.counts))]
        self._diag_pub.publish(array)
