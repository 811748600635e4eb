"""`actdistill soak` and `actdistill bench-node`: the rig (node process + camera helper process) and its
analysis. The rig runs are short; the analysis is checked on generated series that cross its targets.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from ros_harness import load_router_stats_type, require_rclpy

require_rclpy()
load_router_stats_type()  # the helper records RouterStats: the built messages must be there

from actdistill_ros import cli  # noqa: E402
from actdistill_ros.ros import bench_node  # noqa: E402
from actdistill_ros.ros.bench_node import RigRun  # noqa: E402
from actdistill_ros.ros.soak import rss_growth, soak_report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_soak_reports_rss_growth_latency_per_bin_and_a_png(tmp_path, capsys):
    out = tmp_path / "soak"
    code = cli.main(["soak", "--size", "tiny", "--duration", "12", "--warmup", "1", "--bin", "4",
                     "--growth-window", "10", "--rss-period", "1", "--progress-period", "4", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    report = json.loads((out / "soak.json").read_text())
    assert report["camera"] == "640x480 rgb8 at 30 Hz for 12 s"
    assert report["duration_s"] == pytest.approx(12.0, abs=0.01)
    # RSS sampled every second through the window, growth measured over its last 10 s.
    times = [t for t, _ in report["rss_samples"]]
    assert len(times) >= 10 and 0.0 <= times[0] <= 1.5 and times[-1] >= 10.5
    assert np.median(np.diff(times)) == pytest.approx(1.0, abs=0.3)
    rss = report["rss"]
    assert rss["window_s"] == pytest.approx([2.0, 12.0], abs=0.01) and rss["max_growth_mb"] == 5.0
    assert 100.0 < rss["start_mb"] < 4000.0 and math.isfinite(rss["growth_mb"])
    assert isinstance(rss["target_met"], bool)  # the verdict itself: test_soak_report_judges_growth_against_the_target
    # Latency per bin from RouterStats: three 4 s bins, each with its own inferences.
    bins = report["latency_per_bin"]
    assert [(b["start_s"], b["end_s"]) for b in bins] == [(0.0, 4.0), (4.0, 8.0), (8.0, 12.0)]
    for b in bins:
        assert b["inferences"] >= 10, bins
        assert 0.0 < b["inference_ms_p50"] <= b["camera_to_action_ms_p50"] <= b["camera_to_action_ms_p99"]
    assert sum(b["inferences"] for b in bins) == report["inferences"]
    assert report["control"]["commands_per_s"] > 1.0 and report["warnings"] == []
    png = (out / "soak.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    # Progress lines while it ran: elapsed / duration, ETA, RSS, latency.
    progress = [line for line in captured.err.splitlines() if line.startswith("soak: 0:")]
    assert len(progress) >= 3, captured.err
    assert "/ 0:12" in progress[-1] and "ETA 0:00" in progress[-1] and "node RSS" in progress[-1]
    assert "RSS growth over the last 10 s" in captured.out


def test_a_helper_that_aborts_after_its_result_costs_a_warning_not_the_result(tmp_path, monkeypatch, capsys):
    """The bug of issue 9: the camera helper died at exit (-6) and the run's result was lost."""
    abort_after_main = ("import os, sys; from actdistill_ros.ros.bench_node import main; "
                        "main(sys.argv[1:]); sys.stdout.flush(); os.abort()")
    monkeypatch.setattr(bench_node, "HELPER_COMMAND", [sys.executable, "-c", abort_after_main])
    result_path = tmp_path / "bench.json"
    code = cli.main(["bench-node", "--size", "tiny", "--duration", "2", "--warmup", "0.5",
                     "--json", str(result_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    result = json.loads(result_path.read_text())
    assert result == json.loads(captured.out)
    assert result["inferences_measured"] >= 10 and result["node_latency_ms"]["n"] >= 10
    assert result["warnings"] == ["the camera helper exited with code -6 after writing its complete result "
                                  "(teardown); result kept"]
    assert "bench-node: warning: the camera helper exited with code -6" in captured.err


def test_a_helper_that_dies_before_its_result_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_node, "HELPER_COMMAND",
                        [sys.executable, "-c", "raise SystemExit('camera driver failed: no device')"])
    code = cli.main(["bench-node", "--size", "tiny", "--duration", "1", "--warmup", "0"])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    first = captured.err.splitlines()[0]
    assert first == ("actdistill bench-node: error: the camera helper exited with code 1 before writing its "
                     "result: camera driver failed: no device")


# ---------------------------------------------------------------- analysis on generated series
def test_rss_growth_flags_a_leak_and_passes_a_flat_series():
    t = np.arange(0.0, 600.1, 2.0)
    noise = np.random.default_rng(0).normal(0.0, 0.5, t.size)
    flat = rss_growth(list(zip(t, 800.0 + noise)), 600.0, 480.0)
    assert flat["window_s"] == [120.0, 600.0] and abs(flat["growth_mb"]) < 0.5
    leak = rss_growth(list(zip(t, 800.0 + 2.0 * t / 60.0 + noise)), 600.0, 480.0)  # 2 MB per minute
    assert leak["growth_mb"] == pytest.approx(15.0, abs=0.5)  # mean of [570, 600] - mean of [120, 150]
    assert leak["slope_mb_per_min"] == pytest.approx(2.0, abs=0.05)
    # A single allocator step inside the window counts fully once both ends see it.
    step = rss_growth(list(zip(t, 800.0 + 6.0 * (t > 300))), 600.0, 480.0)
    assert step["growth_mb"] == pytest.approx(6.0)
    with pytest.raises(ValueError, match="RSS samples: expected samples at both ends"):
        rss_growth([(0.0, 800.0), (10.0, 800.0)], 600.0, 480.0)


def _rig_run(rss_mb_at) -> RigRun:
    """A 600 s rig run as the helper records it: 20 Hz commands, 10 Hz inferences, the node's RSS
    every 2 s from ``rss_mb_at(seconds since the window start)``; the window starts at 1000 s."""
    start, duration = 1000.0, 600.0
    times = np.arange(0.0, duration + 0.1, 2.0)
    inferences = [[t, 30.0, 25.0, 40.0, 0.5] for t in np.arange(0.05, duration, 0.1)]
    recording = {"window": [start, start + duration], "camera": "640x480 rgb8 at 30 Hz for 600 s", "model": "tiny",
                 "frames_published": 18000, "inferences": inferences,
                 "commands": [[t, 1] for t in np.arange(0.0, duration, 0.05)],
                 "control_rate_hz": 20.0, "diagnostics": {}, "stress_processes": 0, "device_requested": "cpu",
                 "threshold_requested": 0.5, "threshold": 0.5}
    return RigRun(recording, [(start + t, float(rss_mb_at(t))) for t in times])


@pytest.mark.parametrize("max_growth_mb", [5.0, 20.0])
def test_soak_report_judges_growth_against_the_target(max_growth_mb):
    leak = soak_report(_rig_run(lambda t: 800.0 + 2.0 * t / 60.0), 60.0, 480.0, max_growth_mb)["rss"]  # 2 MB/min
    flat = soak_report(_rig_run(lambda t: 800.0), 60.0, 480.0, max_growth_mb)["rss"]
    # Over the last 480 s (from 120 s), 30 s at each end: means at 135 s and 585 s, 15 MB apart.
    assert leak["window_s"] == [120.0, 600.0] and leak["growth_mb"] == pytest.approx(15.0, abs=0.1)
    assert leak["target_met"] is (max_growth_mb == 20.0)  # 15 MB misses a 5 MB target, meets 20 MB
    assert flat["growth_mb"] == 0.0 and flat["target_met"] is True
    assert leak["max_growth_mb"] == max_growth_mb and leak["peak_mb"] == pytest.approx(820.0)


def test_control_summary_counts_holds_and_jitter():
    period = 0.05  # 20 Hz
    commands = [[i * period, 1] for i in range(10)]  # motion, on time
    commands += [[0.5, 0], [0.55, 0], [0.6, 0]]  # a hold with a repeated stop
    commands += [[0.65 + i * period, 1] for i in range(5)]  # motion again
    commands += [[0.9, 0]]  # a hold that runs to the end of the window (1.0 s), a single stop
    commands[3][0] += 0.02  # one late command: intervals 70 ms and 30 ms around it
    summary = bench_node.control_summary(commands, 20.0, 1.0)
    assert summary["hold_episodes"] == 2 and summary["stop_commands"] == 4
    assert summary["hold_time_fraction"] == pytest.approx((0.65 - 0.5 + 1.0 - 0.9) / 1.0)
    assert summary["commands_per_s"] == pytest.approx(19.0)
    assert summary["motion_interval_ms"]["n"] == 9 + 4  # motion-to-motion intervals only
    assert summary["motion_interval_ms"]["max"] == pytest.approx(70.0)
    assert summary["jitter_ms"]["p50"] == pytest.approx(0.0, abs=1e-6)
    assert summary["jitter_ms"]["p99"] == pytest.approx(20.0, abs=0.5)
