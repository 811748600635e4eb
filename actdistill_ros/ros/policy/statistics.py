"""The policy node's run-time statistics and the /diagnostics status built from them."""

from __future__ import annotations

import math
import threading
from collections import deque

import numpy as np
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue


class RollingPercentiles:
    """Percentiles over the newest ``size`` samples."""

    def __init__(self, size: int = 300):
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> None:
        if math.isfinite(value):
            self._samples.append(float(value))

    def percentile(self, q: float) -> float:
        return float(np.percentile(self._samples, q)) if self._samples else float("nan")

    def __len__(self) -> int:
        return len(self._samples)


class NodeStatistics:
    """Counters and latency percentiles, written by the executor and the inference worker."""

    TIMINGS = ("latency_ms", "inference_ms", "frame_wait_ms", "executor_delay_ms", "after_inference_ms")

    def __init__(self):
        self.lock = threading.Lock()
        self.counters = {"frames_received": 0, "frames_dropped": 0, "inferences": 0, "nan_actions_dropped": 0}
        # latency: oldest frame receipt -> first step executed; frame_wait: callback -> inference start
        # (worker busy); executor_delay: middleware receipt -> image callback; after_inference: inference
        # end -> first step executed (tick wait).
        self.timings = {name: RollingPercentiles() for name in self.TIMINGS}
        self.executed_fraction = float("nan")

    def add(self, **samples: float) -> None:
        with self.lock:
            for name, value in samples.items():
                self.timings[name].add(value)

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counters[name] += n

    def status(self, name: str, hardware_id: str, level_reason: tuple[int, str], extra: dict[str, str],
               counters: dict[str, int], bad: dict[str, int]) -> DiagnosticStatus:
        with self.lock:
            values = {"latency_ms_p50": self.timings["latency_ms"].percentile(50),
                      "latency_ms_p99": self.timings["latency_ms"].percentile(99),
                      **{f"{timing}_p50": self.timings[timing].percentile(50) for timing in self.TIMINGS[1:]}}
            fraction = self.executed_fraction
            counts = {**self.counters, **counters}
        status = DiagnosticStatus()
        status.name, status.hardware_id = name, hardware_id
        status.level, status.message = level_reason
        pairs = {**{key: f"{value:.2f}" for key, value in values.items()},
                 **{key: str(value) for key, value in counts.items()},
                 "bad_messages_total": str(sum(bad.values())),
                 **{f"bad_messages.{kind}": str(count) for kind, count in sorted(bad.items())},
                 "executed_fraction": f"{fraction:.3f}", **extra}
        status.values = [KeyValue(key=k, value=v) for k, v in pairs.items()]
        return status


def level_and_message(emergency_stopped: bool, hold_reason: str) -> tuple[int, str]:
    level = (DiagnosticStatus.ERROR if emergency_stopped else DiagnosticStatus.WARN if hold_reason
             else DiagnosticStatus.OK)
    return level, (f"holding: {hold_reason}" if hold_reason else "running")
