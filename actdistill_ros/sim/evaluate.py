"""Closed-loop evaluation of a policy on Meta-World, a sweep over the router threshold, and a
sweep over the compute dial (keep fraction) against training-free baselines on the teacher.

The policy predicts a chunk of H actions; the first ``execute_steps`` of them are executed, then
it re-plans from the new frame. Default ``execute_steps = max(1, H // 2)``: re-planning halfway
keeps the loop closed against drift while halving policy calls compared with per-step planning.

Evaluation seeds start at 10000 and never overlap the collection seeds (0 up).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from ..policies.flow_family import family_named
from .metaworld_env import EVAL_SEED_BASE, MetaWorldTask, check_camera_count, parse_task_list
from .report import (EpisodeOutcome, episode_dict, eval_markdown, plot_methods_vs_gflops, plot_success_per_task,
                     plot_success_vs_gflops, plot_sweep_per_task, summarise, sweep_keep_markdown, sweep_markdown,
                     write_gif, write_json, write_text)

DEFAULT_THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(10))
DEFAULT_KEEPS = (0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
BASELINE_ROUTES = ("first", "even", "random")  # actdistill_ros.policy.StaticRoute kinds


class ChunkPredictor(Protocol):
    """What the loop needs from a policy: ``actions`` (H, D) plus accounting per call.

    ``actdistill_ros.policy.Policy`` satisfies it in-process; the ROS mode adapts a node to it.
    """

    threshold: float

    def predict(self, images: list[np.ndarray], instruction: str, state: np.ndarray | None = None) -> Any:
        """One frame per camera, in the policy's camera order."""


def check_eval_seeds(seed_base: int, episodes_per_task: int) -> list[int]:
    seeds = list(range(seed_base, seed_base + episodes_per_task))
    # Evaluation placements must be ones the demos never showed.
    if seed_base < EVAL_SEED_BASE:
        raise ValueError(f"evaluation seed_base {seed_base} overlaps the collection range: expected >= {EVAL_SEED_BASE}")
    return seeds


def _card_value(policy, name: str, default=None):
    """A model-card figure (chunk_size, image_size, state_dim, ...), read from the card or its VLA config."""
    card = getattr(policy, "card", None)
    value = getattr(card, name, None)
    if value is None and isinstance(getattr(card, "vla_config", None), dict):
        value = card.vla_config.get(name)
    return default if value is None else value


def _policy_state_dim(policy) -> int:
    return int(_card_value(policy, "state_dim", 0) or 0)


def run_episode(
    policy: ChunkPredictor,
    task: MetaWorldTask,
    seed: int,
    execute_steps: int | None = None,
    record_frames: bool = False,
) -> tuple[EpisodeOutcome, list[np.ndarray]]:
    """One closed-loop episode; returns the outcome and (optionally) the frames seen."""
    task.reset(seed)
    use_state = _policy_state_dim(policy) > 0
    frames: list[np.ndarray] = []
    predict_ms: list[float] = []
    fractions: list[float] = []
    gflops: list[float] = []
    chunk_gflops: list[float | None] = []
    full_gflops = 0.0
    success = False
    while task.steps < task.horizon and not success:
        images, state = task.observe()
        if record_frames:
            frames.append(images[0])
        start = time.perf_counter()
        out = policy.predict(images, task.instruction, state if use_state else None)
        predict_ms.append((time.perf_counter() - start) * 1e3)
        fractions.append(float(out.executed_fraction))
        gflops.append(float(out.backbone_gflops))
        chunk_gflops.append(getattr(out, "chunk_gflops", None))
        full_gflops = float(out.full_backbone_gflops)
        chunk = np.asarray(out.actions, dtype=np.float32)
        if chunk.ndim != 2 or chunk.shape[1] != 4:
            raise ValueError(f"policy actions {chunk.shape}: expected (H, 4) Meta-World actions")
        k = chunk.shape[0] if execute_steps is None else min(execute_steps, chunk.shape[0])
        for i in range(k):
            if i > 0 and record_frames:
                frames.append(task.observe()[0][0])
            success, info = task.step(chunk[i])
            if success or info.truncated:
                break
    if record_frames and success:
        frames.append(task.observe()[0][0])  # the success frame (first camera)
    return (
        EpisodeOutcome(
            task=task.name,
            seed=seed,
            success=success,
            steps=task.steps,
            steps_to_success=task.success_step,
            policy_calls=len(predict_ms),
            predict_ms=predict_ms,
            executed_fraction=float(np.mean(fractions)) if fractions else 0.0,
            backbone_gflops=float(np.mean(gflops)) if gflops else 0.0,
            full_backbone_gflops=full_gflops,
            chunk_gflops=(float(np.mean(chunk_gflops)) if chunk_gflops and None not in chunk_gflops else None),
        ),
        frames,
    )


class _TaskCache:
    """One MetaWorldTask per task name, reused across episodes and sweep points."""

    def __init__(self, image_size: int, horizon: int, camera: str, policy):
        self.image_size, self.horizon = image_size, horizon
        self.camera = check_camera_count(camera, int(_card_value(policy, "num_cameras", 1)))
        self.tasks: dict[str, MetaWorldTask] = {}

    def get(self, name: str) -> MetaWorldTask:
        if name not in self.tasks:
            self.tasks[name] = MetaWorldTask(
                name, image_size=self.image_size, camera=self.camera, horizon=self.horizon, seed=EVAL_SEED_BASE
            )
        return self.tasks[name]

    def close(self) -> None:
        for task in self.tasks.values():
            task.close()
        self.tasks.clear()


def _resolve_execute_steps(policy, execute_steps: int | None) -> int:
    chunk_size = int(_card_value(policy, "chunk_size", 1))
    if execute_steps is None:
        return max(1, chunk_size // 2)
    if not 1 <= int(execute_steps) <= chunk_size:
        raise ValueError(f"execute_steps {execute_steps}: expected 1..{chunk_size} (the policy's chunk size)")
    return int(execute_steps)


@contextmanager
def single_torch_thread():
    """Torch's intra-op threads and the software (llvmpipe) renderer's threads in one process fight
    for the cores: a predict took ~180 ms instead of ~4 ms on 2 cores. One torch thread meanwhile."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _evaluate(
    policy,
    cache: _TaskCache,
    task_names: list[str],
    seeds: list[int],
    execute_steps: int,
    gif_dir: Path | None,
    desc: str,
    progress: bool,
) -> tuple[dict[str, Any], list[EpisodeOutcome]]:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(task_names) * len(seeds), unit="ep", desc=desc, dynamic_ncols=True, file=sys.stderr)
    outcomes: list[EpisodeOutcome] = []
    start = time.perf_counter()
    try:
        for name in task_names:
            task = cache.get(name)
            for i, seed in enumerate(seeds):
                record = gif_dir is not None and i == 0
                outcome, frames = run_episode(policy, task, seed, execute_steps, record_frames=record)
                outcomes.append(outcome)
                if record and frames:
                    write_gif(gif_dir / f"{name}_s{seed:05d}.gif", frames)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(success=f"{np.mean([o.success for o in outcomes]):.2f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    per_task = {n: summarise([o for o in outcomes if o.task == n], execute_steps) for n in task_names}
    overall = summarise(outcomes, execute_steps)
    overall["wall_s"] = round(time.perf_counter() - start, 2)
    return {"overall": overall, "per_task": per_task}, outcomes


def evaluate_policy(
    policy,
    tasks: str | Sequence[str],
    episodes_per_task: int = 10,
    horizon: int = 200,
    seed_base: int = EVAL_SEED_BASE,
    execute_steps: int | None = None,
    image_size: int | None = None,
    camera: str = "corner4",
    out_dir: str | Path | None = None,
    gif: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``policy`` closed loop on each task for ``episodes_per_task`` seeds from ``seed_base``.

    ``image_size`` defaults to the policy's input size. With ``out_dir``: writes eval.json,
    eval.md, success_per_task.png and (``gif=True``) one GIF per task. Returns the results dict.
    """
    task_names = parse_task_list(tasks)
    if episodes_per_task < 1:
        raise ValueError(f"episodes_per_task {episodes_per_task}: expected >= 1")
    seeds = check_eval_seeds(seed_base, episodes_per_task)
    execute_steps = _resolve_execute_steps(policy, execute_steps)
    image_size = int(image_size or _card_value(policy, "image_size", 96))
    out = Path(out_dir) if out_dir is not None else None
    if gif and out is None:
        raise ValueError("gif=True needs an out_dir to write the GIFs into")
    cache = _TaskCache(image_size, horizon, camera, policy)
    try:
        with single_torch_thread():
            summary, outcomes = _evaluate(
                policy, cache, task_names, seeds, execute_steps, out / "gifs" if gif else None, "eval", progress
            )
    finally:
        cache.close()
    result = {
        **_run_info(policy, task_names, seeds, horizon, image_size, camera),
        "threshold": _threshold(policy),
        "keep_fraction": float(getattr(policy, "keep_fraction", 0.0) or 0.0),
        **summary,
        "episodes": [episode_dict(o) for o in outcomes],
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "eval.json", result)
        write_text(out / "eval.md", eval_markdown(result))
        plot_success_per_task(result, out / "success_per_task.png")
    return result


def sweep_threshold(
    policy,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    tasks: str | Sequence[str] = "mt10",
    episodes_per_task: int = 10,
    horizon: int = 200,
    seed_base: int = EVAL_SEED_BASE,
    execute_steps: int | None = None,
    image_size: int | None = None,
    camera: str = "corner4",
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the same seeds at each router threshold; success vs backbone GFLOPs.

    With ``out_dir``: sweep.json, sweep.md, success_vs_gflops.png, success_per_task_by_threshold.png.
    The policy's threshold is restored afterwards.
    """
    card = getattr(policy, "card", None)
    if card is not None and not getattr(card, "is_student", True):
        raise ValueError("threshold sweep: the policy is a teacher (no router); expected student weights")
    thresholds = [float(t) for t in thresholds]
    if not thresholds or any(not 0.0 <= t <= 1.0 for t in thresholds):
        raise ValueError(f"thresholds {thresholds}: expected a non-empty list of values in [0, 1]")
    task_names = parse_task_list(tasks)
    seeds = check_eval_seeds(seed_base, episodes_per_task)
    execute_steps = _resolve_execute_steps(policy, execute_steps)
    image_size = int(image_size or _card_value(policy, "image_size", 96))
    original = policy.threshold, policy.keep_fraction
    policy.keep_fraction = 0.0  # threshold routing: a keep fraction would override the threshold
    cache = _TaskCache(image_size, horizon, camera, policy)
    points = []
    try:
        for threshold in thresholds:
            policy.threshold = threshold
            with single_torch_thread():
                summary, _ = _evaluate(
                    policy, cache, task_names, seeds, execute_steps, None, f"threshold {threshold:.2f}", progress
                )
            points.append({"threshold": threshold, **summary})
    finally:
        policy.threshold, policy.keep_fraction = original
        cache.close()
    result = {**_run_info(policy, task_names, seeds, horizon, image_size, camera), "points": points}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "sweep.json", result)
        write_text(out / "sweep.md", sweep_markdown(result))
        plot_success_vs_gflops(result, out / "success_vs_gflops.png")
        plot_sweep_per_task(result, out / "success_per_task_by_threshold.png")
    return result


def parse_keep_values(values: Sequence[str | float]) -> list[float]:
    """Keep fractions for --sweep-keep: numbers in (0, 1]; none given -> DEFAULT_KEEPS."""
    keeps = []
    for value in values or DEFAULT_KEEPS:
        try:
            keep = float(value)
        except (TypeError, ValueError):
            keep = float("nan")
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"--sweep-keep {value!r}: expected keep fractions in (0, 1], e.g. 0.3 0.5 1.0")
        keeps.append(keep)
    return keeps


def sweep_keep(
    student,
    teacher,
    keeps: Sequence[float] = DEFAULT_KEEPS,
    tasks: str | Sequence[str] = "mt10",
    episodes_per_task: int = 10,
    horizon: int = 200,
    seed_base: int = EVAL_SEED_BASE,
    execute_steps: int | None = None,
    image_size: int | None = None,
    camera: str = "corner4",
    route_seed: int = 0,
    baseline_routes: Sequence[str] = BASELINE_ROUTES,
    finetuned_truncated: Sequence = (),
    static_students: Sequence = (),
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """The compute dial against static layer skipping at equal backbone FLOPs, on the same seeds.

    At each keep the student runs its top k = max(1, round(keep * L)) layers per observation, and the
    teacher runs k layers on each of ``baseline_routes`` (``BASELINE_ROUTES`` kinds; random ones drawn
    from ``route_seed``; none: the training-free baselines are left out).
    At k = L every route is the whole teacher, so one evaluation serves all of them. A SmolVLA
    teacher runs every layer (no static routes): then the teacher is evaluated once instead.
    ``finetuned_truncated``: k of the teacher's layers fine-tuned on the demos (``train-teacher --init-from
    --layers k [--layer-choice even]``), each evaluated once at its own k as the method "finetuned-first"
    or "finetuned-even" (models of the same method at other k make its curve).
    ``static_students``: students of ``distill --static-layers first|even`` from the same teacher, each
    evaluated once at its own k as the method "static-first" / "static-even".
    With ``out_dir``: sweep_keep.json, sweep_keep.md and sweep_keep.png (one curve per method), and
    after every point sweep_keep.partial.json, from which ``resume`` skips the points already done
    by a killed run of the same weights and settings. Both policies' settings are restored afterwards.
    """
    if not getattr(student.card, "is_student", False):
        raise ValueError("keep sweep: --policy must be student weights (it has no router to set a keep fraction on)")
    if getattr(teacher.card, "is_student", False):
        raise ValueError("keep sweep: --teacher must be teacher weights; the baselines skip a teacher's layers")
    if teacher.num_layers != student.num_layers:
        raise ValueError(f"keep sweep: the teacher has {teacher.num_layers} layers, the student {student.num_layers}; "
                         "expected the student's own teacher")
    from actdistill_ros.policies.actdistill import num_kept_layers  # torch only when a sweep runs
    from actdistill_ros.policies.smolvla.routing_smolvla import KV_SKIP_EXPERT
    from actdistill_ros.policy import StaticRoute

    truncated_methods = []
    for truncated in finetuned_truncated:
        truncated_config = dict(truncated.card.vla_config, num_layers=teacher.num_layers)
        if truncated.card.is_student or truncated_config != teacher.card.vla_config:
            raise ValueError("keep sweep: --finetuned-truncated must be the teacher's architecture with fewer layers "
                             "(actdistill train-teacher --init-from <teacher> --layers k)")
        truncated_methods.append(_truncation_method(truncated, teacher.num_layers))
    static_methods = []
    for static in static_students:
        routing = (static.card.vla_config or {}).get("routing", {})
        if not static.card.is_student or "static_layers" not in routing or static.num_layers != student.num_layers:
            raise ValueError("keep sweep: --static-student takes a student of `actdistill distill --static-layers` "
                             f"with the student's {student.num_layers} routed layers")
        # "-pairs": the published recipe, each dropped VLM layer's expert layer dropped with it.
        pairs = "-pairs" if routing.get("kv_mode") == KV_SKIP_EXPERT else ""
        static_methods.append(f"static-{static.card.provenance['distill_config']['static_layers']}{pairs}")
    keeps = parse_keep_values(keeps)
    task_names = parse_task_list(tasks)
    seeds = check_eval_seeds(seed_base, episodes_per_task)
    execute_steps = _resolve_execute_steps(student, execute_steps)
    image_size = int(image_size or _card_value(student, "image_size", 96))
    check_camera_count(camera, int(_card_value(teacher, "num_cameras", 1)))
    original_keep, original_route = student.keep_fraction, teacher.static_route
    cache = _TaskCache(image_size, horizon, camera, student)
    # A SmolVLA / pi0 teacher takes no static routes (it runs every layer): the baselines are left out
    # and the teacher itself is one point, at k = L, on the same seeds.
    unknown = [route for route in baseline_routes if route not in BASELINE_ROUTES]
    if unknown:
        raise ValueError(f"keep sweep: baseline routes {unknown}: expected some of {', '.join(BASELINE_ROUTES)}")
    routes = () if family_named(getattr(teacher, "family", None) or "") else tuple(baseline_routes)
    methods: dict[str, list[dict[str, Any]]] = {name: [] for name in ("student", *routes)}
    if not routes:
        methods["teacher"] = []
    methods.update({name: [] for name in (*truncated_methods, *static_methods)})
    result = {**_run_info(student, task_names, seeds, horizon, image_size, camera), "route_seed": route_seed,
              "execute_steps": execute_steps, "methods": methods}
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    partial = out / "sweep_keep.partial.json" if out is not None else None
    identity = _sweep_identity(result, student, teacher, *finetuned_truncated, *static_students)
    done = _finished_points(partial, identity) if resume and partial is not None else {}

    def evaluate_point(policy, method: str, keep: float) -> None:
        k = num_kept_layers(keep, student.num_layers)
        point = done.get((method, k))
        if point is None:
            with single_torch_thread():
                summary, _ = _evaluate(policy, cache, task_names, seeds, execute_steps, None,
                                       f"{method} keep {keep:.2f}", progress)
            # Fractions of the teacher's L layers, also for a truncated model (whose own L is k).
            for stats in (summary["overall"], *summary["per_task"].values()):
                stats["executed_fraction"] *= policy.num_layers / student.num_layers
            point = {"keep": keep, "k": k, **summary}
        methods[method].append(point)
        if partial is not None:
            write_json(partial, {"identity": identity, **result})

    try:
        if not routes:
            evaluate_point(teacher, "teacher", 1.0)
        for keep in keeps:
            student.keep_fraction = keep
            evaluate_point(student, "student", keep)
            whole_teacher = num_kept_layers(keep, teacher.num_layers) == teacher.num_layers
            for route in routes:
                if whole_teacher and route != routes[0]:  # every route is the whole teacher
                    methods[route].append(dict(methods[routes[0]][-1], keep=keep))
                    continue
                teacher.static_route = StaticRoute(route, keep, teacher.num_layers, seed=route_seed)
                evaluate_point(teacher, route, keep)
        for truncated, name in sorted(zip(finetuned_truncated, truncated_methods), key=lambda t: t[0].num_layers):
            evaluate_point(truncated, name, truncated.num_layers / teacher.num_layers)
        for static, name in zip(static_students, static_methods):
            evaluate_point(static, name, static.keep_fraction)
    finally:
        student.keep_fraction = original_keep
        teacher.static_route = original_route
        cache.close()
    if out is not None:
        write_json(out / "sweep_keep.json", result)
        write_text(out / "sweep_keep.md", sweep_keep_markdown(result))
        plot_methods_vs_gflops(result, out / "sweep_keep.png")
        partial.unlink(missing_ok=True)
    return result


def _truncation_method(truncated, num_layers: int) -> str:
    """"finetuned-first" or "finetuned-even": which of its teacher's layers a truncated model kept (its
    card's provenance; weights from before the record kept the first k)."""
    from actdistill_ros.policy import evenly_spaced_layers

    k = truncated.num_layers
    kept = list(truncated.card.provenance.get("kept_layers") or range(k))
    for name, layers in (("first", list(range(k))), ("even", evenly_spaced_layers(k, num_layers))):
        if kept == layers:
            return f"finetuned-{name}"
    raise ValueError(f"keep sweep: --finetuned-truncated kept layers {kept} of the teacher's {num_layers}: expected "
                     "the first k or k evenly spaced (train-teacher --layer-choice first|even)")


def _sweep_identity(run: dict[str, Any], *policies) -> str:
    """A digest of the sweep's settings and the cards of its weights: a resumed sweep only reuses
    points measured on the same models, seeds and settings."""
    settings = {key: value for key, value in run.items() if key != "methods"}
    cards = [policy.card.to_dict() if policy is not None else None for policy in policies]
    blob = json.dumps({"settings": settings, "cards": cards}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _finished_points(partial: Path, identity: str) -> dict[tuple[str, int], dict[str, Any]]:
    """(method, k) -> point from a killed sweep's partial file, if it measured the same thing."""
    if not partial.is_file():
        return {}
    try:
        saved = json.loads(partial.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"--resume: {partial} is not a readable sweep record ({err}); delete it to start over")
    if saved.get("identity") != identity:
        raise ValueError(f"--resume: {partial} was measured with other weights or settings; "
                         "delete it or use another --out")
    return {(method, point["k"]): point for method, points in saved["methods"].items() for point in points}


# ------------------------------------------------------------------------------------- run description
def _threshold(policy) -> float | None:
    value = getattr(policy, "threshold", None)
    return float(value) if value is not None else None


def _run_info(policy, task_names, seeds, horizon, image_size, camera) -> dict[str, Any]:
    card = getattr(policy, "card", None)
    device = getattr(policy, "device", None)
    return {
        "benchmark": "metaworld-v3",
        "tasks": task_names,
        "seeds": seeds,
        "horizon": horizon,
        "image_size": image_size,
        "camera": camera,
        "device": str(device) if device is not None else None,
        "chunk_size": _card_value(policy, "chunk_size"),
        "num_layers": _card_value(policy, "num_layers"),
        "is_student": bool(getattr(card, "is_student", False)),
    }


# ---------------------------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval-sim",
        help="closed-loop Meta-World evaluation of policy weights",
        description="Run a policy closed loop in Meta-World on evaluation seeds (10000 up) and write "
        "eval.json, eval.md and plots; --sweep-threshold evaluates a student at several router thresholds.",
    )
    parser.add_argument("--policy", required=True, help="weights directory (model.safetensors + card.json)")
    parser.add_argument("--tasks", default="mt10", help="comma-separated tasks or 'mt10' (default: mt10)")
    parser.add_argument("--episodes", type=int, default=10, help="episodes per task (default: 10)")
    parser.add_argument("--horizon", type=int, default=200, help="max steps per episode (default: 200)")
    parser.add_argument("--execute-steps", type=int, default=None,
                        help="actions executed from each predicted chunk before re-planning (default: chunk size // 2)")
    parser.add_argument("--threshold", type=float, default=None, help="router threshold (default: the card's)")
    parser.add_argument("--sweep-threshold", nargs="*", type=float, default=None, metavar="T",
                        help="evaluate at these thresholds (no values: 0.0 0.1 ... 0.9)")
    parser.add_argument("--sweep-keep", nargs="*", default=None, metavar="KEEP",
                        help="compute dial sweep: the student (--policy) at these keep fractions and the training-free "
                        "baselines (first / even / random k layers) on --teacher at the same k "
                        f"(no values: {' '.join(map(str, DEFAULT_KEEPS))}); a SmolVLA / pi0 teacher is evaluated whole "
                        "instead of the baselines")
    parser.add_argument("--teacher", default=None, help="with --sweep-keep: the teacher weights directory")
    parser.add_argument("--static-student", action="append", default=[], metavar="WEIGHTS",
                        help="with --sweep-keep (repeatable): a student of `actdistill distill --static-layers`, "
                        "evaluated at its own k as the method static-first / static-even")
    parser.add_argument("--baseline-routes", nargs="*", default=list(BASELINE_ROUTES), metavar="ROUTE",
                        help="with --sweep-keep: the training-free baselines run on --teacher at every keep "
                        f"(default: {' '.join(BASELINE_ROUTES)}; none given: left out)")
    parser.add_argument("--finetuned-truncated", action="append", default=[], metavar="WEIGHTS",
                        help="with --sweep-keep (repeatable): k of the teacher's layers fine-tuned on the demos "
                        "(actdistill train-teacher --init-from TEACHER --layers k [--layer-choice even]), one point "
                        "at its own k, as the method finetuned-first / finetuned-even")
    parser.add_argument("--resume", action="store_true",
                        help="with --sweep-keep: skip the points a killed sweep into the same --out already measured")
    parser.add_argument("--image-size", type=int, default=None,
                        help="render size in px; use the demos' size so frames get the training resize "
                        "(default: the policy's input size)")
    parser.add_argument("--camera", default="corner4",
                        help="Meta-World camera, or one per camera image the policy takes, separated by commas in "
                        "its order, e.g. corner4,topview (default: corner4)")
    parser.add_argument("--seed-base", type=int, default=EVAL_SEED_BASE, help="first evaluation seed (default: 10000)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default: float32)")
    parser.add_argument("--out", default="eval_sim", help="output directory (default: ./eval_sim)")
    parser.add_argument("--gif", action="store_true", help="write a GIF of the first episode of each task")
    parser.add_argument("--through-ros", action="store_true",
                        help="run the sim and the policy as ROS 2 nodes (sim_arm_node + policy_node over Fast DDS, "
                        "loopback) instead of in this process")
    parser.add_argument("--realtime-hz", type=float, default=None, metavar="HZ",
                        help="with --through-ros: step the sim in real time at HZ instead of in lockstep")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from actdistill_ros.policy import Policy
    from actdistill_ros.weights import WeightsError

    try:
        policy = Policy.load(args.policy, device=args.device, dtype=args.dtype)
        if args.threshold is not None:
            policy.threshold = args.threshold
            policy.keep_fraction = 0.0  # threshold routing: a keep fraction would override the threshold
        # In-process loop; `actdistill` hands --through-ros to ros.closed_loop.run_eval_sim instead.
        common = dict(tasks=args.tasks, episodes_per_task=args.episodes, horizon=args.horizon,
                      seed_base=args.seed_base, execute_steps=args.execute_steps, image_size=args.image_size,
                      camera=args.camera, out_dir=args.out)
        if args.resume and args.sweep_keep is None:
            raise ValueError("--resume continues a --sweep-keep run; one evaluation has nothing to resume")
        if args.sweep_keep is not None:
            keeps = parse_keep_values(args.sweep_keep)  # before loading the teacher: a typo fails fast
            if args.teacher is None:
                raise ValueError("--sweep-keep needs --teacher <teacher weights> for the baselines")
            teacher = Policy.load(args.teacher, device=args.device, dtype=args.dtype)
            truncated = [Policy.load(d, device=args.device, dtype=args.dtype) for d in args.finetuned_truncated]
            statics = [Policy.load(d, device=args.device, dtype=args.dtype) for d in args.static_student]
            result = sweep_keep(policy, teacher, keeps, baseline_routes=args.baseline_routes,
                                finetuned_truncated=truncated, static_students=statics,
                                resume=args.resume, **common)
            print(sweep_keep_markdown(result))
            print(f"wrote {Path(args.out) / 'sweep_keep.json'}")
        elif args.sweep_threshold is not None:
            result = sweep_threshold(policy, thresholds=args.sweep_threshold or DEFAULT_THRESHOLDS, **common)
            print(sweep_markdown(result))
            print(f"wrote {Path(args.out) / 'sweep.json'}")
        else:
            result = evaluate_policy(policy, gif=args.gif, **common)
            print(eval_markdown(result))
            print(f"wrote {Path(args.out) / 'eval.json'}")
    except (WeightsError, ValueError) as err:
        print(f"actdistill eval-sim: {err}", file=sys.stderr)
        return 2
    return 0
