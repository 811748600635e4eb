"""`actdistill bench`: teacher vs routed student at batch 1, measured in one run.

Without weights it builds a random `--size` teacher (or wraps `--backbone`, a transformers model
with fresh VLA heads); without `--student` it derives the student from the teacher, its router
biased to keep `--keep` of the layers: routing cost and skip savings do not depend on trained
weights, so teacher and student differ only in the layers run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from actdistill_ros.policies.actdistill import RouterConfig, RoutedStudent
from actdistill_ros.policy import Policy, create_untrained_policy, make_card, resolve_device


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="teacher vs student latency and FLOPs at batch 1")
    p.add_argument("--teacher", type=Path, help="teacher weights directory (default: random --size model)")
    p.add_argument("--student", type=Path, help="student weights directory (default: derived from the teacher, --keep)")
    p.add_argument("--size", default="bench", choices=["tiny", "bench", "default"])
    p.add_argument("--backbone", help="without --teacher: wrap this transformers model (directory or hub id) "
                                      "instead of a random --size reference VLA")
    p.add_argument("--keep", type=float, default=0.5, help="layer fraction an untrained router keeps")
    p.add_argument("--threshold", type=float, help="router threshold for the student (default: its card's)")
    p.add_argument("--keep-fraction", type=float,
                   help="student keep routing: top max(1, round(keep * L)) layers per observation "
                        "(default: the card's; 0 = threshold routing)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    p.add_argument("--smolvla", choices=["published", "tiny"],
                   help="instead: one SmolVLA chunk (random weights; a SmolVLA --teacher directory does the same at "
                        "its own sizes and weights) at its published size (SmolVLM2-500M, 16 text "
                        "layers, expert width 0.75, 10 steps, chunk 50, two 512x512 cameras) or a tiny one: FLOPs and "
                        "time of vision, prefix and expert per --keep-fractions (--iters default 2, --warmup 1)")
    p.add_argument("--keep-fractions", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25],
                   help="with --smolvla: VLM layer keep fractions to measure (first 1.0: the speed-up baseline)")
    p.set_defaults(func=run)


def _time(policy: Policy, image, instruction, state) -> tuple[float, float, float, float]:
    out = policy.predict(image, instruction, state)
    return out.timings_ms["total"], out.timings_ms["backbone"], out.backbone_gflops, out.executed_fraction


def measure(teacher: Policy, student: Policy, iters: int = 50, warmup: int = 10, seed: int = 0) -> dict:
    # The backbone's own time needs per-stage timings, a device sync per stage: on for the bench only.
    teacher.profile = student.profile = True
    rng = np.random.default_rng(seed)
    size = teacher.vla.config.image_size
    image = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(teacher.num_cameras)]
    state = np.zeros(teacher.vla.config.state_dim, np.float32) if teacher.vla.config.state_dim else None
    instruction = "push the puck to the goal"
    for _ in range(warmup):
        _time(teacher, image, instruction, state)
        _time(student, image, instruction, state)
    samples = {"teacher": [], "student": []}
    for _ in range(iters):  # interleaved, so drifts in machine load hit both equally
        samples["teacher"].append(_time(teacher, image, instruction, state))
        samples["student"].append(_time(student, image, instruction, state))
    med = {k: [statistics.median(col) for col in zip(*v)] for k, v in samples.items()}
    (t_total, t_backbone, t_gflops, _), (s_total, s_backbone, s_gflops, s_layers) = med["teacher"], med["student"]
    return {
        "device": str(student.device), "dtype": str(student.dtype).replace("torch.", ""),
        "num_layers": student.num_layers, "threshold": student.threshold, "keep_fraction": student.keep_fraction,
        "teacher_ms": round(t_total, 3), "student_ms": round(s_total, 3),
        "end_to_end_speedup": round(t_total / s_total, 3),
        "teacher_backbone_ms": round(t_backbone, 3), "student_backbone_ms": round(s_backbone, 3),
        "backbone_speedup": round(t_backbone / s_backbone, 3) if s_backbone > 0 else float("inf"),
        "teacher_backbone_gflops": round(t_gflops, 4), "student_backbone_gflops": round(s_gflops, 4),
        "flops_ratio": round(t_gflops / s_gflops, 3) if s_gflops > 0 else float("inf"),
        "executed_layer_fraction": round(s_layers, 4), "backbone_flops_fraction": round(s_gflops / t_gflops, 4),
        # The image encoder runs once per observation whatever the route (reference VLA: patch embedding or
        # MobileNetV2), the same for teacher and student; counted apart from the backbone.
        **({"vision_gflops": round(teacher.vla.vision_flops() / 1e9, 4)} if hasattr(teacher.vla, "vision_flops") else {}),
        "iters": iters, "torch_threads": torch.get_num_threads(),
    }


def derived_student(teacher: Policy, keep: float) -> Policy:
    """The teacher's own weights plus a router biased to keep about ``keep`` of the layers."""
    model = RoutedStudent.derive_from(teacher.vla, RouterConfig()).eval()
    model.router.bias_to_keep(keep)
    card = teacher.card
    student_card = make_card(model, card.action_space, norm_stats=card.norm_stats, state_names=card.state_names,
                             camera_names=card.camera_names, provenance={"source": f"derived (keep {keep})"})
    return Policy(model, student_card, teacher.device, teacher.dtype)


def run_smolvla(args: argparse.Namespace) -> dict:
    from actdistill_ros.policies.smolvla.compute_smolvla import bench_keep_fractions, published_smolvla_model

    if args.smolvla == "published":
        model = published_smolvla_model()
    elif args.smolvla == "loaded":  # a SmolVLA directory given as --teacher / --student: its own sizes
        model = args.smolvla_model
    else:
        from actdistill_ros.policies.smolvla.compute_smolvla import tiny_smolvla_model
        model = tiny_smolvla_model()
    iters = 2 if args.iters == 50 else args.iters  # the reference VLA's default would take an hour here
    warmup = 1 if args.warmup == 10 else args.warmup
    if getattr(args, "family", "smolvla") != "smolvla":  # a loaded pi0 / pi0.5: its family's compute model
        from actdistill_ros.policies.flow_family import family_named
        return family_named(args.family).hooks().bench_keep_fractions(model, args.keep_fractions, iters, warmup,
                                                                       resolve_device(args.device))
    return bench_keep_fractions(model, args.keep_fractions, iters=iters, warmup=warmup,
                                device=resolve_device(args.device))


def run(args: argparse.Namespace) -> int:
    if args.smolvla:
        result = run_smolvla(args)
        print(json.dumps(result) if args.json else json.dumps(result, indent=1))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir = args.teacher or create_untrained_policy(Path(tmp, "teacher"), args.size, student=False,
                                                              backbone=args.backbone)
        teacher = Policy.load(teacher_dir, args.device, args.dtype)
        # A LeRobot SmolVLA / pi0 directory alone: vision/prefix/expert per keep fraction; with --student, the
        # two end to end through the serving adapter (router included), interleaved, as below.
        if getattr(teacher, "family", None) in ("smolvla", "pi0") and not args.student:
            args.smolvla, args.smolvla_model, args.family = "loaded", teacher.model, teacher.family
            result = run_smolvla(args)
            print(json.dumps(result) if args.json else json.dumps(result, indent=1))
            return 0
        student = Policy.load(args.student, args.device, args.dtype) if args.student else derived_student(
            teacher, args.keep)
    if args.threshold is not None:
        student.threshold = args.threshold
        student.keep_fraction = 0.0  # threshold routing, unless --keep-fraction is given too
    if args.keep_fraction is not None:
        student.keep_fraction = args.keep_fraction
    result = measure(teacher, student, args.iters, args.warmup)
    if args.json:
        print(json.dumps(result))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            print(f"{key:<{width}}  {value}")
    return 0
