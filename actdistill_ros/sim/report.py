"""Reports of a Meta-World closed-loop evaluation: the per-episode record and its summary, Markdown
tables, PNG plots, GIFs and atomic JSON/text writes.

Shared by the in-process loop (``sim.evaluate``) and the through-ROS loop (``ros.closed_loop``); it
imports neither, so both depend on it and not on each other.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

GIF_FPS = 20  # playback rate of episode GIFs (the control loop runs at 80 Hz; every 4th frame kept)


@dataclass
class EpisodeOutcome:
    task: str
    seed: int
    success: bool
    steps: int  # env steps executed
    steps_to_success: int | None
    policy_calls: int
    predict_ms: list[float] = field(default_factory=list, repr=False)  # wall time of every call
    executed_fraction: float = 1.0  # mean over calls
    backbone_gflops: float = 0.0  # mean per call
    full_backbone_gflops: float = 0.0
    # Mean per call of the whole chunk (vision, prefix and every expert step), for the policies that
    # count it (SmolVLA / pi0 families, whose expert is half a chunk at small sizes); else None.
    chunk_gflops: float | None = None


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a success rate (sound at 0 or n successes, unlike p +- 2 SE)."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    # At 0 or n successes the bound is exactly 0 or 1 (the formula is, up to rounding).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return float(low), float(high)


def summarise(outcomes: list[EpisodeOutcome], execute_steps: int) -> dict[str, Any]:
    ms = np.concatenate([o.predict_ms for o in outcomes]) if outcomes else np.zeros(0)
    steps_ok = [o.steps_to_success for o in outcomes if o.success]
    total_steps = sum(o.steps for o in outcomes)
    calls = sum(o.policy_calls for o in outcomes)
    weights = np.array([o.policy_calls for o in outcomes], dtype=np.float64)

    def weighted(values):
        return float(np.average(values, weights=weights)) if weights.sum() > 0 else 0.0

    return {
        "episodes": len(outcomes),
        "successes": int(sum(o.success for o in outcomes)),
        "success_rate": float(np.mean([o.success for o in outcomes])) if outcomes else 0.0,
        "success_ci95": list(wilson_interval(int(sum(o.success for o in outcomes)), len(outcomes))),
        "mean_steps_to_success": float(np.mean(steps_ok)) if steps_ok else None,
        "policy_calls": int(calls),
        "env_steps": int(total_steps),
        "predict_ms_mean": float(ms.mean()) if ms.size else None,
        "predict_ms_p50": float(np.percentile(ms, 50)) if ms.size else None,
        "predict_ms_p95": float(np.percentile(ms, 95)) if ms.size else None,
        # Policy time amortised over the env steps it drove (calls happen every execute_steps).
        "policy_ms_per_env_step": float(ms.sum() / total_steps) if total_steps else None,
        "executed_fraction": weighted([o.executed_fraction for o in outcomes]),
        "backbone_gflops_per_call": weighted([o.backbone_gflops for o in outcomes]),
        "full_backbone_gflops_per_call": max((o.full_backbone_gflops for o in outcomes), default=0.0),
        "chunk_gflops_per_call": (weighted([o.chunk_gflops for o in outcomes])
                                  if outcomes and all(o.chunk_gflops is not None for o in outcomes) else None),
        "execute_steps": execute_steps,
    }


def episode_dict(o: EpisodeOutcome) -> dict[str, Any]:
    d = asdict(o)
    ms = d.pop("predict_ms")
    d["predict_ms_mean"] = float(np.mean(ms)) if ms else None
    return d


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def routing_label(result: dict[str, Any]) -> str:
    """How the evaluated policy routed: every layer (a teacher), keep k, or threshold tau."""
    if not result.get("is_student", True):
        return "every layer"
    keep = result.get("keep_fraction") or 0.0
    return f"keep {keep:.2f}" if keep > 0 else f"threshold {fmt(result.get('threshold'), '.2f')}"


def eval_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Meta-World closed-loop evaluation ({routing_label(result)})",
        "",
        f"Seeds {result['seeds'][0]}..{result['seeds'][-1]} per task, horizon {result['horizon']}, "
        f"{result['image_size']} px, execute {result['overall']['execute_steps']} actions per chunk, "
        f"device {result['device']}.",
        "",
        "| task | success | episodes | steps to success | predict ms (mean / p95) | policy ms / env step "
        "| executed layers | backbone GFLOPs / call |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = list(result["per_task"].items()) + [("**all**", result["overall"])]
    for name, s in rows:
        lines.append(
            f"| {name} | {s['success_rate']:.2f} | {s['episodes']} | {fmt(s['mean_steps_to_success'], '.1f')} "
            f"| {fmt(s['predict_ms_mean'], '.1f')} / {fmt(s['predict_ms_p95'], '.1f')} "
            f"| {fmt(s['policy_ms_per_env_step'], '.2f')} | {s['executed_fraction']:.2f} "
            f"| {s['backbone_gflops_per_call']:.3f} / {s['full_backbone_gflops_per_call']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def sweep_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Router threshold sweep on Meta-World",
        "",
        f"Tasks {', '.join(result['tasks'])}; seeds {result['seeds'][0]}..{result['seeds'][-1]} per task, "
        f"horizon {result['horizon']}, {result['image_size']} px, device {result['device']}.",
        "",
        "| threshold | success | executed layers | backbone GFLOPs / call | predict ms (mean) | steps to success |",
        "|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        s = p["overall"]
        lines.append(
            f"| {p['threshold']:.2f} | {s['success_rate']:.2f} | {s['executed_fraction']:.2f} "
            f"| {s['backbone_gflops_per_call']:.3f} | {fmt(s['predict_ms_mean'], '.1f')} "
            f"| {fmt(s['mean_steps_to_success'], '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def sweep_keep_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Compute dial sweep on Meta-World: student vs training-free baselines at equal backbone FLOPs",
        "",
        f"Tasks {', '.join(result['tasks'])}; seeds {result['seeds'][0]}..{result['seeds'][-1]} per task, "
        f"horizon {result['horizon']}, {result['image_size']} px, device {result['device']}. "
        "Success with its 95% Wilson interval.",
        "",
        "| method | keep | layers run (k / L) | executed layers | backbone GFLOPs / call | chunk GFLOPs / call "
        "| success | 95% interval | episodes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, points in result["methods"].items():
        for p in points:
            s = p["overall"]
            low, high = s["success_ci95"]
            chunk = s.get("chunk_gflops_per_call")
            lines.append(
                f"| {method} | {p['keep']:.2f} | {p['k']} / {result['num_layers']} | {s['executed_fraction']:.2f} "
                f"| {s['backbone_gflops_per_call']:.3f} | {'-' if chunk is None else f'{chunk:.3f}'} "
                f"| {s['success_rate']:.2f} | [{low:.2f}, {high:.2f}] | {s['episodes']} |"
            )
    return "\n".join(lines) + "\n"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def plot_success_per_task(result: dict[str, Any], path: str | Path) -> None:
    plt = pyplot()
    names = list(result["per_task"])
    rates = [result["per_task"][n]["success_rate"] for n in names]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(names) + 2), 3.6))
    ax.bar(names, rates, color="tab:blue")
    ax.axhline(result["overall"]["success_rate"], color="k", ls="--", lw=1,
               label=f"all tasks {result['overall']['success_rate']:.2f}")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate")
    ax.set_title(f"Meta-World success per task ({routing_label(result)})")
    ax.legend(loc="lower right")
    plt.setp(ax.get_xticklabels(), rotation=35, ha="right")
    fig.tight_layout()
    save_figure(fig, Path(path))
    plt.close(fig)


def plot_success_vs_gflops(result: dict[str, Any], path: str | Path) -> None:
    plt = pyplot()
    points = result["points"]
    gflops = [p["overall"]["backbone_gflops_per_call"] for p in points]
    success = [p["overall"]["success_rate"] for p in points]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(gflops, success, "o-", color="tab:blue")
    for p, x, y in zip(points, gflops, success):
        ax.annotate(f"{p['threshold']:.1f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    full = max((p["overall"]["full_backbone_gflops_per_call"] for p in points), default=0.0)
    if full > 0:
        ax.axvline(full, color="gray", ls=":", lw=1, label=f"all layers {full:.3f}")
        ax.legend(loc="lower right")
    ax.set_xlabel("backbone GFLOPs per policy call")
    ax.set_ylabel("success rate")
    ax.set_ylim(0, 1.05)
    ax.set_title("Success vs backbone compute (labels: threshold)")
    fig.tight_layout()
    save_figure(fig, Path(path))
    plt.close(fig)


def plot_methods_vs_gflops(result: dict[str, Any], path: str | Path) -> None:
    """Success vs GFLOPs per call, one curve per method, error bars = the 95% Wilson interval: the
    whole chunk's where every point counts it (flow-matching families: an expert layer dropped
    with its VLM layer saves expert FLOPs), else the backbone's."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    points_all = [p["overall"] for ps in result["methods"].values() for p in ps]
    key = ("chunk_gflops_per_call" if points_all and all(s.get("chunk_gflops_per_call") is not None
                                                          for s in points_all) else "backbone_gflops_per_call")
    full = max((s[key] for s in points_all), default=0.0)
    for index, (method, points) in enumerate(result["methods"].items()):
        # Methods share their x values (equal FLOPs); a small per-method offset keeps the bars apart.
        gflops = [p["overall"][key] + 0.006 * full * index for p in points]
        success = np.array([p["overall"]["success_rate"] for p in points])
        interval = np.array([p["overall"]["success_ci95"] for p in points]).reshape(-1, 2)
        ax.errorbar(gflops, success, yerr=[success - interval[:, 0], interval[:, 1] - success], fmt="o-",
                    capsize=3, ms=4, label=method)
    what = "chunk" if key == "chunk_gflops_per_call" else "backbone"
    ax.set_xlabel(f"{what} GFLOPs per policy call")
    ax.set_ylabel("success rate (95% Wilson interval)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Success vs {what} compute (x offset per method)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, Path(path))
    plt.close(fig)


def plot_sweep_per_task(result: dict[str, Any], path: str | Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    thresholds = [p["threshold"] for p in result["points"]]
    for name in result["tasks"]:
        ax.plot(thresholds, [p["per_task"][name]["success_rate"] for p in result["points"]], "o-", label=name, ms=3)
    ax.set_xlabel("router threshold")
    ax.set_ylabel("success rate")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, Path(path))
    plt.close(fig)


def write_gif(path: str | Path, frames: Sequence[np.ndarray], fps: int = GIF_FPS, control_hz: float = 80.0) -> None:
    """Write frames (subsampled from the control rate to ``fps``) as a looping GIF."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stride = max(1, int(round(control_hz / fps)))
    kept = list(frames[::stride])
    if len(frames) and kept[-1] is not frames[-1]:
        kept.append(frames[-1])  # always show the final (success) frame
    tmp = path.with_name(path.stem + ".tmp.gif")
    duration_ms = 1000.0 / fps
    try:
        import imageio.v3 as iio

        iio.imwrite(tmp, np.stack(kept), extension=".gif", duration=duration_ms, loop=0)
    except ImportError:
        from PIL import Image  # matplotlib depends on pillow

        images = [Image.fromarray(f) for f in kept]
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    os.replace(tmp, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
