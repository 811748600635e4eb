"""The ROS side of a replay: this process's rclpy node (publishers of the bag's topics, recording of
ActionChunk and RouterStats by frame stamp) and the policy_node subprocesses it starts."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from actdistill_ros.data.config import COMPRESSED_IMAGE_TYPE, JOINT_STATE_TYPE, STRING_TYPE
from actdistill_ros.replay_report import FrameRecord, PolicyReplay
from actdistill_ros.ros.env import config_file, ros_environment
from actdistill_ros.ros.launch_arguments import dry_run_action_scale
from actdistill_ros.ros.replay import log
from actdistill_ros.ros.replay.bag_inspection import BagPlan, header_stamp_ns
from actdistill_ros.ros.ros_process import BackgroundRos, NodeProcess, node_command
from actdistill_ros.weights import ModelCard

SPAWNED_NODE_NAMES = {"student": "replay_student", "teacher": "replay_teacher"}
PRIMING_STAMP_NS = 1  # stamp of the warm-up frame: no recorded frame has it


class ReplayError(RuntimeError):
    """The replay could not run to the end; the message is one line."""


def _action_mode(card: ModelCard) -> str:
    """An action.mode that fits the card (outputs are off in a replay; the node only checks it)."""
    space = card.action_space
    arm_dims = space.dim - (space.gripper_index is not None)
    if space.kind == "joint":
        return "joint_state"
    return {3: "ee_twist", 6: "ee_twist", 7: "ee_pose"}.get(arm_dims, "ee_twist")


class SpawnedNode:
    """policy_node as a subprocess on this replay's private domain, output in a log file."""

    def __init__(self, role: str, weights: Path, card: ModelCard, plan: BagPlan, publish_as: dict[str, str],
                 args: argparse.Namespace, domain_id: int, work_dir: Path):
        self.name = SPAWNED_NODE_NAMES[role]
        params = self.parameters(role, weights, card, plan, publish_as, args)
        params_file = args.params_file or config_file("policy.yaml")
        env = ros_environment(domain_id=domain_id)
        env["ROS_LOG_DIR"] = str(work_dir / f"{self.name}_ros_log")
        self.process = NodeProcess(node_command("actdistill_ros.ros.policy_node", params, params_file, self.name),
                                   work_dir / f"{self.name}.log", env=env, name=f"policy node {self.name}")

    @staticmethod
    def parameters(role: str, weights: Path, card: ModelCard, plan: BagPlan, publish_as: dict[str, str],
                   args: argparse.Namespace) -> dict:
        """The node's parameters over the params file: a dry run reading the bag's topics (as published)."""
        name = SPAWNED_NODE_NAMES[role]
        # Always explicit: the params file need not carry one, and the card's default is what --threshold overrides.
        threshold = args.threshold if role == "student" and args.threshold is not None else card.default_threshold
        params = {
            "weights_path": str(weights), "device": args.device, "enable_output": False,
            # Recorded stamps lie in the past: a dry run judges input ages by receipt (refused with output on).
            "watchdog.age_from": "receipt",
            "camera.transports": plan.camera_transports(),  # per camera, from the bag's message types
            "topics.cameras": [publish_as[camera] for camera in plan.camera_topics],
            "topics.command": publish_as[plan.command_topic],
            "state.enabled": card.state_dim > 0,
            "topics.action_chunk": f"/{name}/action_chunk", "topics.router_stats": f"/{name}/router_stats",
            "action.mode": _action_mode(card), "router.threshold": float(threshold),
        }
        # A card in normalized units needs an action.scale to start; a dry run commands nothing, so 1.0 will do.
        params.update(dry_run_action_scale(card.action_space.units, card.action_space.gripper_index))
        if role == "student" and args.threshold is not None:
            params["router.keep_fraction"] = 0.0  # --threshold means threshold routing (keep would override it)
        if plan.state_topic:
            params["topics.state"] = publish_as[plan.state_topic]
        return params

    def failure(self) -> str | None:
        """One line on why the node exited, or None while it runs."""
        return self.process.failure()

    def stop(self) -> None:
        self.process.stop()  # SIGINT: the node's clean shutdown


@dataclass
class Pending:
    """Frame sets of the bag being replayed, by their first camera's stamp, and what came back for them."""

    replay: PolicyReplay
    bag: str = ""
    by_stamp: dict[int, FrameRecord] = field(default_factory=dict)
    accept_unknown_from: dict[str, set[int]] | None = None  # listen-only: per camera, the stamps of this bag's frames
    newest: dict[str, int] = field(default_factory=dict)  # per camera: stamp of its newest frame sent (seen)
    primed: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)
    last_camera_mono: float = 0.0
    foreign_names: list[str] | None = None  # action names of a chunk that do not match the card

    def frame_set_stamps(self) -> list[int]:
        """Per camera, the stamp of its newest frame so far (0: none): what a frame set opened now holds."""
        return [self.newest.get(camera, 0) for camera in self.replay.camera_topics]


def _chunk_problem(chunk_size: int, action_dim: int, actions: np.ndarray) -> str | None:
    """Why an ActionChunk cannot be read as a (chunk_size, action_dim) array of finite values, or None."""
    if chunk_size < 1 or action_dim < 1:
        return f"chunk_size {chunk_size} x action_dim {action_dim}, expected both >= 1"
    if actions.size != chunk_size * action_dim:
        return (f"{actions.size} actions, expected chunk_size x action_dim = {chunk_size} x {action_dim} "
                f"= {chunk_size * action_dim}")
    if not np.isfinite(actions).all():
        return "non-finite actions (NaN or inf)"
    return None


class RosReplay(BackgroundRos):
    """rclpy context, node and executor thread of the replay process."""

    def __init__(self, domain_id: int | None):
        from actdistill_ros.msg import ActionChunk, RouterStats

        self.ActionChunk, self.RouterStats = ActionChunk, RouterStats
        self._publishers: dict[tuple[str, str], object] = {}
        self._subscriptions: list = []
        self.pending: Pending | None = None
        super().__init__(f"replay_eval_{os.getpid()}", domain_id)

    # ---------------------------------------------------------------- publishers
    def publisher(self, topic: str, msgtype: str):
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CompressedImage, Image, JointState
        from std_msgs.msg import String

        key = (topic, msgtype)
        if key not in self._publishers:
            cls = {"sensor_msgs/msg/Image": Image, COMPRESSED_IMAGE_TYPE: CompressedImage, STRING_TYPE: String,
                   JOINT_STATE_TYPE: JointState}[msgtype]
            # The command is latched like a recorder's transient-local publisher; frames and states are not.
            durability = DurabilityPolicy.TRANSIENT_LOCAL if msgtype == STRING_TYPE else DurabilityPolicy.VOLATILE
            qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=durability)
            self._publishers[key] = self.node.create_publisher(cls, topic, qos)
        return self._publishers[key]

    # ---------------------------------------------------------------- recording
    def record(self, pending: Pending, chunk_topic: str, stats_topic: str,
               cameras: dict[str, str] | None = None, camera_types: dict[str, str] | None = None) -> None:
        """Route ActionChunk / RouterStats (and, listen-only, the frames of ``cameras``: bag topic ->
        topic to listen on, each of its ``camera_types[bag topic]``) into ``pending``."""
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CompressedImage, Image

        for sub in self._subscriptions:
            self.node.destroy_subscription(sub)
        self._subscriptions = []
        self.pending = pending
        reliable = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self._subscriptions.append(self.node.create_subscription(self.ActionChunk, chunk_topic, self._on_chunk, reliable))
        self._subscriptions.append(self.node.create_subscription(self.RouterStats, stats_topic, self._on_stats, reliable))
        best_effort = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.BEST_EFFORT)
        for index, (bag_topic, topic) in enumerate((cameras or {}).items()):
            callback = functools.partial(self._on_camera, bag_topic, index == 0)
            cls = CompressedImage if camera_types[bag_topic] == COMPRESSED_IMAGE_TYPE else Image
            self._subscriptions.append(self.node.create_subscription(cls, topic, callback, best_effort, raw=True))

    @staticmethod
    def _received_ns(info) -> int:
        return int(info.get("received_timestamp") or 0) or time.time_ns()

    def _on_chunk(self, msg, info) -> None:
        received_ns = self._received_ns(info)
        pending = self.pending
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        actions = np.asarray(msg.actions, dtype=np.float32)
        problem = _chunk_problem(msg.chunk_size, msg.action_dim, actions)
        with pending.changed:
            if problem:  # counted, never compared: one bad message must not end the replay
                pending.replay.malformed_chunks += 1
                level = logging.WARNING if pending.replay.malformed_chunks == 1 else logging.DEBUG
                log.log(level, "%s: malformed ActionChunk (stamp %d): %s; counted in the report as malformed_chunks",
                        pending.replay.role, stamp, problem)
            elif list(msg.names) != pending.replay.action_names or msg.action_dim != len(pending.replay.action_names):
                pending.foreign_names = list(msg.names)  # another model than --weights: no valid comparison
            elif stamp == PRIMING_STAMP_NS:
                pending.primed.set()
            else:
                frame = pending.by_stamp.get(stamp)
                if frame is None:
                    pending.replay.unmatched_chunks += 1
                elif frame.chunk is None:  # the first chunk for a frame counts
                    frame.chunk = actions.reshape(msg.chunk_size, msg.action_dim)
                    frame.chunk_received_ns = received_ns
            pending.changed.notify_all()

    def _on_stats(self, msg, info) -> None:
        pending = self.pending
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        with pending.changed:
            frame = pending.by_stamp.get(stamp)
            if frame is not None and frame.layer_mask is None:
                frame.layer_mask = [bool(v) for v in msg.layer_mask]
                frame.executed_fraction = float(msg.executed_fraction)
                frame.inference_ms = float(msg.inference_ms)
                node_ms = float(msg.camera_to_action_ms)
                frame.node_camera_to_action_ms = node_ms if np.isfinite(node_ms) else None
                if msg.source_stamps:
                    frame.source_stamps = [t.sec * 1_000_000_000 + t.nanosec for t in msg.source_stamps]
                pending.changed.notify_all()

    def _on_camera(self, bag_topic: str, first: bool, raw: bytes, info) -> None:
        """Listen-only: a frame of camera ``bag_topic`` (``first``: it opens a frame set) was seen."""
        received_ns = self._received_ns(info)
        pending = self.pending
        stamp = header_stamp_ns(raw)
        with pending.changed:
            if stamp not in pending.accept_unknown_from[bag_topic]:
                return
            pending.replay.camera_frames.setdefault(bag_topic, set()).add((pending.bag, stamp))
            pending.last_camera_mono = time.monotonic()
            pending.newest[bag_topic] = max(stamp, pending.newest.get(bag_topic, 0))
            if first and stamp not in pending.by_stamp:
                frame = FrameRecord(pending.bag, stamp, received_ns, newest_stamps=pending.frame_set_stamps())
                pending.by_stamp[stamp] = frame
                pending.replay.frames.append(frame)
                pending.changed.notify_all()

    # ---------------------------------------------------------------- waiting
    def wait_for_chunk(self, pending: Pending, stamp: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with pending.changed:
            return pending.changed.wait_for(lambda: pending.by_stamp[stamp].chunk is not None,
                                            timeout=max(0.0, deadline - time.monotonic()))

    def wait_for_stats(self, pending: Pending, timeout: float, stamp: int | None = None) -> bool:
        """Until every frame set that got a chunk (or the one of ``stamp``) also has its RouterStats (the
        node sends them at its next control tick, after the chunk)."""
        def answered(frame: FrameRecord) -> bool:
            return frame.chunk is None or frame.layer_mask is not None

        def done() -> bool:
            frames = [pending.by_stamp[stamp]] if stamp is not None else pending.by_stamp.values()
            return all(map(answered, frames))

        with pending.changed:
            return pending.changed.wait_for(done, timeout=timeout)

    def node_parameters(self, node_name: str, names: list[str], timeout: float) -> dict:
        """{name: value} of the attached node's parameters; None for one it does not have."""
        from rcl_interfaces.srv import GetParameters
        from rclpy.parameter import parameter_value_to_python

        client = self.node.create_client(GetParameters, f"{node_name}/get_parameters")

        def ask(asked: list[str]) -> list:
            future = client.call_async(GetParameters.Request(names=asked))
            deadline = time.monotonic() + timeout
            while not future.done() and time.monotonic() < deadline:
                time.sleep(0.02)
            if not future.done():
                raise ReplayError(f"--attach {node_name}: get_parameters did not answer within {timeout:g} s")
            return list(future.result().values)

        try:
            if not client.wait_for_service(timeout_sec=timeout):
                raise ReplayError(f"--attach {node_name}: no such node answers on ROS_DOMAIN_ID "
                                  f"{os.environ.get('ROS_DOMAIN_ID', '0')} within {timeout:g} s")
            values = ask(names)
            if len(values) != len(names):  # one name it lacks (another version) empties the whole answer
                values = [next(iter(ask([name])), None) for name in names]
            return {n: None if v is None else parameter_value_to_python(v) for n, v in zip(names, values)}
        finally:
            self.node.destroy_client(client)
