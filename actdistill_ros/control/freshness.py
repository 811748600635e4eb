"""Is each input young enough to move the arm on? Judged by its header stamp, not by when it arrived.

A camera driver that hangs and re-publishes its last frame, or a transport that delivers frames
seconds late, keeps messages arriving: receipt time says "fresh" while the picture is old. So every
input (each camera, the robot state, the measured pose) is judged on the controller's clock, which
is the clock its stamps are written in (the node's ROS clock):
- stale when ``now - stamp`` exceeds its max age;
- stale when its stamp has not advanced for longer than that (a frozen driver), however often the
  message arrives;
- a stamp up to ``max_clock_skew_s`` in the future is taken as now (drivers whose clocks lead); one
  further ahead is stale (and the caller logs it once);
- a zero stamp (a driver that does not stamp) falls back to the receipt time, with one warning.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Staleness:
    kind: str  # stale_<what>, future_<what>
    reason: str


class StampedInput:
    """The newest sample of one input, judged by its stamp (see the module docstring)."""

    def __init__(self, name: str, what: str, parameter: str):
        self.name = name  # shown in reasons, e.g. "camera /wrist/image_raw"
        self.what = what  # kind suffix: frame, state, measured
        self.parameter = parameter  # the max-age parameter, named in reasons
        self.stamp_s: float | None = None  # effective stamp of the newest sample
        self.received_s: float | None = None
        self.advanced_s: float | None = None  # when its stamp last moved forward (controller clock)
        self.unstamped_warned = False

    def note(self, stamp_s: float, received_s: float) -> tuple[float, str | None]:
        """Record a sample; returns (its effective stamp, a warning to log once or None)."""
        warning = None
        if stamp_s <= 0.0:
            stamp_s = received_s
            if not self.unstamped_warned:
                self.unstamped_warned = True
                warning = (f"{self.name} arrives with a zero header.stamp: its age is judged by receipt time, "
                           f"which cannot tell a stalled driver from a live one; stamp the messages")
        if self.stamp_s is None or stamp_s > self.stamp_s:
            self.advanced_s = received_s
        self.stamp_s, self.received_s = stamp_s, received_s
        return stamp_s, warning

    def age(self, now_s: float) -> float | None:
        return None if self.stamp_s is None else now_s - self.stamp_s

    def staleness(self, now_s: float, max_age_s: float, max_skew_s: float) -> Staleness | None:
        """Why this input is too old to move on now, or None (also None before any sample: the caller
        reports missing inputs separately)."""
        if self.stamp_s is None:
            return None
        age = now_s - self.stamp_s
        if -age > max_skew_s:
            return Staleness(f"future_{self.what}", f"{self.name} has a stamp {-age:.2f} s in the future "
                                                    f"(watchdog.max_clock_skew_s {max_skew_s:g}): clocks disagree")
        frozen = now_s - self.advanced_s  # checked first: the more specific diagnosis of a hung driver
        if frozen > max_age_s and self.received_s > self.advanced_s:
            return Staleness(f"stale_{self.what}", f"{self.name} stamp has not advanced for {frozen:.2f} s "
                                                   f"although it keeps arriving (hung driver?; {self.parameter} "
                                                   f"{max_age_s:g})")
        if age > max_age_s:
            return Staleness(f"stale_{self.what}", f"{self.name} is {age:.2f} s old by its stamp "
                                                   f"({self.parameter} {max_age_s:g})")
        if frozen > max_age_s:  # nothing new since: stopped arriving, with a stamp from a leading clock
            return Staleness(f"stale_{self.what}", f"{self.name} has not arrived for {frozen:.2f} s "
                                                   f"({self.parameter} {max_age_s:g})")
        return None


def young_enough(stamp_s: float | None, now_s: float, max_age_s: float) -> bool:
    """A chunk's input stamp is young enough to execute it now (None: no such input)."""
    return stamp_s is None or now_s - stamp_s <= max_age_s
