"""The player: publishes a plan's raw CDR messages (a bag's, or a dataset episode's made for it) at the
recorded timing (or, ``--rate max``, each frame once the previous frame's chunk is back), or only
listens while ``ros2 bag play`` publishes."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from tqdm import tqdm

from actdistill_ros.data.config import JOINT_STATE_TYPE, STRING_TYPE
from actdistill_ros.replay_report import FrameRecord
from actdistill_ros.ros.replay import log
from actdistill_ros.ros.replay.bag_inspection import BagPlan, header_stamp_ns, with_header_stamp
from actdistill_ros.ros.replay.ros_side import PRIMING_STAMP_NS, Pending, ReplayError, RosReplay

PRIMING_PERIOD_S = 0.5
# A frame set's other cameras go out this long before its first camera's frame (which starts the node's
# inference with the newest frame of each): frames on different topics may be taken in any order.
FRAME_SET_GAP_S = 0.01
RESEND_LIMIT = 3  # --rate max: times a frame set's first-camera frame is sent again (see Player._await_answer)


class Player:
    """Plays plans (bags, dataset episodes) onto the (possibly remapped) topics the node reads, or only
    listens (--listen-only)."""

    def __init__(self, ros: RosReplay, args: argparse.Namespace, rate: float, publish_as: dict[str, str]):
        self.ros, self.args, self.rate, self.publish_as = ros, args, rate, publish_as

    def _publish(self, plan: BagPlan, topic: str, raw: bytes) -> None:
        msgtype = plan.camera_types[topic] if topic in plan.camera_topics else (
            STRING_TYPE if topic == plan.command_topic else JOINT_STATE_TYPE)
        self.ros.publisher(self.publish_as[topic], msgtype).publish(raw)

    def prime(self, plan: BagPlan, pending: Pending, node_failure) -> None:
        """Send the bag's first command and state, then a warm-up frame set (every camera's first frame,
        the first camera last) until a chunk comes back."""
        first: dict[str, bytes] = {}
        messages = plan.messages()
        try:
            for topic, _, raw in messages:
                first.setdefault(topic, raw)
                if len(first) == len(plan.topics()):
                    break
        finally:
            messages.close()  # a dataset plan's decoding stops here
        for topic in (plan.command_topic, plan.state_topic):
            if topic:
                self._publish(plan, topic, first[topic])
        warm_up = [(camera, with_header_stamp(first[camera], PRIMING_STAMP_NS)) for camera in plan.camera_topics[::-1]]
        started = time.monotonic()
        deadline = started + self.args.startup_timeout
        while not pending.primed.is_set():
            failure = node_failure()
            if failure:
                raise ReplayError(failure)
            if time.monotonic() > deadline:
                raise ReplayError(f"no ActionChunk came back within {self.args.startup_timeout:g} s of sending frames "
                                  f"on {', '.join(self.publish_as[c] for c in plan.camera_topics)}")
            if plan.state_topic:
                self._publish(plan, plan.state_topic, first[plan.state_topic])
            for camera, raw in warm_up:
                self._publish(plan, camera, raw)
                if camera != plan.frame_topic:
                    time.sleep(FRAME_SET_GAP_S)
            pending.primed.wait(PRIMING_PERIOD_S)
        log.info("%s: first ActionChunk %.1f s after the node was started", pending.replay.role,
                 time.monotonic() - started)
        time.sleep(0.2)  # let a second warm-up chunk in flight arrive before the real frames

    def play(self, plan: BagPlan, pending: Pending, node_failure) -> None:
        replay = pending.replay
        with pending.changed:
            pending.bag, pending.by_stamp, pending.newest = plan.name, {}, {}
        last_stamp = None
        others_sent_at_ns = None  # bag time of the last other-camera frame sent
        started = time.monotonic()
        bar = tqdm(total=plan.message_count, desc=f"{replay.role} {plan.label}", unit="msg", file=sys.stderr,
                   dynamic_ncols=True, mininterval=0.5)
        messages = plan.messages()
        try:
            bag_start_ns = None
            for topic, receive_ns, raw in messages:
                if bag_start_ns is None:  # the clock starts at the first message (a plan may decode before it)
                    bag_start_ns, started = receive_ns, time.monotonic()
                if np.isfinite(self.rate):
                    delay = started + (receive_ns - bag_start_ns) / 1e9 / self.rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                frame = None  # set when this message opens a frame set (a first-camera frame)
                if topic in plan.camera_topics:
                    stamp = header_stamp_ns(raw)
                    if stamp == 0:  # no header stamp: the receive time keys the frame, as in read_episode
                        stamp = receive_ns
                        raw = with_header_stamp(raw, stamp)
                    if topic == plan.frame_topic and stamp in pending.by_stamp:
                        bar.update(1)
                        continue  # a repeated stamp cannot be told apart from the first
                    replay.camera_frames.setdefault(topic, set()).add((plan.name, stamp))
                    with pending.changed:
                        pending.newest[topic] = max(stamp, pending.newest.get(topic, 0))
                        if topic == plan.frame_topic:
                            frame = FrameRecord(plan.name, stamp, 0, newest_stamps=pending.frame_set_stamps())
                            pending.by_stamp[stamp] = frame
                            replay.frames.append(frame)
                if frame is not None:
                    if others_sent_at_ns == receive_ns:  # this frame set's other cameras just went out
                        time.sleep(FRAME_SET_GAP_S)
                    frame.sent_ns = time.time_ns()
                elif topic in plan.camera_topics:
                    others_sent_at_ns = receive_ns
                self._publish(plan, topic, raw)
                if frame is not None:
                    last_stamp = frame.stamp_ns
                    if not np.isfinite(self.rate):  # --rate max: next frame set when this chunk is back
                        self._await_answer(plan, pending, frame, raw, node_failure)
                replay.messages_published += 1
                bar.update(1)
                bar.set_postfix(chunks=sum(f.chunk is not None for f in pending.by_stamp.values()), refresh=False)
            replay.replay_seconds += time.monotonic() - started
        finally:
            messages.close()
            bar.close()
        # Last chunks: the node works newest-first, so once the last frame's chunk is in nothing older comes.
        if last_stamp is not None and np.isfinite(self.rate):
            self.ros.wait_for_chunk(pending, last_stamp, self.args.frame_timeout)
        self.ros.wait_for_stats(pending, self.args.frame_timeout)
        failure = node_failure()
        if failure:
            raise ReplayError(failure)

    def _await_answer(self, plan: BagPlan, pending: Pending, frame: FrameRecord, raw: bytes, node_failure) -> None:
        """--rate max: wait for the frame set's chunk. With several cameras also for its RouterStats:
        while they show that the node paired the frame with an older frame of another camera (the
        cameras' frames travel on separate topics, in no fixed order), send the first camera's frame
        again (its other cameras' frames have arrived by then), at most RESEND_LIMIT times."""
        for attempt in range(RESEND_LIMIT + 1):
            if not self.ros.wait_for_chunk(pending, frame.stamp_ns, self.args.frame_timeout):
                failure = node_failure()
                if failure:
                    raise ReplayError(failure)
                return  # dropped
            if len(plan.camera_topics) == 1 or attempt == RESEND_LIMIT:
                return
            self.ros.wait_for_stats(pending, self.args.frame_timeout, frame.stamp_ns)
            if frame.source_stamps is None or all(s >= n for s, n in zip(frame.source_stamps, frame.newest_stamps)):
                return
            log.debug("%s: the node paired frame %d with frames %s, not %s; sending it again", pending.replay.role,
                      frame.stamp_ns, frame.source_stamps, frame.newest_stamps)
            again = FrameRecord(frame.bag, frame.stamp_ns, 0, newest_stamps=frame.newest_stamps)
            with pending.changed:  # the first answer is done with: chunk and stats are both in
                pending.by_stamp[frame.stamp_ns] = again
                frames = pending.replay.frames
                frames[next(i for i in range(len(frames) - 1, -1, -1) if frames[i] is frame)] = again
                pending.replay.frame_sets_resent += 1
            frame = again
            frame.sent_ns = time.time_ns()
            self._publish(plan, plan.frame_topic, raw)

    def listen(self, plan: BagPlan, pending: Pending) -> None:
        """--listen-only: record until every frame set of the bag was seen or the cameras went quiet."""
        replay = pending.replay
        expected = set(plan.camera_stamps[plan.frame_topic])
        with pending.changed:
            pending.bag, pending.by_stamp, pending.newest = plan.name, {}, {}
            pending.accept_unknown_from = {camera: set(stamps) for camera, stamps in plan.camera_stamps.items()}
        bar = tqdm(total=len(expected), desc=f"listening {plan.label}", unit="frame", file=sys.stderr,
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
                                      f"{self.publish_as[plan.frame_topic]} within {self.args.startup_timeout:g} s")
        finally:
            bar.close()
        replay.replay_seconds += (last - first_seen) if first_seen else 0.0
        replay.messages_published += seen
        newest = max(pending.by_stamp, default=None)
        if newest is not None:
            self.ros.wait_for_chunk(pending, newest, self.args.frame_timeout)
        self.ros.wait_for_stats(pending, self.args.frame_timeout)
