"""Metrics, plots and the on-disk report of a replay evaluation (rosbags or LeRobotDataset episodes;
no ROS needed).

The ROS side (``actdistill_ros.ros.replay``) fills one ``PolicyReplay`` per evaluated policy
with one ``FrameRecord`` per frame set it sent (one frame per camera, keyed by the first camera's
stamp; ``bag`` names the bag or the dataset episode) and the stamps of every camera's frames; this
module turns them into report.json,
report.md and PNG plots, written into a temp directory next to the output and renamed at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOTS = {
    "latency_histogram": "latency_histogram.png",
    "executed_fraction": "executed_fraction.png",
    "layer_usage": "layer_usage.png",
    "action_traces": "action_traces.png",
}


@dataclass
class FrameRecord:
    """One frame set of a bag (its first camera's frame) as sent to (or seen by) the node, and what
    came back for it."""

    bag: str
    stamp_ns: int  # first camera's header stamp: the key that ties chunk and RouterStats to the frame set
    sent_ns: int  # system clock when the frame was published here (listen-only: received here)
    chunk: np.ndarray | None = None  # (H, D) float32 from ActionChunk
    chunk_received_ns: int | None = None  # system clock when the ActionChunk reached this process
    executed_fraction: float | None = None
    layer_mask: list[bool] | None = None  # from RouterStats
    inference_ms: float | None = None
    node_camera_to_action_ms: float | None = None  # the node's own figure (its receipt -> first action)
    source_stamps: list[int] | None = None  # RouterStats: the stamp of each camera's frame the node used
    newest_stamps: list[int] | None = None  # per camera: its newest frame sent (seen) when this frame set opened

    @property
    def latency_ms(self) -> float | None:
        if self.chunk_received_ns is None:
            return None
        return (self.chunk_received_ns - self.sent_ns) / 1e6


@dataclass
class PolicyReplay:
    """Everything measured while replaying the bags through one policy node."""

    role: str  # "student" (--weights) or "teacher" (--teacher)
    weights: str
    kind: str  # the card's kind: "student" or "teacher"
    action_names: list[str]
    num_layers: int
    camera_topics: list[str] = field(default_factory=list)  # the bags' camera topics, in the model's order
    frames: list[FrameRecord] = field(default_factory=list)
    # Per camera topic: (bag, header stamp) of every frame published to the node (listen-only: seen).
    camera_frames: dict[str, set[tuple[str, int]]] = field(default_factory=dict)
    messages_published: int = 0
    replay_seconds: float = 0.0
    unmatched_chunks: int = 0  # chunks whose stamp matched no frame sent (late, or another publisher)
    malformed_chunks: int = 0  # ActionChunks not readable as (chunk_size, action_dim) finite values
    frame_sets_resent: int = 0  # --rate max: first-camera frames sent again after the node paired an older frame
    callback_errors: int = 0  # subscription callbacks that raised (logged; the replay went on)

    def received(self) -> list[FrameRecord]:
        return [f for f in self.frames if f.chunk is not None]


@dataclass
class RecordedActions:
    """The bag's recorded action aligned to each camera frame (read_episode), keyed by stamp."""

    bag: str
    stamps_ns: np.ndarray
    actions: np.ndarray  # (T, D) float32, columns in the policy's action order

    def lookup(self) -> dict[int, np.ndarray]:
        return {int(s): a for s, a in zip(self.stamps_ns, self.actions)}


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    """p50/p95/p99/mean/max of finite values (None when there are none)."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    p50, p95, p99 = np.percentile(finite, [50, 95, 99])
    return {"n": int(finite.size), "p50": round(float(p50), 3), "p95": round(float(p95), 3),
            "p99": round(float(p99), 3), "mean": round(float(finite.mean()), 3), "max": round(float(finite.max()), 3)}


def error_metrics(predicted: np.ndarray, reference: np.ndarray, names: list[str]) -> dict:
    """Per-dimension and overall MSE/MAE between two (N, D) arrays (float64 maths)."""
    if predicted.shape[0] == 0:
        return {"frames_compared": 0, "per_dimension": {}, "overall": {"mse": None, "mae": None}}
    diff = predicted.astype(np.float64) - reference.astype(np.float64)
    mse, mae = (diff ** 2).mean(axis=0), np.abs(diff).mean(axis=0)
    return {
        "frames_compared": int(predicted.shape[0]),
        "per_dimension": {name: {"mse": float(mse[i]), "mae": float(mae[i])} for i, name in enumerate(names)},
        "overall": {"mse": float(mse.mean()), "mae": float(mae.mean())},
    }


def _action_error(replay: PolicyReplay, recorded: dict[str, RecordedActions]) -> dict:
    lookups = {bag: rec.lookup() for bag, rec in recorded.items()}
    predicted, reference = [], []
    for frame in replay.received():
        action = lookups.get(frame.bag, {}).get(frame.stamp_ns)
        if action is not None:
            predicted.append(frame.chunk[0])
            reference.append(action)
    dim = len(replay.action_names)
    return error_metrics(np.asarray(predicted, np.float32).reshape(-1, dim),
                         np.asarray(reference, np.float32).reshape(-1, dim), replay.action_names)


def _agreement(student: PolicyReplay, teacher: PolicyReplay) -> dict:
    teacher_chunks = {(f.bag, f.stamp_ns): f.chunk for f in teacher.received()}
    first_s, first_t, chunk_sq = [], [], []
    for frame in student.received():
        other = teacher_chunks.get((frame.bag, frame.stamp_ns))
        if other is None:
            continue
        first_s.append(frame.chunk[0])
        first_t.append(other[0])
        steps = min(frame.chunk.shape[0], other.shape[0])
        chunk_sq.append(float(((frame.chunk[:steps].astype(np.float64) - other[:steps]) ** 2).mean()))
    dim = len(student.action_names)
    result = error_metrics(np.asarray(first_s, np.float32).reshape(-1, dim),
                           np.asarray(first_t, np.float32).reshape(-1, dim), student.action_names)
    result["whole_chunk_mse"] = float(np.mean(chunk_sq)) if chunk_sq else None
    return result


def camera_usage(replay: PolicyReplay) -> dict[str, dict]:
    """Per camera: frames published (listen-only: seen); frames the node used for an inference (the
    camera's entry in RouterStats.source_stamps) and the rest, dropped; and ``older_frame_used``:
    inferences that took an older frame of this camera than the newest one sent before their frame
    set's first-camera frame (the node paired frames that do not belong together). The node's figures
    are None when it reports no source stamps."""
    reported = [f for f in replay.frames
                if f.source_stamps is not None and len(f.source_stamps) == len(replay.camera_topics)]
    usage = {}
    for k, topic in enumerate(replay.camera_topics):
        published = replay.camera_frames.get(topic, set())
        used = {(f.bag, f.source_stamps[k]) for f in reported} & published
        older = sum(f.source_stamps[k] < f.newest_stamps[k] for f in reported if f.newest_stamps is not None)
        usage[topic] = {"frames_published": len(published), "frames_used": len(used) if reported else None,
                        "frames_dropped": len(published) - len(used) if reported else None,
                        "older_frame_used": older if reported else None}
    return usage


def summarize(replay: PolicyReplay, recorded: dict[str, RecordedActions]) -> dict:
    """The JSON section of one policy."""
    received = replay.received()
    masks = [f.layer_mask for f in replay.frames if f.layer_mask is not None]
    fractions = [f.executed_fraction for f in replay.frames if f.executed_fraction is not None]
    seconds = max(replay.replay_seconds, 1e-9)
    return {
        "weights": replay.weights,
        "kind": replay.kind,
        "frames_published": len(replay.frames),
        "chunks_received": len(received),
        "frames_dropped": len(replay.frames) - len(received),
        "cameras": camera_usage(replay),
        "unmatched_chunks": replay.unmatched_chunks,
        "malformed_chunks": replay.malformed_chunks,
        "frame_sets_resent": replay.frame_sets_resent,
        "callback_errors": replay.callback_errors,
        "messages_published": replay.messages_published,
        "replay_seconds": round(replay.replay_seconds, 3),
        "messages_per_s": round(replay.messages_published / seconds, 2),
        "frames_per_s": round(len(replay.frames) / seconds, 2),
        "latency_ms": {
            "camera_to_action": percentiles([f.latency_ms for f in received]),
            "node_camera_to_action": percentiles([f.node_camera_to_action_ms for f in replay.frames
                                                  if f.node_camera_to_action_ms is not None]),
            "inference": percentiles([f.inference_ms for f in replay.frames if f.inference_ms is not None]),
        },
        "action_error": _action_error(replay, recorded),
        "executed_fraction": {
            "mean": float(np.mean(fractions)) if fractions else None,
            "min": float(np.min(fractions)) if fractions else None,
            "max": float(np.max(fractions)) if fractions else None,
        },
        "layer_usage": np.asarray(masks, dtype=np.float64).mean(axis=0).round(4).tolist() if masks else [],
    }


def build_report(replays: list[PolicyReplay], recorded: dict[str, RecordedActions], run_info: dict) -> dict:
    report = {**run_info, "policies": {r.role: summarize(r, recorded) for r in replays}}
    roles = {r.role: r for r in replays}
    if "student" in roles and "teacher" in roles:
        report["student_vs_teacher"] = _agreement(roles["student"], roles["teacher"])
    return report


# ---------------------------------------------------------------- plots
def _bag_boundaries(frames: list[FrameRecord]) -> list[int]:
    return [i for i in range(1, len(frames)) if frames[i].bag != frames[i - 1].bag]


def _plot_latency(plt, replays: list[PolicyReplay], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for replay in replays:
        values = [f.latency_ms for f in replay.received()]
        if values:
            ax.hist(values, bins=min(50, max(5, len(values) // 3)), alpha=0.6,
                    label=f"{replay.role} (p50 {np.percentile(values, 50):.1f} ms)")
    ax.set_xlabel("camera-to-action latency (ms): frame published -> ActionChunk received")
    ax.set_ylabel("frames")
    ax.legend(loc="upper right") if ax.get_legend_handles_labels()[0] else ax.text(
        0.5, 0.5, "no chunks received", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_executed_fraction(plt, replays: list[PolicyReplay], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for replay in replays:
        xs = [i for i, f in enumerate(replay.frames) if f.executed_fraction is not None]
        ax.plot(xs, [replay.frames[i].executed_fraction for i in xs], marker=".", linewidth=1, label=replay.role)
    for boundary in _bag_boundaries(replays[0].frames):
        ax.axvline(boundary - 0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("frame (bags in order; dotted lines = next bag)")
    ax.set_ylabel("executed layer fraction")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_layer_usage(plt, replays: list[PolicyReplay], path: Path) -> None:
    fig, axes = plt.subplots(len(replays), 1, figsize=(9, 1.2 + 0.35 * sum(r.num_layers for r in replays) + 0.6),
                             squeeze=False)
    for ax, replay in zip(axes[:, 0], replays):
        mask = np.full((replay.num_layers, max(len(replay.frames), 1)), np.nan)
        for i, frame in enumerate(replay.frames):
            if frame.layer_mask is not None:
                mask[:len(frame.layer_mask), i] = frame.layer_mask
        ax.imshow(mask, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
        usage = np.nanmean(np.where(np.isnan(mask), np.nan, mask), axis=1) if np.isfinite(mask).any() else \
            np.zeros(replay.num_layers)
        ax.set_yticks(range(replay.num_layers))
        ax.set_yticklabels([f"L{k} {100 * u:.0f}%" for k, u in enumerate(np.nan_to_num(usage))], fontsize=7)
        ax.set_title(f"{replay.role}: layers run per frame (yellow = ran)", fontsize=9)
    axes[-1, 0].set_xlabel("frame")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_traces(plt, replays: list[PolicyReplay], recorded: dict[str, RecordedActions], path: Path) -> None:
    names = replays[0].action_names
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 1.8 * len(names) + 0.6), sharex=True, squeeze=False)
    frames = replays[0].frames
    lookups = {bag: rec.lookup() for bag, rec in recorded.items()}
    recorded_rows = [lookups.get(f.bag, {}).get(f.stamp_ns) for f in frames]
    for d, (ax, name) in enumerate(zip(axes[:, 0], names)):
        xs = [i for i, row in enumerate(recorded_rows) if row is not None]
        ax.plot(xs, [recorded_rows[i][d] for i in xs], color="black", linewidth=3, alpha=0.35, label="recorded")
        for replay in replays:
            chunks = {(f.bag, f.stamp_ns): f.chunk for f in replay.received()}
            pts = [(i, chunks[(f.bag, f.stamp_ns)][0, d]) for i, f in enumerate(frames) if (f.bag, f.stamp_ns) in chunks]
            if pts:
                ax.plot(*zip(*pts), marker=".", linewidth=1, label=f"{replay.role} (chunk step 0)")
        for boundary in _bag_boundaries(frames):
            ax.axvline(boundary - 0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_ylabel(name, fontsize=8)
    axes[0, 0].legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("frame")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- markdown
def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _input_name(entry: dict) -> str:
    """A report ``bags`` entry's short name: the bag's directory, or the dataset's with its episode."""
    name = Path(entry["path"]).name
    return f"{name} episode {entry['episode']}" if "episode" in entry else name


def render_markdown(report: dict) -> str:
    datasets = any("episode" in b for b in report["bags"])
    lines = ["# Replay evaluation" + (" (LeRobotDataset episodes)" if datasets else " (rosbags)"), ""]
    replayed = [b["path"] + (f" episode {b['episode']}" if "episode" in b else "") for b in report["bags"]]
    lines += [f"- {'episodes' if datasets else 'bags'}: {', '.join(replayed)}",
              f"- mode: {report['mode']}, rate: {report['rate']}, node: {report.get('node', '-')}", ""]
    lines += ["## Cameras", "", "Replayed (first camera: its frames are the frame sets):", "",
              "| input | camera | type | encoding | resolution | frames |", "|---|---|---|---|---|---|"]
    for bag in report["bags"]:
        for camera in bag["cameras"]:
            lines.append(f"| {_input_name(bag)} | {camera['topic']} | {camera['type'].rsplit('/', 1)[-1]} | "
                         f"{camera['encoding']} | {camera['resolution']} | {camera['frames']} |")
    lines += ["", "Sent to the node: frames published / used by an inference (RouterStats source_stamps) / dropped / "
              "inferences that used an older frame than the newest sent with the frame set:", "",
              "| camera | " + " | ".join(report["policies"]) + " |", "|---|" + "---|" * len(report["policies"])]
    usage_keys = ("frames_published", "frames_used", "frames_dropped", "older_frame_used")
    for topic in next(iter(report["policies"].values()))["cameras"]:
        cells = [" / ".join(_fmt(p["cameras"][topic][key]) for key in usage_keys) for p in report["policies"].values()]
        lines.append(f"| {topic} | " + " | ".join(cells) + " |")
    lines += ["", "## Results", ""]
    lines += ["| | " + " | ".join(report["policies"]) + " |", "|---|" + "---|" * len(report["policies"])]
    rows = [("frames published", "frames_published"), ("chunks received", "chunks_received"),
            ("frames dropped", "frames_dropped"), ("malformed chunks", "malformed_chunks"),
            ("frame sets resent", "frame_sets_resent"),
            ("messages/s", "messages_per_s"), ("frames/s", "frames_per_s")]
    policies = report["policies"].values()
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(_fmt(p[key]) for p in policies) + " |")
    for pct in ("p50", "p95", "p99"):
        lines.append(f"| camera-to-action {pct} (ms) | " + " | ".join(
            _fmt(p["latency_ms"]["camera_to_action"][pct]) for p in policies) + " |")
    lines.append("| inference p50 (ms) | " + " | ".join(_fmt(p["latency_ms"]["inference"]["p50"]) for p in policies) + " |")
    lines.append("| executed fraction (mean) | " + " | ".join(_fmt(p["executed_fraction"]["mean"]) for p in policies) + " |")
    lines.append("| action MSE vs recording | " + " | ".join(_fmt(p["action_error"]["overall"]["mse"]) for p in policies) + " |")
    lines.append("| action MAE vs recording | " + " | ".join(_fmt(p["action_error"]["overall"]["mae"]) for p in policies) + " |")
    lines += ["", "## Action error per dimension (chunk step 0 vs the recorded action at that frame)", ""]
    names = list(next(iter(policies))["action_error"]["per_dimension"]) or []
    header = "| dimension | " + " | ".join(f"{role} MSE | {role} MAE" for role in report["policies"]) + " |"
    lines += [header, "|---|" + "---|---|" * len(report["policies"])]
    for name in names:
        cells = []
        for p in policies:
            dim = p["action_error"]["per_dimension"].get(name, {})
            cells += [_fmt(dim.get("mse")), _fmt(dim.get("mae"))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    agreement = report.get("student_vs_teacher")
    if agreement:
        lines += ["", "## Student vs teacher agreement (chunk step 0, same frames)", "",
                  f"- frames compared: {agreement['frames_compared']}",
                  f"- MSE {_fmt(agreement['overall']['mse'])}, MAE {_fmt(agreement['overall']['mae'])}, "
                  f"whole-chunk MSE {_fmt(agreement['whole_chunk_mse'])}", "",
                  "| dimension | MSE | MAE |", "|---|---|---|"]
        for name, dim in agreement["per_dimension"].items():
            lines.append(f"| {name} | {_fmt(dim['mse'])} | {_fmt(dim['mae'])} |")
    lines += ["", "## Latency", "", report["latency_definition"], "", "## Plots", ""]
    lines += [f"![{key}]({file})" for key, file in PLOTS.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- writing
def write_report(out_dir: str | Path, replays: list[PolicyReplay], recorded: dict[str, RecordedActions],
                 run_info: dict, overwrite: bool = False) -> dict:
    """Build the report in a temp dir beside ``out_dir`` and rename it into place; returns the JSON dict."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    report = build_report(replays, recorded, run_info)
    report["plots"] = dict(PLOTS)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    try:
        (staging / REPORT_JSON).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
        (staging / REPORT_MD).write_text(render_markdown(report))
        _plot_latency(plt, replays, staging / PLOTS["latency_histogram"])
        _plot_executed_fraction(plt, replays, staging / PLOTS["executed_fraction"])
        _plot_layer_usage(plt, replays, staging / PLOTS["layer_usage"])
        _plot_traces(plt, replays, recorded, staging / PLOTS["action_traces"])
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700
        if out_dir.exists():
            if not overwrite:
                raise FileExistsError(f"{out_dir}: already exists; pass --overwrite to replace it")
            old = staging.with_name(staging.name + ".old")
            os.replace(out_dir, old)
            os.replace(staging, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report
