"""`actdistill distill`: ActDistill stage 1 (teacher probing) and stage 2 (student distillation).

Stage 1 freezes the teacher and trains one graph-informed head per layer to read an action
chunk out of that layer's hidden states. Stage 2 derives the student from the teacher (same
weights plus a router), starts its heads from the probed ones, and trains it with the task,
layer-wise semantic and action distillation, router balance and compute-budget losses
(METHOD.md). With ``keep_range`` one student is trained for every budget in it: each step draws a
keep fraction, tells the router, and trains the top-k routes it picks (METHOD.md, "Beyond the
paper"). Export drops the heads; the card records where routing landed.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from actdistill_ros.data import TopicConfig
from actdistill_ros.data.dataset import collate_samples
from actdistill_ros.distill.config import DistillConfig
from actdistill_ros.distill.demos import (Demonstrations, add_data_arguments, check_policy_takes_demos,
                                          load_demonstrations, topics_from_args)
from actdistill_ros.distill.evaluation import evaluate_routing
from actdistill_ros.distill.graph_heads import LayerHeads
from actdistill_ros.distill.losses import (balance_loss, budget_loss, depth_weights, masked_mse, semantic_loss,
                                           triple_action_loss)
from actdistill_ros.distill.plots import plot_layer_usage, plot_losses
from actdistill_ros.distill.runtime import Checkpointer, DistContext, RunLog, init_distributed
from actdistill_ros.distill.training import full_state, to_device, train_stage, wrap_parallel
from actdistill_ros.policies.actdistill import RouterConfig, RoutedStudent, num_kept_layers
from actdistill_ros.policies.observation import EncodedObservation
from actdistill_ros.policies.vla import ReferenceVLA
from actdistill_ros.policy import Policy, make_card, save_model
from actdistill_ros.weights import atomic_write

log = logging.getLogger(__name__)

TEACHER_HEADS = "teacher_heads.safetensors"
TEACHER_TARGETS = "teacher_targets.safetensors"
STUDENT_DIR = "student"
# Keep fractions the card's metrics report (held-out action MSE and executed fraction at each).
KEEP_SWEEP = (0.3, 0.5, 0.8, 1.0)


def _states(vla: ReferenceVLA, batch: dict) -> Tensor | None:
    return batch["state"] if vla.config.state_dim else None


def _all_layer_hiddens(vla: ReferenceVLA, encoded: EncodedObservation) -> list[Tensor]:
    hidden, mask, hiddens = encoded.tokens, encoded.attention_mask(), []
    for layer in range(vla.num_layers):
        hidden = vla.run_layer(layer, hidden, mask)
        hiddens.append(hidden)
    return hiddens


def make_heads(vla: ReferenceVLA, config: DistillConfig) -> LayerHeads:
    c = vla.config
    return LayerHeads(c.num_layers, c.width, config.graph_width, config.graph_top_k, config.graph_heads,
                      config.graph_dropout, c.chunk_size, c.action_dim)


class ProbedTeacher(nn.Module):
    """Frozen teacher (eval mode, no dropout) with trainable per-layer heads."""

    def __init__(self, teacher: ReferenceVLA, heads: LayerHeads):
        super().__init__()
        self.teacher, self.heads = teacher.eval().requires_grad_(False), heads

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never trains
        return self

    def forward(self, batch: dict) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            encoded = self.teacher.encode(batch["image"], batch["instruction"], _states(self.teacher, batch))
            hiddens = _all_layer_hiddens(self.teacher, encoded)
        return self.heads(hiddens, encoded.valid)


class StudentWithHeads(nn.Module):
    def __init__(self, student: RoutedStudent, heads: LayerHeads):
        super().__init__()
        self.student, self.heads = student, heads

    def forward(self, batch: dict, gate_mode: str, keep_fraction: float = 0.0) -> dict[str, Tensor]:
        vla = self.student.vla
        encoded = vla.encode(batch["image"], batch["instruction"], _states(vla, batch))
        routes = self.student.train_routes(encoded, gate_mode, keep_fraction)
        hiddens = self.student.gated_layers(encoded, routes.masks)
        semantic, probes = self.heads(hiddens, encoded.valid)
        return {"chunk": vla.predict_chunk(encoded.readout(hiddens[-1])), "semantic": semantic, "probes": probes,
                "gates": routes.gates, "masks": routes.masks, "threshold_masks": routes.threshold_masks}


class TeacherTargets:
    """Per-layer teacher semantic vectors and action probes, keyed by stable sample key."""

    def __init__(self, keys: list[str], semantic: Tensor, probes: Tensor):
        self.row = {key: i for i, key in enumerate(keys)}
        self.keys, self.semantic, self.probes = keys, semantic, probes

    @classmethod
    @torch.no_grad()
    def record(cls, probed: ProbedTeacher, dataset, device, batch_size: int = 128) -> "TeacherTargets":
        probed.eval()
        keys, semantic, probes = [], [], []
        starts = range(0, len(dataset), batch_size)
        for start in tqdm(starts, desc="teacher targets", unit="batch", file=sys.stderr, mininterval=1.0):
            batch = to_device(collate_samples([dataset[i] for i in range(start, min(len(dataset), start + batch_size))]),
                              device)
            s, a = probed(batch)
            keys += batch["key"]
            semantic.append(s.transpose(0, 1).cpu())
            probes.append(a.transpose(0, 1).cpu())
        return cls(keys, torch.cat(semantic), torch.cat(probes))

    def save(self, path: Path) -> None:
        atomic_write(path, lambda p: save_file({"semantic": self.semantic.contiguous(),
                                                 "probes": self.probes.contiguous()}, str(p),
                                                metadata={"keys": json.dumps(self.keys)}))

    @classmethod
    def load(cls, path: Path) -> "TeacherTargets":
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            keys = json.loads(f.metadata()["keys"])
        tensors = load_file(str(path))
        return cls(keys, tensors["semantic"], tensors["probes"])

    def lookup(self, keys: list[str], device) -> tuple[Tensor, Tensor]:
        """(L, B, d) semantic and (L, B, H, D) probes for a batch."""
        try:
            rows = torch.tensor([self.row[k] for k in keys])
        except KeyError as err:
            raise ValueError(f"teacher targets have no sample {err}; delete {TEACHER_TARGETS} to re-record") from None
        return (self.semantic[rows].transpose(0, 1).to(device), self.probes[rows].transpose(0, 1).to(device))


def _gather(tensor: Tensor, ctx: DistContext, dim: int, differentiable: bool) -> Tensor:
    """Concatenate a batch-sharded tensor over processes so batch-coupled losses see the global batch."""
    if not ctx.distributed:
        return tensor
    if differentiable:
        return torch.cat(dist_fn.all_gather(tensor.contiguous()), dim=dim)
    parts = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=dim)


# ---- stage 1 ---------------------------------------------------------------------------------
def probe_teacher(teacher: ReferenceVLA, demos: Demonstrations, config: DistillConfig, ctx: DistContext,
                  out_dir: Path, run_log: RunLog, resume: bool) -> LayerHeads:
    torch.manual_seed(config.seed)
    heads = make_heads(teacher, config).to(ctx.device)
    probed = ProbedTeacher(teacher, heads)

    def loss_fn(model, batch, step):
        _, probes = model(batch)
        target = teacher.normalize_actions(batch["actions"])
        per_layer = torch.stack([masked_mse(a.float(), target, batch["chunk_valid"]) for a in probes])
        return per_layer.mean(), {"deepest_probe": per_layer[-1].detach(), "first_probe": per_layer[0].detach()}

    train_stage(stage="probe", model=wrap_parallel(probed, ctx), checkpoint_modules={"heads": heads},
                parameters=list(heads.parameters()), loss_fn=loss_fn, dataset=demos.train, config=config.probe,
                ctx=ctx, out_dir=out_dir, run_log=run_log, resume=resume, seed=config.seed,
                checkpoint_every=config.checkpoint_every, log_every=config.log_every, amp_bf16=config.amp_bf16)
    return heads


# ---- stage 2 ---------------------------------------------------------------------------------
def step_budget(step: int, config: DistillConfig, num_layers: int) -> tuple[float, bool]:
    """(keep fraction the router is told, whether keep routing is trained) for a stage-2 step.

    With ``keep_range``, keep = k / L with k drawn uniformly over the range, and a
    ``threshold_route_fraction`` share of steps trains threshold routes at that budget instead.
    A pure function of (seed, step), like the data order: every process draws the same budget,
    and a resumed run draws what the killed one would have.
    """
    if config.keep_range is None:
        return config.target_keep, False
    low, high = (num_kept_layers(keep, num_layers) for keep in config.keep_range)
    rng = np.random.default_rng([config.seed, step, 0x6B656570])  # a stream of its own ("keep")
    kept = int(rng.integers(low, high + 1))
    return kept / num_layers, bool(rng.random() >= config.threshold_route_fraction)


def distill_student(teacher: ReferenceVLA, teacher_heads: LayerHeads, demos: Demonstrations, config: DistillConfig,
                    ctx: DistContext, out_dir: Path, run_log: RunLog, resume: bool) -> RoutedStudent:
    torch.manual_seed(config.seed + 1)
    router_config = RouterConfig(default_threshold=config.threshold, dropout=config.router_dropout,
                                 budget_conditioned=config.keep_range is not None, threshold_keep=config.target_keep)
    student = RoutedStudent.derive_from(teacher, router_config).to(ctx.device)
    student_heads = copy.deepcopy(teacher_heads).requires_grad_(True)
    if config.freeze_vision:
        student.vla.freeze_vision()
    combined = StudentWithHeads(student, student_heads)
    probed_teacher = ProbedTeacher(teacher, teacher_heads.requires_grad_(False))
    targets = None
    if config.teacher_targets == "cache":
        path = out_dir / TEACHER_TARGETS
        if ctx.is_main and not path.is_file():
            log.info("recording teacher targets for %d samples", len(demos.train))
            TeacherTargets.record(probed_teacher, demos.train, ctx.device).save(path)
        if ctx.distributed:
            dist.barrier()
        targets = TeacherTargets.load(path)
    weights = depth_weights(teacher.num_layers, config.gamma).to(ctx.device)
    soft_steps = int(config.soft_gate_fraction * config.distill.steps)

    def loss_fn(model, batch, step):
        gate_mode = "soft" if step < soft_steps else "hard"
        keep, keep_routes = step_budget(step, config, teacher.num_layers)
        out = model(batch, gate_mode, keep if keep_routes else 0.0)
        target = teacher.normalize_actions(batch["actions"])
        if targets is not None:
            teacher_semantic, teacher_probes = targets.lookup(batch["key"], ctx.device)
        else:
            with torch.no_grad():
                teacher_semantic, teacher_probes = probed_teacher.eval()(batch)
        task = masked_mse(out["chunk"].float(), target, batch["chunk_valid"])
        semantic = semantic_loss(_gather(out["semantic"].float(), ctx, 1, True),
                                 _gather(teacher_semantic.float(), ctx, 1, False), config.eta)
        action = triple_action_loss(out["probes"].float(), teacher_probes.float(), target, batch["chunk_valid"])
        distill = (weights * (config.alpha * semantic + config.beta * action)).sum()
        gates = _gather(out["gates"], ctx, 0, True)
        # The budget term acts on what threshold routing would run (soft gates while they are
        # applied): it calibrates the threshold to the budget, also on the steps that train top-k routes.
        budgeted = _gather(out["masks"] if gate_mode == "soft" else out["threshold_masks"], ctx, 0, True)
        balance, budget = balance_loss(gates), budget_loss(budgeted, keep)
        total = task + distill + config.lambda_balance * balance + config.lambda_budget * budget
        # "keep": the fraction threshold routing executes (eval-mode gates), "target": the budget told.
        threshold_keep = out["threshold_masks"].detach().mean()
        return total, {"task": task.detach(), "distill": distill.detach(), "semantic": semantic.mean().detach(),
                       "action": action.mean().detach(), "balance": balance.detach(), "budget": budget.detach(),
                       "keep": threshold_keep, "target": gates.new_tensor(keep), "mean_gate": gates.mean().detach()}

    fsdp = config.fsdp and ctx.distributed
    # Sharding replaces the parameters, so the optimizer groups are taken after wrapping.
    model = wrap_parallel(combined, ctx, fsdp, [*student.vla.layers, *student_heads.heads],
                          find_unused=config.freeze_vision)
    router_params = list(student.router.parameters())
    other_params = [p for p in combined.parameters() if p.requires_grad and not any(p is r for r in router_params)]
    train_stage(stage="distill", model=model, checkpoint_modules={"student": student, "heads": student_heads},
                parameters=[{"params": other_params},
                            {"params": router_params, "lr_scale": config.router_lr_scale}],
                loss_fn=loss_fn,
                dataset=demos.train, config=config.distill, ctx=ctx, out_dir=out_dir, run_log=run_log, resume=resume,
                seed=config.seed + 1, checkpoint_every=config.checkpoint_every, log_every=config.log_every,
                amp_bf16=config.amp_bf16, fsdp=fsdp)
    # Trained across budgets: the card defaults to keep routing at the target budget.
    student.keep_fraction = config.target_keep if config.keep_range is not None else 0.0
    if not fsdp:
        return student
    # Export (main process only) needs a plain student: gather the shards (collective; the full
    # state lands on the main process) and rebuild it there.
    state = full_state(combined, {"student": student}, fsdp=True)
    if not ctx.is_main:
        return student
    plain = RoutedStudent.derive_from(teacher, student.router_config)
    plain.load_state_dict({k[len("student."):]: v for k, v in state.items()})
    plain.threshold, plain.keep_fraction = student.threshold, student.keep_fraction
    return plain


# ---- entry point -----------------------------------------------------------------------------
def run_distillation(teacher_path: Path, data: list[Path], out_dir: Path, config: DistillConfig,
                     topics: TopicConfig | None = None, stage: str = "all", resume: bool = False,
                     device: str = "auto", vlm_processor: Path | None = None) -> Path | None:
    """Run stage 1 and/or 2; returns the student weights directory when stage 2 ran. A LeRobot
    SmolVLA, pi0 or pi0.5 teacher directory (config.json "type": "smolvla", "pi0", "pi05") goes to the
    flow-matching driver, policies/smolvla/distill_smolvla.py."""
    from actdistill_ros.policies.flow_family import family_of_dir
    if family_of_dir(teacher_path) is not None:
        from actdistill_ros.policies.smolvla.distill_smolvla import run_flow_distillation
        return run_flow_distillation(teacher_path, data, out_dir, config, topics, stage, resume, device,
                                     vlm_processor)
    if config.static_layers is not None:
        raise ValueError(f"--static-layers: a SmolVLA / pi0 teacher's recipe; {teacher_path} is a reference VLA "
                         "teacher, whose fixed-route baselines are eval-sim's static routes")
    ctx = init_distributed(device)
    out_dir = Path(out_dir)
    teacher_policy = Policy.load(teacher_path, device="cpu")
    if teacher_policy.card.is_student:
        raise ValueError(f"{teacher_path}: is a student; distil from a teacher's weights")
    teacher = teacher_policy.vla.to(ctx.device).eval()
    c = teacher.config
    topics = topics or TopicConfig()
    check_policy_takes_demos(data, topics, str(teacher_path), c.num_cameras, c.action_dim, c.state_dim,
                             teacher_policy.card.camera_names)
    demos = load_demonstrations(data, topics, c.image_size, c.chunk_size, config.val_fraction,
                                config.seed, progress=ctx.is_main)
    if len(demos.action_names) != c.action_dim:
        raise ValueError(f"demonstrations have {len(demos.action_names)} action dims, the teacher predicts {c.action_dim}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:
        text = json.dumps(config.to_dict(), indent=2) + "\n"
        atomic_write(out_dir / "distill_config.json", lambda p: p.write_text(text))
    run_log = RunLog(out_dir, ctx.is_main)
    heads_path = out_dir / TEACHER_HEADS

    if stage in ("all", "probe"):
        if heads_path.is_file() and not resume:
            raise ValueError(f"{heads_path}: stage 1 already ran here; pass --resume or choose a new --out")
        if not heads_path.is_file():
            heads = probe_teacher(teacher, demos, config, ctx, out_dir, run_log, resume)
            if ctx.is_main:
                atomic_write(heads_path, lambda p: save_file(
                    {k: v.contiguous() for k, v in heads.state_dict().items()}, str(p)))
                Checkpointer(out_dir / "checkpoints", "probe").clear()
            if ctx.distributed:
                dist.barrier()
    if stage == "probe":
        run_log.close()
        return None

    if not heads_path.is_file():
        raise ValueError(f"{heads_path}: missing; run stage 1 first (--stage probe or --stage all)")
    student_dir = out_dir / STUDENT_DIR
    if (student_dir / "card.json").is_file() and not resume:
        raise ValueError(f"{student_dir}: a student was already exported here; choose a new --out")
    teacher_heads = make_heads(teacher, config)
    teacher_heads.load_state_dict(load_file(str(heads_path)))
    teacher_heads.to(ctx.device)
    if not (student_dir / "card.json").is_file():
        student = distill_student(teacher, teacher_heads, demos, config, ctx, out_dir, run_log, resume)
        if ctx.is_main:
            _export(teacher, student, teacher_policy, demos, config, ctx, out_dir, student_dir, run_log,
                    teacher_path, data)
            Checkpointer(out_dir / "checkpoints", "distill").clear()
        if ctx.distributed:
            dist.barrier()
    run_log.close()
    return student_dir


def routing_sweep(student: RoutedStudent, dataset, device) -> list[dict]:
    """Held-out action MSE and executed-layer fraction in threshold routing (keep_fraction 0.0)
    and at each keep fraction of KEEP_SWEEP."""
    default, rows = student.keep_fraction, []
    try:
        for keep in (0.0, *KEEP_SWEEP):
            student.keep_fraction = keep
            result = evaluate_routing(student.vla, student, dataset, device)
            rows.append({"keep_fraction": keep, "executed_layer_fraction": result["executed_layer_fraction"],
                         "action_mse": result["action_mse"]})
    finally:
        student.keep_fraction = default
    return rows


def _export(teacher, student, teacher_policy, demos, config, ctx, out_dir, student_dir, run_log, teacher_path, data):
    held_out = demos.val or demos.train
    teacher_eval = evaluate_routing(teacher, None, held_out, ctx.device)
    student_eval = evaluate_routing(student.vla, student, held_out, ctx.device)
    routing = f"keep {student.keep_fraction:g}" if student.keep_fraction else f"threshold {student.threshold:g}"
    metrics = {
        "held_out_samples": student_eval["samples"], "held_out_split": "val" if demos.val else "train",
        "routing": routing, "threshold": config.threshold, "keep_fraction": student.keep_fraction,
        "executed_layer_fraction": student_eval["executed_layer_fraction"],
        "backbone_flops_fraction": student_eval["backbone_flops_fraction"],
        "teacher_action_mse": teacher_eval["action_mse"], "student_action_mse": student_eval["action_mse"],
        "layer_usage": student_eval["layer_usage"], "target_keep": config.target_keep,
        "routing_sweep": routing_sweep(student, held_out, ctx.device),
    }
    card = make_card(student, teacher_policy.card.action_space, norm_stats=teacher_policy.card.norm_stats,
                     state_names=teacher_policy.card.state_names, camera_names=demos.camera_names,
                     provenance={"distilled_by": "actdistill distill", "teacher": str(teacher_path),
                                 "teacher_provenance": teacher_policy.card.provenance,
                                 "bags": demos.bags, "distill_config": config.to_dict(),
                                 "data": [str(d) for d in data]},
                     metrics=metrics)
    save_model(student_dir, student, card)
    plot_losses(run_log.records(), out_dir / "losses.png")
    plot_layer_usage(student_eval["layer_usage"], routing, out_dir / "layer_usage.png")
    atomic_write(out_dir / "summary.json", lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))
    log.info("student written to %s: at %s executes %.0f%% of layers, held-out action MSE %.4f (teacher %.4f)",
             student_dir, routing, 100 * metrics["executed_layer_fraction"], metrics["student_action_mse"],
             metrics["teacher_action_mse"])


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("distill", help="ActDistill: teacher probing (stage 1) + student distillation (stage 2)")
    p.add_argument("--teacher", type=Path, required=True,
                   help="teacher weights directory, or a LeRobot SmolVLA / pi0 / pi0.5 policy directory")
    add_data_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="output directory (student/ is the weights)")
    p.add_argument("--config", type=Path, help="distillation YAML (see config/distill.yaml)")
    p.add_argument("--stage", choices=["all", "probe", "distill"], default="all")
    p.add_argument("--resume", action="store_true", help="continue a killed run in --out")
    p.add_argument("--device", default="auto")
    p.add_argument("--vlm-processor", type=Path, default=None,
                   help="SmolVLA / pi0 teacher: a directory with the VLM's tokenizer (SmolVLA: and config.json; "
                        "default: the Hugging Face cache of the name the policy gives, offline)")
    p.add_argument("--probe-steps", type=int)
    p.add_argument("--distill-steps", type=int)
    p.add_argument("--batch-size", type=int, help="global batch for both stages")
    p.add_argument("--target-keep", type=float,
                   help="fraction of layers the student should execute (its card's default keep fraction)")
    p.add_argument("--keep-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="train one student for every keep fraction in [LOW, HIGH] (YAML keep_range: null "
                        "trains for the single threshold instead)")
    p.add_argument("--static-layers", choices=["first", "even"],
                   help="SmolVLA / pi0 teacher: the static recipe, a student with a fixed route of the first or "
                        "evenly spaced round(--target-keep x routed layers) layers (same steps and losses, no router)")
    p.add_argument("--static-drop-expert", action="store_true", default=None,
                   help="--static-layers: drop each dropped VLM layer's paired expert layer too (the published "
                        "recipe), keeping as many layer pairs as come nearest to the routed student's FLOPs at "
                        "--target-keep")
    p.add_argument("--lambda-budget", type=float)
    p.add_argument("--teacher-targets", choices=["cache", "on_the_fly"])
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--fsdp", action="store_true", default=None,
                   help="under torchrun: shard the student over processes (FSDP) instead of DDP")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = {"probe.steps": args.probe_steps, "distill.steps": args.distill_steps,
                 "probe.batch_size": args.batch_size, "distill.batch_size": args.batch_size,
                 "target_keep": args.target_keep, "lambda_budget": args.lambda_budget,
                 "keep_range": args.keep_range, "static_layers": args.static_layers,
                 "static_drop_expert": args.static_drop_expert,
                 "teacher_targets": args.teacher_targets, "checkpoint_every": args.checkpoint_every,
                 "seed": args.seed, "fsdp": args.fsdp}
    config = DistillConfig.from_yaml(args.config, overrides)
    run_distillation(args.teacher, args.data, args.out, config, topics_from_args(args), args.stage, args.resume,
                     args.device, args.vlm_processor)
    return 0
