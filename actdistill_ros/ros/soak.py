"""`actdistill soak`: the policy node for a long run under a 640x480 camera at 30 Hz.

The same rig as `actdistill bench-node` (node, camera helper process, this process sampling the
node's VmRSS every ``--rss-period`` s), run for ``--duration`` (default 10 minutes). Reported:
- RSS over time and its growth over the last ``--growth-window`` s (default 8 minutes): the mean
  of the last ``GROWTH_SPAN_S`` s minus the mean of the window's first ``GROWTH_SPAN_S`` s, so one
  allocator step does not decide it; target <= ``--max-growth-mb`` (5 MB). A least-squares slope
  (MB/min) over the same window is reported beside it;
- camera-to-action latency (RouterStats) p50/p99 per ``--bin`` s (default a minute);
- control rate, jitter and holds over the whole run (see bench_node.control_summary).
Writes ``--out``/soak.json and soak.png (RSS over time, latency per bin) and prints progress lines
(elapsed, ETA, RSS, recent latency) while it runs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from actdistill_ros.ros.bench_node import (BenchError, RigRun, add_rig_arguments, control_summary, percentiles,
                                           report_failure, rss_in_window, run_rig, summarize)

GROWTH_SPAN_S = 30.0  # RSS averaged over this long at each end of the growth window


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("soak", help="policy node for a long run: RSS growth, latency per minute, PNG")
    add_rig_arguments(p, duration=600.0)
    p.add_argument("--bin", type=float, default=60.0, help="seconds per latency bin")
    p.add_argument("--growth-window", type=float, default=480.0,
                   help="RSS growth is measured over the last this many seconds")
    p.add_argument("--max-growth-mb", type=float, default=5.0, help="target: RSS growth at most this (MB)")
    p.add_argument("--rss-period", type=float, default=2.0, help="seconds between RSS samples")
    p.add_argument("--progress-period", type=float, default=30.0, help="seconds between progress lines")
    p.add_argument("--out", type=Path, default=Path("runs/soak"), help="directory for soak.json and soak.png")
    p.set_defaults(func=run)


def rss_growth(samples: Sequence[tuple[float, float]], duration_s: float, window_s: float,
               span_s: float = GROWTH_SPAN_S) -> dict[str, Any]:
    """RSS growth over the last ``window_s`` of a run: ``samples`` are (s since the run started, MB).

    growth = mean over the last ``span_s`` minus mean over the window's first ``span_s`` (both
    shortened to a quarter of the window when it is short); slope: least squares, MB per minute.
    """
    window_s = min(window_s, duration_s)
    start = duration_s - window_s
    span = min(span_s, window_s / 4)
    t = np.array([s[0] for s in samples if s[0] >= start], dtype=np.float64)
    mb = np.array([s[1] for s in samples if s[0] >= start], dtype=np.float64)
    first, last = mb[t <= start + span], mb[t >= duration_s - span]
    if not first.size or not last.size or t.size < 2:
        raise ValueError(f"RSS samples: expected samples at both ends of the last {window_s:g} s of a "
                         f"{duration_s:g} s run, got {t.size}")
    slope = float(np.polyfit(t / 60.0, mb, 1)[0]) if np.ptp(t) > 0 else 0.0
    return {"window_s": [round(start, 3), round(duration_s, 3)], "span_s": round(span, 3),
            "growth_mb": round(float(last.mean() - first.mean()), 3), "slope_mb_per_min": round(slope, 4),
            "start_mb": round(float(first.mean()), 3), "end_mb": round(float(last.mean()), 3),
            "samples": int(t.size)}


def latency_bins(inferences: Sequence[Sequence[float]], duration_s: float, bin_s: float) -> list[dict[str, Any]]:
    """Camera-to-action and inference p50/p99 per ``bin_s`` (rows: [t s, camera_to_action ms, inference ms, ...])."""
    rows = np.asarray(inferences, dtype=np.float64).reshape(-1, 5)
    bins = []
    for start in np.arange(0.0, duration_s - 1e-9, bin_s):
        end = min(start + bin_s, duration_s)
        inside = rows[(rows[:, 0] >= start) & (rows[:, 0] < end)]
        latency = percentiles(inside[:, 1])
        bins.append({"start_s": round(float(start), 3), "end_s": round(float(end), 3), "inferences": len(inside),
                     "camera_to_action_ms_p50": latency["p50"], "camera_to_action_ms_p99": latency["p99"],
                     "inference_ms_p50": percentiles(inside[:, 2])["p50"]})
    return bins


def soak_report(run: RigRun, bin_s: float, growth_window_s: float, max_growth_mb: float) -> dict[str, Any]:
    rec = run.recording
    duration = rec["window"][1] - rec["window"][0]
    rss = rss_in_window(run.rss, tuple(rec["window"]))
    growth = rss_growth(rss, duration, growth_window_s)
    bench = summarize(run)
    return {
        "camera": rec["camera"], "model": rec["model"], "device": bench["device"], "threshold": bench["threshold"],
        "duration_s": round(duration, 3), "frames_published": rec["frames_published"],
        "inferences": bench["inferences_measured"],
        "rss": {**growth, "max_growth_mb": max_growth_mb, "target_met": bool(growth["growth_mb"] <= max_growth_mb),
                "peak_mb": round(max(mb for _, mb in rss), 3)},
        "camera_to_action_ms": bench["node_latency_ms"], "inference_ms": bench["inference_ms"],
        "latency_per_bin": latency_bins(rec["inferences"], duration, bin_s),
        "control": control_summary(rec["commands"], rec["control_rate_hz"], duration),
        "rss_samples": [[round(t, 2), round(mb, 3)] for t, mb in rss],
        "warnings": run.warnings,
    }


def plot_soak(report: dict[str, Any], path: Path) -> None:
    from actdistill_ros.sim.report import pyplot, save_figure

    plt = pyplot()
    fig, (ax_rss, ax_latency) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    t = np.array([s[0] for s in report["rss_samples"]]) / 60.0
    ax_rss.plot(t, [s[1] for s in report["rss_samples"]], lw=1.2, color="tab:blue")
    rss = report["rss"]
    ax_rss.axvspan(rss["window_s"][0] / 60.0, rss["window_s"][1] / 60.0, color="tab:orange", alpha=0.12,
                   label=f"growth window: {rss['growth_mb']:+.2f} MB (target <= {rss['max_growth_mb']:g} MB)")
    ax_rss.set_ylabel("node RSS (MB)")
    ax_rss.legend(loc="lower right", fontsize=8)
    ax_rss.set_title(f"soak: {report['camera']}, {report['model']} on {report['device']}")
    centers = [(b["start_s"] + b["end_s"]) / 120.0 for b in report["latency_per_bin"]]
    for key, label, style in (("camera_to_action_ms_p50", "camera->action p50", "o-"),
                              ("camera_to_action_ms_p99", "camera->action p99", "s--"),
                              ("inference_ms_p50", "inference p50", "^:")):
        ax_latency.plot(centers, [b[key] for b in report["latency_per_bin"]], style, label=label, ms=4)
    ax_latency.set_ylabel("ms (per bin)")
    ax_latency.set_xlabel("minutes into the measured window")
    ax_latency.set_ylim(bottom=0)
    ax_latency.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    for name in ("duration", "bin", "growth_window", "rss_period", "progress_period"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive number of seconds, got "
                             f"{getattr(args, name)}")
    from actdistill_ros.sim.report import write_json

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="actdistill_soak_") as tmp:
        work_dir = Path(tmp)
        try:
            rig = run_rig(args, work_dir, label="soak", progress_period_s=args.progress_period,
                          rss_period_s=args.rss_period)
        except BenchError as err:
            return report_failure("soak", err, work_dir)
    report = soak_report(rig, args.bin, args.growth_window, args.max_growth_mb)
    json_path, png_path = args.out / "soak.json", args.out / "soak.png"
    write_json(json_path, report)
    plot_soak(report, png_path)
    rss = report["rss"]
    print(json.dumps({key: value for key, value in report.items() if key != "rss_samples"}, indent=2))
    print(f"soak: RSS growth over the last {rss['window_s'][1] - rss['window_s'][0]:.0f} s: {rss['growth_mb']:+.2f} MB "
          f"(target <= {rss['max_growth_mb']:g} MB: {'met' if rss['target_met'] else 'MISSED'}); wrote {json_path} "
          f"and {png_path}")
    return 0
