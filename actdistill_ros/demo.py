"""`actdistill demo`: the shipped student drives a simulated Meta-World arm over ROS 2.

sim_arm_node and policy_node run as two processes talking over Fast DDS (loopback only), in
lockstep. Printed and written to ``--out``: success per task, camera-to-action latency p50/p99
(RouterStats), the fraction of backbone layers executed, and the student's speedup over the
teacher measured in the same run (batch 1, interleaved, after the episodes so nothing competes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_STUDENT = Path("weights/metaworld/student")
DEFAULT_TEACHER = Path("weights/metaworld/teacher")
DEFAULT_TASKS = "drawer-close,button-press-topdown,window-open"  # tasks the shipped teacher solves
FILMSTRIP_FRAMES = 6


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="the distilled student drives a simulated arm over ROS 2 (Meta-World)",
        description="Run sim_arm_node + policy_node with the student for a few episodes, then time teacher vs "
        "student; prints success, latency, executed layers and speedup and writes a report to --out.",
    )
    parser.add_argument("--student", type=Path, default=DEFAULT_STUDENT,
                        help=f"student weights directory (default: {DEFAULT_STUDENT})")
    parser.add_argument("--teacher", type=Path, default=DEFAULT_TEACHER,
                        help=f"teacher weights directory (default: {DEFAULT_TEACHER})")
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated tasks (default: {DEFAULT_TASKS})")
    parser.add_argument("--episodes", type=int, default=1, help="episodes per task (default: 1)")
    parser.add_argument("--horizon", type=int, default=150, help="max steps per episode (default: 150)")
    parser.add_argument("--threshold", type=float, default=None, help="router threshold (default: the card's)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    parser.add_argument("--bench-iters", type=int, default=30,
                        help="teacher/student timing iterations (default: 30)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="report directory (default: runs/demo)")
    parser.set_defaults(func=run)
    return parser


def _check_weights(student_dir: Path, teacher_dir: Path) -> None:
    """Both weight sets exist and fit together; raises WeightsError / ValueError with one line."""
    from actdistill_ros.weights import load_card

    for role, path in (("student", student_dir), ("teacher", teacher_dir)):
        if not Path(path).exists():
            raise ValueError(f"{role} weights not found at {path}: train them (actdistill train-teacher, "
                             f"actdistill distill) or pass --{role} DIR")
    student, teacher = load_card(student_dir), load_card(teacher_dir)
    if not student.is_student:
        raise ValueError(f"--student {student_dir}: is a teacher (no router); expected distilled student weights")
    if teacher.is_student:
        raise ValueError(f"--teacher {teacher_dir}: is a student; expected the teacher it was distilled from")
    for name in ("image_size", "state_dim", "action_dim", "num_layers"):
        if getattr(student, name) != getattr(teacher, name):
            raise ValueError(f"student and teacher differ in {name} ({getattr(student, name)} vs "
                             f"{getattr(teacher, name)}): expected the teacher the student was distilled from")
    if student.action_space.kind != "end_effector" or student.action_dim != 4:
        raise ValueError(f"--student {student_dir}: action space {student.action_space.kind} with "
                         f"{student.action_dim} dims; expected Meta-World's (delta xyz + gripper)")


def run(args: argparse.Namespace) -> int:
    from actdistill_ros.weights import WeightsError

    try:
        if args.episodes < 1 or args.horizon < 1 or args.bench_iters < 1:
            raise ValueError("--episodes, --horizon and --bench-iters must be >= 1")
        _check_weights(args.student, args.teacher)
        report = run_demo(args)
    except (WeightsError, ValueError) as err:
        print(f"actdistill demo: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a node process failed (NodeProcessError) or rendering is unavailable
        print(f"actdistill demo: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    print(summary_text(report))
    print(f"wrote {args.out / 'demo.md'}")
    return 0


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    from actdistill_ros.bench import measure
    from actdistill_ros.policy import Policy
    from actdistill_ros.ros.closed_loop import evaluate_through_ros

    out: Path = args.out
    print(f"demo: {args.tasks} x {args.episodes} episode(s), horizon {args.horizon}, sim_arm_node + policy_node "
          "over ROS 2 (lockstep)", file=sys.stderr)
    started = time.perf_counter()
    result, episodes = evaluate_through_ros(
        args.student, args.tasks, episodes_per_task=args.episodes, horizon=args.horizon,
        threshold=args.threshold, device=args.device, out_dir=out / "eval", record_frames=True)
    print(f"demo: timing teacher vs student ({args.bench_iters} interleaved calls each)", file=sys.stderr)
    teacher = Policy.load(args.teacher, device=args.device)
    student = Policy.load(args.student, device=args.device)
    student.threshold = result["threshold"]
    if args.threshold is not None:
        student.keep_fraction = 0.0  # as in the ROS run: an explicit threshold means threshold routing
    bench = measure(teacher, student, iters=args.bench_iters, warmup=min(5, args.bench_iters))
    overall = result["overall"]
    report = {
        "student": str(args.student), "teacher": str(args.teacher), "tasks": result["tasks"],
        "seeds": result["seeds"], "horizon": args.horizon, "threshold": result["threshold"],
        "keep_fraction": student.keep_fraction,
        "success_rate": overall["success_rate"], "successes": overall["successes"], "episodes": overall["episodes"],
        "per_task_success": {name: s["success_rate"] for name, s in result["per_task"].items()},
        "camera_to_action_ms_p50": overall["camera_to_action_ms_p50"],
        "camera_to_action_ms_p99": overall["camera_to_action_ms_p99"],
        "executed_layer_fraction": overall["executed_fraction"],
        "sim_steps_per_s": overall["steps_per_s"],
        "teacher_ms": bench["teacher_ms"], "student_ms": bench["student_ms"],
        "speedup": bench["end_to_end_speedup"], "backbone_speedup": bench["backbone_speedup"],
        "flops_ratio": bench["flops_ratio"], "bench": bench,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    filmstrips = []
    for episode in episodes:
        if episode.frames:
            name = f"frames_{episode.outcome.task}_s{episode.outcome.seed}.png"
            plot_filmstrip(episode, out / name)
            filmstrips.append(name)
    report["filmstrips"] = filmstrips
    from actdistill_ros.sim.report import write_json, write_text

    write_json(out / "demo.json", report)
    write_text(out / "demo.md", demo_markdown(report, result))
    return report


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _routing(keep_fraction: float, threshold: float) -> str:
    return f"keep {keep_fraction:g}" if keep_fraction > 0 else f"threshold {threshold:g}"


def summary_text(r: dict[str, Any]) -> str:
    per_task = ", ".join(f"{name} {rate:.2f}" for name, rate in r["per_task_success"].items())
    return "\n".join([
        f"success              {r['successes']}/{r['episodes']} ({r['success_rate']:.2f}; {per_task})",
        f"camera-to-action     p50 {_fmt(r['camera_to_action_ms_p50'], '.1f')} ms, "
        f"p99 {_fmt(r['camera_to_action_ms_p99'], '.1f')} ms",
        f"executed layers      {r['executed_layer_fraction']:.2f} of the backbone "
        f"({_routing(r['keep_fraction'], r['threshold'])})",
        f"speedup vs teacher   {r['speedup']:.2f}x end to end ({r['teacher_ms']:.2f} -> {r['student_ms']:.2f} ms), "
        f"{r['backbone_speedup']:.2f}x backbone, {r['flops_ratio']:.2f}x fewer backbone FLOPs",
        f"sim through ROS      {_fmt(r['sim_steps_per_s'], '.1f')} steps/s (lockstep), run took {r['wall_s']:.0f} s",
    ])


def demo_markdown(r: dict[str, Any], result: dict[str, Any]) -> str:
    lines = [
        "# ActDistill demo: a distilled student drives a simulated arm over ROS 2",
        "",
        f"Student `{r['student']}` (teacher `{r['teacher']}`), Meta-World v3, evaluation seeds "
        f"{r['seeds'][0]}..{r['seeds'][-1]}, horizon {r['horizon']}. sim_arm_node and policy_node ran as "
        "separate processes over Fast DDS (loopback), in lockstep: one inference per sim step.",
        "",
        "```",
        summary_text(r),
        "```",
        "",
        "| task | success | steps to success |",
        "|---|---|---|",
    ]
    for name, s in result["per_task"].items():
        lines.append(f"| {name} | {s['success_rate']:.2f} | {_fmt(s['mean_steps_to_success'], '.1f')} |")
    lines += [
        "",
        "![success per task](eval/success_per_task.png)",
        "![camera-to-action latency](eval/camera_to_action_ms.png)",
        "",
    ]
    lines += [f"![{name}]({name})" for name in r["filmstrips"]]
    lines += ["", "Full evaluation report: [eval/eval.md](eval/eval.md); node logs in eval/ros_logs/.", ""]
    return "\n".join(lines)


def plot_filmstrip(episode, path: Path) -> None:
    """A few camera frames of one episode, as the policy saw them over ROS."""
    from actdistill_ros.sim.report import pyplot, save_figure

    plt = pyplot()
    frames = episode.frames
    picks = np.unique(np.linspace(0, len(frames) - 1, min(FILMSTRIP_FRAMES, len(frames))).round().astype(int))
    fig, axes = plt.subplots(1, len(picks), figsize=(1.8 * len(picks), 2.2), squeeze=False)
    for ax, index in zip(axes[0], picks):
        ax.imshow(frames[index])
        ax.set_axis_off()
    outcome = episode.outcome
    verdict = (f"success at step {outcome.steps_to_success}" if outcome.success
               else f"no success in {outcome.steps} steps")
    fig.suptitle(f"{outcome.task} (seed {outcome.seed}): {verdict}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
