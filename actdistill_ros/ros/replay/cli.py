"""`actdistill replay-eval`: play recorded rosbag2 demos, or LeRobotDataset episodes, through the policy
node and report.

    actdistill replay-eval BAG... --weights W [--teacher T] [--rate 1.0|max] [--out DIR]
    actdistill replay-eval DATASET_ROOT --episode N [--episode M ...] --weights W [--teacher T] ...
    ros2 run actdistill_ros replay_eval BAG... --weights W ...

A LeRobotDataset v3 root is planned into the same shape as a bag (``dataset_episode``): each camera
as sensor_msgs/Image rgb8 on /<name>/image_raw (or ``--camera-topic``), the task as the command, the
state as JointState when the policy takes one, stamped with the episode's timestamps on the replay
clock, at the dataset's fps times ``--rate``; the recorded actions are the ``action`` feature. The
player, the node and the report are the bags' own.

Each bag's camera, command and state messages are published over DDS as the raw CDR bytes from
the bag (no re-encoding) at the recorded timing (``--rate 1.0``, or a multiple) or, with
``--rate max``, each frame set as soon as the ActionChunk for the previous one came back (a frame
set without a chunk within ``--frame-timeout`` counts as dropped). The node's ActionChunk and
RouterStats messages are recorded; each chunk's first step is compared with the bag's recorded
action at that frame set (aligned by ``read_episode``). ``--teacher`` replays the same bags through
a second node afterwards and adds student-vs-teacher agreement.

Cameras: one ``--camera-topic`` per camera, in the order the policy takes them (default: the
card's camera_names, else ``--topics``, else /camera/image_raw); the spawned node gets them, as
remapped, in ``topics.cameras``. A frame set is one frame per camera; the first camera's frame
starts the node's inference (with the newest frame of each camera), so each set's other cameras
are sent first, and its header stamp names the set. The report counts, per camera, the frames sent
and the frames the node used (RouterStats.source_stamps). Frames on separate topics arrive in no
fixed order: with ``--rate max`` the player also waits for each set's RouterStats (they follow the
chunk at the node's next control tick) and sends a set whose inference took an older frame of
another camera again (``frame_sets_resent``).

Transports: each camera's comes from its message type in the bag (sensor_msgs/Image: raw,
CompressedImage: compressed), so a bag with a compressed wrist camera and a raw scene camera
replays; the spawned node gets them in ``camera.transports``, an attached node must have them. The
bags of one run must agree camera by camera (one node serves them all).

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

Stopping: SIGINT (Ctrl-C) or SIGTERM stops the replay and the nodes it started; it exits 0 with one
info line and writes no report (`ros2 launch` stops its processes with exactly these signals).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from actdistill_ros.data import TopicConfig, list_bags
from actdistill_ros.data.lerobot_dataset import is_lerobot_dataset
from actdistill_ros.lerobot_card import camera_topic, lerobot_card_json
from actdistill_ros.replay_report import PolicyReplay, write_report
from actdistill_ros.ros.env import built_messages_path, fastdds_profile_path, reserve_domain_id, ros_environment
from actdistill_ros.ros.replay import log
from actdistill_ros.ros.replay.bag_inspection import BagPlan, inspect_bag
from actdistill_ros.ros.replay.dataset_episode import plan_dataset_episodes
from actdistill_ros.ros.replay.player import Player
from actdistill_ros.ros.replay.ros_side import SPAWNED_NODE_NAMES, Pending, ReplayError, RosReplay, SpawnedNode
from actdistill_ros.weights import ModelCard, load_card

REEXEC_MARK = "_ACTDISTILL_REPLAY_EVAL_CHILD"
LATENCY_DEFINITION = (
    "camera-to-action = time the ActionChunk reached the replay process (middleware receive timestamp) "
    "minus the time the replay process published that camera frame (listen-only: received it), matched by "
    "the frame's header stamp; both times come from the replay machine's clock. node_camera_to_action is "
    "the node's own RouterStats figure (its receipt of the frame -> first action published).")


# ================================================================ command line
def add_parser(subparsers) -> None:
    p = subparsers.add_parser("replay-eval", help="play rosbag2 demos or LeRobotDataset episodes through the policy "
                                                  "node and report action error, latency and router usage")
    _add_arguments(p)
    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="replay_eval", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _add_arguments(parser)
    return parser


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bags", nargs="+", type=Path, metavar="BAG",
                   help="rosbag2 directory, or a directory of them; or one LeRobotDataset v3 root (with --episode)")
    p.add_argument("--episode", type=int, action="append", metavar="N",
                   help="LeRobotDataset root: replay episode N (repeatable; played in the order given)")
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
    p.add_argument("--topics", type=Path, help="topic config YAML (like config/topics.yaml); the flags below override it")
    p.add_argument("--camera-topic", action="append", metavar="TOPIC",
                   help="camera topic in the bag (Image or CompressedImage); repeat once per camera, in the order "
                        "the policy takes them (default: the card's camera_names, else --topics, else "
                        f"{defaults.camera_topic}). LeRobotDataset: the topics to publish its cameras on "
                        "(default /<name>/image_raw for observation.images.<name>)")
    p.add_argument("--command-topic", help=f"instruction topic in the bag (std_msgs/String; default {defaults.command_topic})")
    p.add_argument("--state-topic", help="robot state topic in the bag (JointState); used when the policy takes a state "
                                         f"(default {defaults.state_topic})")
    p.add_argument("--action-topic", help="recorded action topic (JointState, TwistStamped or PoseStamped; "
                                          f"default {defaults.action_topic})")
    p.add_argument("--sync-tolerance-ms", type=float,
                   help="a frame set is compared only if every other camera and a recorded action lie within this "
                        f"many ms of its first camera's frame (default {defaults.sync_tolerance_ms:g})")
    p.add_argument("--attach", metavar="NODE_NAME", help="use this running policy node instead of starting one")
    p.add_argument("--listen-only", action="store_true",
                   help="publish nothing, only record and compare (another player, e.g. ros2 bag play, publishes); needs --attach")
    p.add_argument("--params-file", type=Path, help="params YAML for spawned nodes (default: the package's config/policy.yaml)")
    p.add_argument("--frame-timeout", type=float, default=5.0,
                   help="seconds to wait for a frame's chunk (--rate max), and for the last chunks of a bag")
    p.add_argument("--startup-timeout", type=float, default=90.0, help="seconds for a node to answer its first frame")
    p.add_argument("--idle-timeout", type=float, default=5.0,
                   help="--listen-only: stop this many seconds after the last camera message")


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


# ================================================================ run
class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (Ctrl-C, or `ros2 launch` shutting down): the replay stops cleanly."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, _frame) -> None:
    raise Stopped(signum)


def _stop_behind(err: BaseException) -> Stopped | None:
    """The Stopped that ``err`` was raised from, if any: a stop that lands inside an import (rclpy's C
    extension loader) comes back as an ImportError chained to it."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, Stopped):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _ros_messages_importable() -> bool:
    try:
        return importlib.util.find_spec("actdistill_ros.msg") is not None
    except ImportError:
        return False


def _reexec_command(args: argparse.Namespace) -> list[str] | None:
    """This process's command line as it was typed, or None where it is not known (an in-process call)."""
    if getattr(args, "command_line", None) is not None:  # main(): python -m / ros2 run replay_eval
        return [sys.executable, "-m", "actdistill_ros.ros.replay.cli", *args.command_line]
    if "replay-eval" in sys.argv[1:]:  # `actdistill ... replay-eval ...`
        return [sys.executable, "-m", "actdistill_ros.cli", *sys.argv[1:]]
    return None


def _reexec_with_ros_env(command: list[str]) -> int:
    """Run the same command line again in a child with the built messages on the paths (ros_environment).
    A stop signal for this process is passed on, and the child's own clean exit awaited."""
    env = ros_environment(domain_id=int(os.environ.get("ROS_DOMAIN_ID") or 0))
    env[REEXEC_MARK] = "1"
    child = subprocess.Popen(command, env=env)
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt as stop:  # SIGINT or SIGTERM: the child stops its nodes and exits by itself
            signum = stop.signum if isinstance(stop, Stopped) else signal.SIGINT
            log.debug("passing %s on to the replay child %d", signal.Signals(signum).name, child.pid)
            child.send_signal(signum)


def policy_card(weights: Path) -> ModelCard:
    """The card of a weights directory, or of a LeRobot SmolVLA policy directory (made from its files, as
    Policy.load and the launch files make it: lerobot_card); one line naming the path if neither."""
    data = lerobot_card_json(weights)  # LeRobotCardError (a ValueError) names the file
    return ModelCard.from_dict(data) if data is not None else load_card(weights)


def resolve_topics(args: argparse.Namespace, cards: list[ModelCard]) -> TopicConfig:
    """The bags' topics: flags over --topics over the defaults. The cameras come from --camera-topic,
    else the card's camera_names, else --topics (or the default camera); there must be as many as
    the images every policy takes."""
    yaml_cameras = TopicConfig.from_yaml(args.topics).cameras
    card_cameras = [camera_topic(name) for name in cards[0].camera_names]  # LeRobot keys: /<name>/image_raw
    cameras, source = next((c, s) for c, s in ((args.camera_topic, "--camera-topic"),
                                                (card_cameras, f"the camera_names of {args.weights}"),
                                                (yaml_cameras, f"the cameras of {args.topics}" if args.topics
                                                 else "the default camera topic")) if c)
    topics = TopicConfig.from_yaml(args.topics, cameras=cameras, command_topic=args.command_topic,
                                   state_topic=args.state_topic, action_topic=args.action_topic,
                                   sync_tolerance_ms=args.sync_tolerance_ms)
    for weights, card in zip((args.weights, args.teacher), cards):
        if card.num_cameras != topics.num_cameras:
            trained = f" (trained on {card.camera_names})" if card.camera_names else ""
            raise ValueError(f"{source} {topics.cameras}: {topics.num_cameras} camera(s), but {weights} takes "
                             f"{card.num_cameras} camera image(s) per observation{trained}; give --camera-topic "
                             "once per camera, in the policy's order")
    return topics


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
    cards = [policy_card(args.weights)]  # WeightsError (a ValueError) names the path
    if args.teacher is not None:
        cards.append(policy_card(args.teacher))
    plans = _dataset_plans(args, cards)
    if plans is None:  # rosbags
        if args.episode:
            raise ValueError(f"--episode {args.episode[0]}: picks episodes of a LeRobotDataset root (meta/info.json); "
                             f"{args.bags[0]} is not one")
        topics = resolve_topics(args, cards)
        bags = list_bags(args.bags)
        if args.listen_only and len(bags) != 1:
            raise ValueError(f"--listen-only evaluates one bag (what ros2 bag play plays), got {len(bags)}")
        plans = [inspect_bag(path, topics, cards) for path in bags]
    if len({tuple(p.camera_transports()) for p in plans}) > 1:  # cameras may differ, bags may not: one node each
        per_bag = "; ".join(f"{p.name}: {p.camera_transports()}" for p in plans)
        raise ValueError(f"bags differ in camera transports ({per_bag}), expected the same per camera (one node "
                         "serves every bag): replay them in separate runs")

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


def _dataset_plans(args: argparse.Namespace, cards: list[ModelCard]) -> list[BagPlan] | None:
    """The plans of a LeRobotDataset root's --episode(s), or None when the inputs are rosbags."""
    roots = [p for p in args.bags if is_lerobot_dataset(p)]
    if not roots:
        return None
    root = roots[0]
    if len(args.bags) != 1:
        other = next((p for p in args.bags if p != root), roots[-1])
        raise ValueError(f"{root} is a LeRobotDataset root but {other} is also given: replay-eval takes one "
                         "LeRobotDataset root (pick its episodes with --episode) or rosbags, not both")
    if not args.episode:
        from actdistill_ros.data.lerobot_dataset import LeRobotDatasetReader

        raise ValueError(f"dataset {root}: give --episode N (repeatable) to pick what to replay; "
                         f"{LeRobotDatasetReader(root).episode_range()}")
    if len(set(args.episode)) != len(args.episode):
        raise ValueError(f"--episode {args.episode}: an episode is given twice, expected each once")
    for flag, value in (("--listen-only", args.listen_only), ("--action-topic", args.action_topic),
                        ("--sync-tolerance-ms", args.sync_tolerance_ms)):
        if value:
            raise ValueError(f"{flag}: applies to rosbags only; {root} is a LeRobotDataset root (its frames are "
                             "published by replay-eval itself, its recorded actions are the 'action' feature)")
    topics = TopicConfig.from_yaml(args.topics, command_topic=args.command_topic, state_topic=args.state_topic)
    weights = [args.weights] + ([args.teacher] if args.teacher is not None else [])
    return plan_dataset_episodes(root, list(args.episode), list(zip(weights, cards)), topics, args.camera_topic,
                                 origin_ns=time.time_ns())


def _replay_all(args: argparse.Namespace, roles: list, plans: list[BagPlan], rate: float, remaps: dict[str, str],
                domain_id: int | None, work_dir: Path) -> list[PolicyReplay]:
    """Each policy in turn through every bag (spawned node, or the attached one)."""
    ros = RosReplay(domain_id)
    replays: list[PolicyReplay] = []
    try:
        for role, weights, card in roles:
            replay = PolicyReplay(role=role, weights=str(weights), kind=card.kind,
                                  action_names=list(card.action_space.names), num_layers=card.num_layers,
                                  camera_topics=list(plans[0].camera_topics))
            replays.append(replay)
            pending = Pending(replay)
            errors_before = ros.callback_errors
            publish_as = {t: remaps.get(t, t) for p in plans for t in p.topics()}
            node = None
            try:
                if args.attach:
                    node_name = args.attach if args.attach.startswith("/") else f"/{args.attach}"
                    params = ros.node_parameters(node_name, ["topics.cameras", "topics.command", "topics.state",
                                                             "topics.action_chunk", "topics.router_stats",
                                                             "camera.transports"], args.startup_timeout)
                    if None in (params["topics.action_chunk"], params["topics.cameras"], params["camera.transports"]):
                        raise ReplayError(f"--attach {node_name}: the node has no topics.action_chunk, topics.cameras "
                                          "or camera.transports parameter (not an actdistill policy_node of this "
                                          "version)")
                    node_cameras = list(params["topics.cameras"])
                    if len(node_cameras) != len(plans[0].camera_topics):
                        raise ReplayError(f"--attach {node_name}: the node reads {len(node_cameras)} camera(s) "
                                          f"{node_cameras}, the bags have {len(plans[0].camera_topics)} "
                                          f"{plans[0].camera_topics}")
                    node_transports = list(params["camera.transports"])
                    wanted = plans[0].camera_transports()
                    if (node_transports * len(wanted) if len(node_transports) == 1 else node_transports) != wanted:
                        raise ReplayError(f"--attach {node_name}: camera.transports is {node_transports}, bag "
                                          f"{plans[0].name!r} cameras {plans[0].camera_topics} need {wanted}")
                    resolve = lambda t: t.replace("~", node_name, 1) if t.startswith("~") else t  # noqa: E731
                    for p in plans:  # publish onto the node's inputs unless remapped explicitly
                        inputs = [*zip(p.camera_topics, node_cameras), (p.command_topic, params["topics.command"]),
                                  (p.state_topic, params["topics.state"])]
                        for bag_topic, node_topic in inputs:
                            if bag_topic and bag_topic not in remaps:
                                publish_as[bag_topic] = resolve(node_topic)
                    chunk_topic, stats_topic = resolve(params["topics.action_chunk"]), resolve(params["topics.router_stats"])
                    failure = lambda: None  # noqa: E731
                else:
                    node = SpawnedNode(role, weights, card, plans[0], publish_as, args, domain_id, work_dir)
                    chunk_topic, stats_topic = f"/{node.name}/action_chunk", f"/{node.name}/router_stats"
                    failure = node.failure
                cameras = {c: publish_as[c] for c in plans[0].camera_topics} if args.listen_only else None
                ros.record(pending, chunk_topic, stats_topic, cameras, plans[0].camera_types)
                player = Player(ros, args, rate, publish_as)
                if args.listen_only:
                    log.info("listening on %s for %s (start ros2 bag play now)", ", ".join(cameras.values()), chunk_topic)
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
        "bags": [p.describe() for p in plans],  # one entry per bag or dataset episode, in replay order
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
              f"{section['frames_dropped']} dropped{malformed}{_camera_summary(section['cameras'])}, "
              f"{section['messages_per_s']:g} msg/s; "
              f"camera-to-action ms p50 {latency['p50']} p95 {latency['p95']} p99 {latency['p99']}; action MSE "
              f"{section['action_error']['overall']['mse']}")
    print(f"report: {args.out}")
    return 0


def _camera_summary(cameras: dict[str, dict]) -> str:
    """`` (cameras: /a 12/12 used, /b 11/12 used)`` with several cameras, else nothing."""
    if len(cameras) < 2:
        return ""
    used = lambda c: "?" if c["frames_used"] is None else c["frames_used"]  # noqa: E731
    return " (cameras: " + ", ".join(f"{topic} {used(c)}/{c['frames_published']} used"
                                     for topic, c in cameras.items()) + ")"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--ros-args" in argv:  # added by `ros2 run`/launch; this process takes no ROS arguments
        argv = argv[:argv.index("--ros-args")]
    args = build_parser().parse_args(argv)
    args.command_line = argv  # re-run as typed if the built messages must be put on the paths first
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    # A stop asked for is not a failure: launch sends SIGINT to every process on Ctrl-C (then SIGTERM
    # after 5 s), and reports a non-zero exit as an error. The finally blocks stop the spawned nodes.
    # rclpy's own handlers (installed at its first init) pass both signals on to these.
    previous = {signum: signal.signal(signum, _raise_stopped) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:  # bad input: one line, no traceback
        print(f"replay_eval: error: {err}", file=sys.stderr)
        return 2
    except BaseException as err:  # a stop, also one that an import turned into another error
        stop = err if isinstance(err, KeyboardInterrupt) else _stop_behind(err)
        if stop is None:
            raise
        name = stop.args[0] if isinstance(stop, Stopped) else "SIGINT"
        log.info("stopped by %s before the end of the replay; no report written", name)
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
