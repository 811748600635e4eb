"""`actdistill replay-eval`: play recorded rosbag2 demos through the policy node and report.

    actdistill replay-eval BAG... --weights W [--teacher T] [--rate 1.0|max] [--out DIR]
    ros2 run actdistill_ros replay_eval BAG... --weights W ...

Each bag's camera, command and state messages are published over DDS as the raw CDR bytes from
the bag (no re-encoding) at the recorded timing (``--rate 1.0``, or a multiple) or, with
``--rate max``, each frame as soon as the ActionChunk for the previous one came back (a frame
without a chunk within ``--frame-timeout`` counts as dropped). The node's ActionChunk and
RouterStats messages are recorded; each chunk's first step is compared with the bag's recorded
action at that frame (aligned by ``read_episode``). ``--teacher`` replays the same bags through a
second node afterwards and adds student-vs-teacher agreement.

Nodes: by default a policy_node subprocess per policy on a private ROS domain with
``enable_output: false`` (a replay never commands a robot); ``--attach NODE`` uses a running
node on the current ROS_DOMAIN_ID instead; ``--listen-only`` (with ``--attach``) publishes
nothing and only records and compares while ``ros2 bag play`` publishes (launch/replay_eval.launch.py).

Latency: frames keep the bag's header stamps, which the node copies into ActionChunk.header; the
stamp identifies the frame. Camera-to-action = the time the ActionChunk arrived here (middleware
receive timestamp) minus the time this process published that frame, both read from this
machine's clock, so no clock offset between processes or with the recording enters it. It
includes frame transport, the node's queueing and inference, and the chunk's transport back.
In --listen-only mode the frame's time is when this process received the camera message.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from rosbags.rosbag2 import Reader
from tqdm import tqdm

from actdistill_ros.data import BagDataError, TopicConfig, list_bags, read_episode
from actdistill_ros.data.config import ACTION_TYPES, CAMERA_TYPES, COMPRESSED_IMAGE_TYPE, JOINT_STATE_TYPE, STRING_TYPE
from actdistill_ros.replay_report import FrameRecord, PolicyReplay, RecordedActions, write_report
from actdistill_ros.ros.env import (built_messages_path, config_file, fastdds_profile_path, reserve_domain_id,
                                    ros_environment)
from actdistill_ros.ros.ros_process import BackgroundRos, NodeProcess, node_command
from actdistill_ros.weights import ModelCard, read_card, resolve_weights_path

log = logging.getLogger("actdistill_ros.replay_eval")

SPAWNED_NODE_NAMES = {"student": "replay_student", "teacher": "replay_teacher"}
PRIMING_STAMP_NS = 1  # stamp of the warm-up frame: no recorded frame has it
PRIMING_PERIOD_S = 0.5
REEXEC_MARK = "_ACTDISTILL_REPLAY_EVAL_CHILD"
LATENCY_DEFINITION = (
    "camera-to-action = time the ActionChunk reached the replay process (middleware receive timestamp) "
    "minus the time the replay process published that camera frame (listen-only: received it), matched by "
    "the frame's header stamp; both times come from the replay machine's clock. node_camera_to_action is "
    "the node's own RouterStats figure (its receipt of the frame -> first action published).")


class ReplayError(RuntimeError):
    """The replay could not run to the end; the message is one line."""


# ================================================================ command line
def add_parser(subparsers) -> None:
    p = subparsers.add_parser("replay-eval", help="play rosbag2 demos through the policy node and report "
                                                  "action error, latency and router usage")
    _add_arguments(p)
    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="replay_eval", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _add_arguments(parser)
    return parser


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bags", nargs="+", type=Path, metavar="BAG", help="rosbag2 directory, or a directory of them")
    p.add_argument("--weights", type=Path, required=True,
                   help="policy to evaluate (called 'student' in the report); with --attach, the weights the node runs")
    p.add_argument("--teacher", type=Path, help="also replay through this policy and report agreement with it")
    p.add_argument("--rate", default="1.0",
                   help="recorded timing x RATE, or 'max': next frame when the previous chunk arrived (default 1.0)")
    p.add_argument("--out", type=Path, default=Path("replay_eval_report"), help="report directory (created atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--threshold", type=float, help="router threshold for the student node (default: the card's)")
    p.add_argument("--device", default="auto", help="torch device of the spawned nodes: auto, cpu, cuda, cuda:N")
    p.add_argument("--remap", action="append", default=[], metavar="/FROM:=/TO",
                   help="publish bag topic /FROM as /TO (repeatable)")
    defaults = TopicConfig()
    p.add_argument("--camera-topic", default=defaults.camera_topic, help="camera topic in the bag (Image or CompressedImage)")
    p.add_argument("--command-topic", default=defaults.command_topic, help="instruction topic in the bag (std_msgs/String)")
    p.add_argument("--state-topic", default=defaults.state_topic,
                   help="robot state topic in the bag (JointState); used when the policy takes a state")
    p.add_argument("--action-topic", default=defaults.action_topic,
                   help="recorded action topic (JointState, TwistStamped or PoseStamped)")
    p.add_argument("--sync-tolerance-ms", type=float, default=defaults.sync_tolerance_ms,
                   help="a frame is compared only if a recorded action lies within this many ms of it")
    p.add_argument("--attach", metavar="NODE_NAME", help="use this running policy node instead of starting one")
    p.add_argument("--listen-only", action="store_true",
                   help="publish nothing, only record and compare (another player, e.g. ros2 bag play, publishes); needs --attach")
    p.add_argument("--params-file", type=Path, help="params YAML for spawned nodes (default: the package's config/policy.yaml)")
    p.add_argument("--frame-timeout", type=float, default=5.0,
                   help="seconds to wait for a frame's chunk (--rate max), and for the last chunks of a bag")
    p.add_argument("--startup-timeout", type=float, default=90.0, help="seconds for a node to answer its first frame")
    p.add_argument("--idle-timeout", type=float, default=5.0,
                   help="--listen-only: stop this many seconds after the last camera message")


# ================================================================ bags (no ROS needed)
@dataclass
class BagPlan:
    """What one bag holds and how it is replayed; built and checked before anything starts."""

    path: Path
    camera_topic: str
    camera_type: str
    command_topic: str
    state_topic: str | None
    action_topic: str
    action_type: str
    camera_stamps: list[int]  # header stamps of the camera frames in bag order (0 -> receive time)
    message_count: int  # messages to publish (camera + command + state)
    source_hw: tuple[int, int]
    encoding: str
    storage: str
    recorded: RecordedActions

    @property
    def name(self) -> str:
        return str(self.path)

    def topics(self) -> list[str]:
        return [t for t in (self.camera_topic, self.command_topic, self.state_topic) if t]


def _bag_error(path: Path, topic: str | None, what: str) -> BagDataError:
    return BagDataError(f"bag {str(path)!r}" + (f" topic {topic!r}" if topic else "") + f": {what}")


def _header_stamp_ns(raw: bytes) -> int:
    """Header stamp of a serialized Image/CompressedImage (the header comes first in the CDR body)."""
    fmt = "<iI" if raw[1] == 1 else ">iI"
    sec, nanosec = struct.unpack_from(fmt, raw, 4)
    return sec * 1_000_000_000 + nanosec


def _with_header_stamp(raw: bytes, stamp_ns: int) -> bytes:
    fmt = "<iI" if raw[1] == 1 else ">iI"
    patched = bytearray(raw)
    struct.pack_into(fmt, patched, 4, stamp_ns // 1_000_000_000, stamp_ns % 1_000_000_000)
    return bytes(patched)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def inspect_bag(path: Path, args: argparse.Namespace, cards: list[ModelCard]) -> BagPlan:
    """Check that ``path`` can be replayed for every card; raise BagDataError (one line) if not."""
    card = cards[0]
    needs_state = card.state_dim > 0
    if not (path / "metadata.yaml").is_file():
        raise _bag_error(path, None, "metadata.yaml is missing, expected a rosbag2 directory (metadata.yaml + .mcap/.db3)")
    try:
        with Reader(path) as reader:
            present = {topic: info.msgtype for topic, info in reader.topics.items()}
        info = yaml.safe_load((path / "metadata.yaml").read_text()).get("rosbag2_bagfile_information", {})
        storage = info.get("storage_identifier", "unknown")
    except Exception as err:  # rosbags/sqlite/mcap errors on damaged storage
        raise _bag_error(path, None, f"cannot open ({_first_line(err)}); expected an intact rosbag2 mcap/sqlite3 bag") from None
    present_text = ", ".join(f"{t} ({present[t]})" for t in sorted(present)) or "none"
    wanted = {args.camera_topic: CAMERA_TYPES, args.command_topic: (STRING_TYPE,), args.action_topic: ACTION_TYPES}
    if needs_state:
        if not args.state_topic:
            raise _bag_error(path, None, f"the policy needs the robot state ({card.state_dim} values) but no --state-topic is given")
        wanted[args.state_topic] = (JOINT_STATE_TYPE,)
    for topic, types in wanted.items():
        if topic not in present:
            raise _bag_error(path, topic, f"not in bag, expected {' or '.join(types)}; topics present: {present_text}")
        if present[topic] not in types:
            raise _bag_error(path, topic, f"has type {present[topic]}, expected {' or '.join(types)}")
    state_topic = args.state_topic if needs_state else None
    topics = TopicConfig(camera_topic=args.camera_topic, command_topic=args.command_topic, state_topic=state_topic,
                         action_topic=args.action_topic, action_type=present[args.action_topic],
                         sync_tolerance_ms=args.sync_tolerance_ms)
    # Recorded actions aligned to the frames; also proves every message decodes (corrupt storage,
    # truncated bags, unsupported encodings all fail here, before any node starts).
    episode = read_episode(path, topics, image_size=card.image_size)
    actions = episode.actions
    names = list(card.action_space.names)
    if actions.shape[1] != len(names):
        raise _bag_error(path, args.action_topic, f"recorded actions have {actions.shape[1]} dims "
                                                  f"{episode.action_names}, expected {len(names)} like the policy {names}")
    if set(episode.action_names) == set(names) and episode.action_names != names:
        actions = actions[:, [episode.action_names.index(n) for n in names]]  # bag order -> policy order
    for other in cards[1:]:
        if list(other.action_space.names) != names or other.state_dim != card.state_dim:
            raise ValueError(f"teacher and student differ in action names ({list(other.action_space.names)} vs {names}) "
                             f"or state size ({other.state_dim} vs {card.state_dim}): they cannot be compared")

    stamps, count, encoding = [], 0, ""
    with Reader(path) as reader:
        connections = [c for c in reader.connections if c.topic in (args.camera_topic, args.command_topic, state_topic)]
        for conn, receive_ns, raw in reader.messages(connections=connections):
            count += 1
            if conn.topic == args.camera_topic:
                stamps.append(_header_stamp_ns(raw) or receive_ns)
                if not encoding:
                    from actdistill_ros.data.bag_writer import jazzy_typestore
                    msg = jazzy_typestore().deserialize_cdr(raw, conn.msgtype)
                    encoding = msg.format if conn.msgtype == COMPRESSED_IMAGE_TYPE else msg.encoding
    h, w = episode.source_image_size
    if (h, w) != (card.image_size, card.image_size):
        log.warning("bag %s topic %s: frames are %dx%d, the policy was trained on %dx%d: the node resizes every "
                    "frame", path.name, args.camera_topic, w, h, card.image_size, card.image_size)
    return BagPlan(path=path, camera_topic=args.camera_topic, camera_type=present[args.camera_topic],
                   command_topic=args.command_topic, state_topic=state_topic, action_topic=args.action_topic,
                   action_type=present[args.action_topic], camera_stamps=stamps, message_count=count,
                   source_hw=(h, w), encoding=encoding, storage=str(storage),
                   recorded=RecordedActions(str(path), episode.stamps_ns, actions))


def _bag_messages(plan: BagPlan):
    """(topic, receive_ns, raw) in recorded order; among messages with one timestamp the camera goes
    last, so the node already has the command and state that belong to a frame when it arrives."""
    with Reader(plan.path) as reader:
        connections = [c for c in reader.connections if c.topic in plan.topics()]
        stream = ((c.topic, t, bytes(raw)) for c, t, raw in reader.messages(connections=connections))
        for _, group in itertools.groupby(stream, key=lambda m: m[1]):
            yield from sorted(group, key=lambda m: m[0] == plan.camera_topic)


# ================================================================ ROS side
def _rate(text: str) -> float:
    if str(text).lower() == "max":
        return float("inf")
    try:
        rate = float(text)
    except ValueError:
        rate = float("nan")
    if not rate > 0 or rate == float("inf"):
        raise ValueError(f"--rate {text!r}: expected a positive number (1.0 = recorded timing) or 'max'")
    return rate


def _parse_remaps(items: list[str]) -> dict[str, str]:
    remaps = {}
    for item in items:
        source, sep, target = item.partition(":=")
        if not sep or not source.startswith("/") or not target.startswith("/"):
            raise ValueError(f"--remap {item!r}: expected /from:=/to with absolute topic names")
        remaps[source] = target
    return remaps


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
        # Always explicit: the params file need not carry one, and the card's default is what --threshold overrides.
        threshold = args.threshold if role == "student" and args.threshold is not None else card.default_threshold
        params = {
            "weights_path": str(weights), "device": args.device, "enable_output": False,
            "camera.transport": "compressed" if plan.camera_type == COMPRESSED_IMAGE_TYPE else "raw",
            "topics.camera": publish_as[plan.camera_topic], "topics.command": publish_as[plan.command_topic],
            "state.enabled": card.state_dim > 0,
            "topics.action_chunk": f"/{self.name}/action_chunk", "topics.router_stats": f"/{self.name}/router_stats",
            "action.mode": _action_mode(card), "router.threshold": float(threshold),
        }
        if plan.state_topic:
            params["topics.state"] = publish_as[plan.state_topic]
        params_file = args.params_file or config_file("policy.yaml")
        env = ros_environment(domain_id=domain_id)
        env["ROS_LOG_DIR"] = str(work_dir / f"{self.name}_ros_log")
        self.process = NodeProcess(node_command("actdistill_ros.ros.policy_node", params, params_file, self.name),
                                   work_dir / f"{self.name}.log", env=env, name=f"policy node {self.name}")

    def failure(self) -> str | None:
        """One line on why the node exited, or None while it runs."""
        return self.process.failure()

    def stop(self) -> None:
        self.process.stop()  # SIGINT: the node's clean shutdown


@dataclass
class _Pending:
    """Frames of the bag being replayed, by stamp, and what came back for them."""

    replay: PolicyReplay
    bag: str = ""
    by_stamp: dict[int, FrameRecord] = field(default_factory=dict)
    accept_unknown_from: set[int] | None = None  # listen-only: stamps that are frames of this bag
    primed: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)
    last_camera_mono: float = 0.0
    foreign_names: list[str] | None = None  # action names of a chunk that do not match the card


class RosReplay(BackgroundRos):
    """rclpy context, node and executor thread of the replay process."""

    def __init__(self, domain_id: int | None):
        from actdistill_ros.msg import ActionChunk, RouterStats

        self.ActionChunk, self.RouterStats = ActionChunk, RouterStats
        self._publishers: dict[tuple[str, str], object] = {}
        self._subscriptions: list = []
        self.pending: _Pending | None = None
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
    def record(self, pending: _Pending, chunk_topic: str, stats_topic: str, camera: tuple[str, str] | None = None) -> None:
        """Route ActionChunk / RouterStats (and, listen-only, camera frames) into ``pending``."""
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CompressedImage, Image

        for sub in self._subscriptions:
            self.node.destroy_subscription(sub)
        self._subscriptions = []
        self.pending = pending
        reliable = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self._subscriptions.append(self.node.create_subscription(self.ActionChunk, chunk_topic, self._on_chunk, reliable))
        self._subscriptions.append(self.node.create_subscription(self.RouterStats, stats_topic, self._on_stats, reliable))
        if camera is not None:
            topic, msgtype = camera
            cls = CompressedImage if msgtype == COMPRESSED_IMAGE_TYPE else Image
            best_effort = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.BEST_EFFORT)
            self._subscriptions.append(self.node.create_subscription(cls, topic, self._on_camera, best_effort, raw=True))

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

    def _on_camera(self, raw: bytes, info) -> None:
        received_ns = self._received_ns(info)
        pending = self.pending
        stamp = _header_stamp_ns(raw)
        with pending.changed:
            if stamp in pending.accept_unknown_from and stamp not in pending.by_stamp:
                frame = FrameRecord(pending.bag, stamp, received_ns)
                pending.by_stamp[stamp] = frame
                pending.replay.frames.append(frame)
                pending.last_camera_mono = time.monotonic()
                pending.changed.notify_all()

    # ---------------------------------------------------------------- waiting
    def wait_for_chunk(self, pending: _Pending, stamp: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with pending.changed:
            return pending.changed.wait_for(lambda: pending.by_stamp[stamp].chunk is not None,
                                            timeout=max(0.0, deadline - time.monotonic()))

    def node_parameters(self, node_name: str, names: list[str], timeout: float) -> dict:
        from rcl_interfaces.srv import GetParameters
        from rclpy.parameter import parameter_value_to_python

        client = self.node.create_client(GetParameters, f"{node_name}/get_parameters")
        try:
            if not client.wait_for_service(timeout_sec=timeout):
                raise ReplayError(f"--attach {node_name}: no such node answers on ROS_DOMAIN_ID "
                                  f"{os.environ.get('ROS_DOMAIN_ID', '0')} within {timeout:g} s")
            future = client.call_async(GetParameters.Request(names=names))
            deadline = time.monotonic() + timeout
            while not future.done() and time.monotonic() < deadline:
                time.sleep(0.02)
            if not future.done():
                raise ReplayError(f"--attach {node_name}: get_parameters did not answer within {timeout:g} s")
            return {n: parameter_value_to_python(v) for n, v in zip(names, future.result().values)}
        finally:
            self.node.destroy_client(client)


# ================================================================ one policy through all bags
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


class Player:
    def __init__(self, ros: RosReplay, args: argparse.Namespace, rate: float, publish_as: dict[str, str]):
        self.ros, self.args, self.rate, self.publish_as = ros, args, rate, publish_as

    def _publish(self, plan: BagPlan, topic: str, raw: bytes) -> None:
        msgtype = plan.camera_type if topic == plan.camera_topic else (
            STRING_TYPE if topic == plan.command_topic else JOINT_STATE_TYPE)
        self.ros.publisher(self.publish_as[topic], msgtype).publish(raw)

    def prime(self, plan: BagPlan, pending: _Pending, node_failure) -> None:
        """Send the bag's first command and state, then a warm-up frame until a chunk comes back."""
        first: dict[str, bytes] = {}
        for topic, _, raw in _bag_messages(plan):
            first.setdefault(topic, raw)
            if len(first) == len(plan.topics()):
                break
        for topic in (plan.command_topic, plan.state_topic):
            if topic:
                self._publish(plan, topic, first[topic])
        warm_up = _with_header_stamp(first[plan.camera_topic], PRIMING_STAMP_NS)
        started = time.monotonic()
        deadline = started + self.args.startup_timeout
        while not pending.primed.is_set():
            failure = node_failure()
            if failure:
                raise ReplayError(failure)
            if time.monotonic() > deadline:
                raise ReplayError(f"no ActionChunk came back within {self.args.startup_timeout:g} s of sending frames "
                                  f"on {self.publish_as[plan.camera_topic]}")
            if plan.state_topic:
                self._publish(plan, plan.state_topic, first[plan.state_topic])
            self._publish(plan, plan.camera_topic, warm_up)
            pending.primed.wait(PRIMING_PERIOD_S)
        log.info("%s: first ActionChunk %.1f s after the node was started", pending.replay.role,
                 time.monotonic() - started)
        time.sleep(0.2)  # let a second warm-up chunk in flight arrive before the real frames

    def play(self, plan: BagPlan, pending: _Pending, node_failure) -> None:
        replay = pending.replay
        with pending.changed:
            pending.bag, pending.by_stamp = plan.name, {}
        seen: set[int] = set()
        last_stamp = None
        started = time.monotonic()
        bar = tqdm(total=plan.message_count, desc=f"{replay.role} {plan.path.name}", unit="msg", file=sys.stderr,
                   dynamic_ncols=True, mininterval=0.5)
        try:
            bag_start_ns = None
            for topic, receive_ns, raw in _bag_messages(plan):
                bag_start_ns = receive_ns if bag_start_ns is None else bag_start_ns
                if np.isfinite(self.rate):
                    delay = started + (receive_ns - bag_start_ns) / 1e9 / self.rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                if topic != plan.camera_topic:
                    self._publish(plan, topic, raw)
                else:
                    stamp = _header_stamp_ns(raw)
                    if stamp == 0:  # no header stamp: the receive time keys the frame, as in read_episode
                        stamp = receive_ns
                        raw = _with_header_stamp(raw, stamp)
                    if stamp in seen:
                        bar.update(1)
                        continue  # a repeated stamp cannot be told apart from the first
                    seen.add(stamp)
                    frame = FrameRecord(plan.name, stamp, 0)
                    with pending.changed:
                        pending.by_stamp[stamp] = frame
                        replay.frames.append(frame)
                    frame.sent_ns = time.time_ns()
                    self._publish(plan, topic, raw)
                    last_stamp = stamp
                    if not np.isfinite(self.rate):  # --rate max: next frame when this chunk is back
                        if not self.ros.wait_for_chunk(pending, stamp, self.args.frame_timeout):
                            failure = node_failure()
                            if failure:
                                raise ReplayError(failure)
                replay.messages_published += 1
                bar.update(1)
                bar.set_postfix(chunks=sum(f.chunk is not None for f in pending.by_stamp.values()), refresh=False)
            replay.replay_seconds += time.monotonic() - started
        finally:
            bar.close()
        # Last chunks: the node works newest-first, so once the last frame's chunk is in nothing older comes.
        if last_stamp is not None and np.isfinite(self.rate):
            self.ros.wait_for_chunk(pending, last_stamp, self.args.frame_timeout)
        failure = node_failure()
        if failure:
            raise ReplayError(failure)

    def listen(self, plan: BagPlan, pending: _Pending) -> None:
        """--listen-only: record until every frame of the bag was seen or the camera went quiet."""
        replay = pending.replay
        expected = set(plan.camera_stamps)
        with pending.changed:
            pending.bag, pending.by_stamp, pending.accept_unknown_from = plan.name, {}, expected
        bar = tqdm(total=len(expected), desc=f"listening {plan.path.name}", unit="frame", file=sys.stderr,
                   dynamic_ncols=True, mininterval=0.5)
        start = time.monotonic()
        first_seen = None
        try:
            while True:
                time.sleep(0.1)
                with pending.changed:
                    seen = len(pending.by_stamp)
                    last = pending.last_camera_mono
                    chunks = sum(f.chunk is not None for f in pending.by_stamp.values())
                bar.n = seen
                bar.set_postfix(chunks=chunks, refresh=True)
                now = time.monotonic()
                if seen and first_seen is None:
                    first_seen = now
                if seen == len(expected) or (seen and now - last > self.args.idle_timeout):
                    break
                if not seen and now - start > self.args.startup_timeout:
                    raise ReplayError(f"no camera frame of bag {plan.name!r} arrived on "
                                      f"{self.publish_as[plan.camera_topic]} within {self.args.startup_timeout:g} s")
        finally:
            bar.close()
        replay.replay_seconds += (last - first_seen) if first_seen else 0.0
        replay.messages_published += seen
        newest = max(pending.by_stamp, default=None)
        if newest is not None:
            self.ros.wait_for_chunk(pending, newest, self.args.frame_timeout)


# ================================================================ run
def _ros_messages_importable() -> bool:
    try:
        return importlib.util.find_spec("actdistill_ros.msg") is not None
    except ImportError:
        return False


def _reexec_command(args: argparse.Namespace) -> list[str] | None:
    """This process's command line as it was typed, or None where it is not known (an in-process call)."""
    if getattr(args, "command_line", None) is not None:  # main(): python -m / ros2 run replay_eval
        return [sys.executable, "-m", "actdistill_ros.ros.replay_eval", *args.command_line]
    if "replay-eval" in sys.argv[1:]:  # `actdistill ... replay-eval ...`
        return [sys.executable, "-m", "actdistill_ros.cli", *sys.argv[1:]]
    return None


def _reexec_with_ros_env(command: list[str]) -> int:
    """Run the same command line again in a child with the built messages on the paths (ros_environment)."""
    env = ros_environment(domain_id=int(os.environ.get("ROS_DOMAIN_ID") or 0))
    env[REEXEC_MARK] = "1"
    return subprocess.call(command, env=env)


def _load_card(path: Path) -> ModelCard:
    _, card_path = resolve_weights_path(path)  # WeightsError (a ValueError) names the path
    return read_card(card_path)


def run(args: argparse.Namespace) -> int:
    """The `actdistill replay-eval` entry: bad input raises ValueError (one line); a failed replay
    prints one line and returns 1. Nothing is written unless the whole report is."""
    try:
        return _run(args)
    except ReplayError as err:
        print(f"replay-eval: error: {err}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    rate = _rate(args.rate)
    remaps = _parse_remaps(args.remap)
    if args.listen_only and not args.attach:
        raise ValueError("--listen-only needs --attach NODE_NAME (the node that ros2 bag play feeds)")
    if args.teacher is not None and args.attach:
        raise ValueError("--teacher starts its own nodes; it cannot be combined with --attach")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold {args.threshold}: expected a value in [0, 1]")
    if args.out.exists() and not args.overwrite:
        raise ValueError(f"--out {args.out}: already exists; pass --overwrite to replace it")
    if not _ros_messages_importable():
        command = _reexec_command(args)
        if built_messages_path() is not None and command is not None and not os.environ.get(REEXEC_MARK):
            return _reexec_with_ros_env(command)
        raise ValueError("ROS 2 messages actdistill_ros/msg/ActionChunk are not available: build them with "
                         "scripts/build_msgs.sh (or colcon build) and source scripts/ros_env.sh (or the install)")

    # ---- everything is checked before anything starts
    cards = [_load_card(args.weights)]
    if args.teacher is not None:
        cards.append(_load_card(args.teacher))
    bags = list_bags(args.bags)
    if args.listen_only and len(bags) != 1:
        raise ValueError(f"--listen-only evaluates one bag (what ros2 bag play plays), got {len(bags)}")
    plans = [inspect_bag(path, args, cards) for path in bags]
    if len({p.camera_type for p in plans}) > 1:
        raise ValueError("bags mix sensor_msgs/Image and CompressedImage cameras: one node takes one transport; "
                         "replay them in separate runs")

    # ---- ROS environment of this process (before rclpy starts)
    if not args.attach:
        os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    else:
        os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    work_dir = Path(tempfile.mkdtemp(prefix="actdistill_replay_"))
    os.environ.setdefault("ROS_LOG_DIR", str(work_dir / "ros_log"))
    profile = fastdds_profile_path()
    if profile is not None:  # large frames: Fast DDS needs the profile in the PUBLISHER's process
        os.environ.setdefault("FASTRTPS_DEFAULT_PROFILES_FILE", str(profile))
        os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", os.environ["FASTRTPS_DEFAULT_PROFILES_FILE"])
    domain_id = None if args.attach else reserve_domain_id()  # spawned nodes: a private domain

    roles = [("student", args.weights, cards[0])] + ([("teacher", args.teacher, cards[1])] if args.teacher else [])
    try:
        replays = _replay_all(args, roles, plans, rate, remaps, domain_id, work_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)  # node logs; a failure's cause is in its one-line error
    node_desc = args.attach or ", ".join(SPAWNED_NODE_NAMES[r] for r, _, _ in roles)
    return _write(args, plans, cards, rate, replays, node_desc)


def _replay_all(args: argparse.Namespace, roles: list, plans: list[BagPlan], rate: float, remaps: dict[str, str],
                domain_id: int | None, work_dir: Path) -> list[PolicyReplay]:
    """Each policy in turn through every bag (spawned node, or the attached one)."""
    ros = RosReplay(domain_id)
    replays: list[PolicyReplay] = []
    try:
        for role, weights, card in roles:
            replay = PolicyReplay(role=role, weights=str(weights), kind=card.kind,
                                  action_names=list(card.action_space.names), num_layers=card.num_layers)
            replays.append(replay)
            pending = _Pending(replay)
            errors_before = ros.callback_errors
            publish_as = {t: remaps.get(t, t) for p in plans for t in p.topics()}
            node = None
            try:
                if args.attach:
                    node_name = args.attach if args.attach.startswith("/") else f"/{args.attach}"
                    params = ros.node_parameters(node_name, ["topics.camera", "topics.command", "topics.state",
                                                             "topics.action_chunk", "topics.router_stats",
                                                             "camera.transport"], args.startup_timeout)
                    if params["topics.action_chunk"] is None:
                        raise ReplayError(f"--attach {node_name}: the node has no topics.action_chunk parameter "
                                          "(not an actdistill policy_node, or one without ActionChunk output)")
                    wanted = "compressed" if plans[0].camera_type == COMPRESSED_IMAGE_TYPE else "raw"
                    if params["camera.transport"] != wanted:
                        raise ReplayError(f"--attach {node_name}: camera.transport is {params['camera.transport']}, "
                                          f"bag {plans[0].name!r} topic {plans[0].camera_topic!r} needs {wanted}")
                    resolve = lambda t: t.replace("~", node_name, 1) if t.startswith("~") else t  # noqa: E731
                    for p in plans:  # publish onto the node's inputs unless remapped explicitly
                        for bag_topic, key in ((p.camera_topic, "topics.camera"), (p.command_topic, "topics.command"),
                                               (p.state_topic, "topics.state")):
                            if bag_topic and bag_topic not in remaps:
                                publish_as[bag_topic] = resolve(params[key])
                    chunk_topic, stats_topic = resolve(params["topics.action_chunk"]), resolve(params["topics.router_stats"])
                    failure = lambda: None  # noqa: E731
                else:
                    node = SpawnedNode(role, weights, card, plans[0], publish_as, args, domain_id, work_dir)
                    chunk_topic, stats_topic = f"/{node.name}/action_chunk", f"/{node.name}/router_stats"
                    failure = node.failure
                camera = (publish_as[plans[0].camera_topic], plans[0].camera_type) if args.listen_only else None
                ros.record(pending, chunk_topic, stats_topic, camera)
                player = Player(ros, args, rate, publish_as)
                if args.listen_only:
                    log.info("listening on %s for %s (start ros2 bag play now)", camera[0], chunk_topic)
                    player.listen(plans[0], pending)
                else:
                    player.prime(plans[0], pending, failure)
                    for plan in plans:
                        player.play(plan, pending, failure)
                if pending.foreign_names is not None:
                    raise ReplayError(f"{chunk_topic}: the node's actions are {pending.foreign_names}, the card of "
                                      f"{weights} has {replay.action_names}: the node runs other weights")
            finally:
                replay.callback_errors = ros.callback_errors - errors_before
                if node is not None:
                    node.stop()
    finally:
        ros.close()
    return replays


def _write(args: argparse.Namespace, plans: list[BagPlan], cards: list[ModelCard], rate: float,
           replays: list[PolicyReplay], node_desc: str) -> int:
    run_info = {
        "bags": [{"path": p.name, "storage": p.storage, "camera_topic": p.camera_topic, "camera_type": p.camera_type,
                  "encoding": p.encoding, "resolution": f"{p.source_hw[1]}x{p.source_hw[0]}",
                  "camera_frames": len(p.camera_stamps), "frames_with_recorded_action": int(len(p.recorded.stamps_ns)),
                  "action_topic": p.action_topic, "action_type": p.action_type} for p in plans],
        "mode": "listen-only" if args.listen_only else ("attach" if args.attach else "spawn"),
        "rate": "max" if not np.isfinite(rate) else rate,
        "node": node_desc,
        # Spawned nodes get it explicitly; an attached node runs whatever it was set to.
        "threshold": args.threshold if args.attach or args.threshold is not None else cards[0].default_threshold,
        "action_names": list(cards[0].action_space.names),
        "latency_definition": LATENCY_DEFINITION,
    }
    report = write_report(args.out, replays, {p.name: p.recorded for p in plans}, run_info, overwrite=args.overwrite)
    for role, section in report["policies"].items():
        latency = section["latency_ms"]["camera_to_action"]
        malformed = f", {section['malformed_chunks']} malformed chunks" if section["malformed_chunks"] else ""
        print(f"{role}: {section['frames_published']} frames, {section['chunks_received']} chunks, "
              f"{section['frames_dropped']} dropped{malformed}, {section['messages_per_s']:g} msg/s; "
              f"camera-to-action ms p50 {latency['p50']} p95 {latency['p95']} p99 {latency['p99']}; action MSE "
              f"{section['action_error']['overall']['mse']}")
    print(f"report: {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--ros-args" in argv:  # added by `ros2 run`/launch; this process takes no ROS arguments
        argv = argv[:argv.index("--ros-args")]
    args = build_parser().parse_args(argv)
    args.command_line = argv  # re-run as typed if the built messages must be put on the paths first
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError) as err:  # bad input: one line, no traceback
        print(f"replay_eval: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
