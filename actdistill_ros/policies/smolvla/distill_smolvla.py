"""ActDistill of a LeRobot flow-matching teacher (SmolVLA; pi0 and pi0.5, the same driver through
their family hooks, policies/flow_family.py) into a routed student of its own family (METHOD.md,
"Flow-matching teachers"), and the student directory it writes.

Stage 1 probes the frozen teacher: one graph-informed head per routed VLM layer reads the
normalised action chunk out of that layer's prefix hidden states. Stage 2 derives the student (the
teacher's weights plus a router over the VLM text layers) and trains it in float32 with

- the flow-matching task loss MSE(v_S(x_t, t), u), LeRobot's schedule: t ~ Beta(1.5, 1) * 0.999
  + 0.001, x_t = t e + (1 - t) a*, u = e - a*;
- velocity distillation MSE(v_S, v_T) at the same (e, t, x_t) for teacher and student;
- the project's per-layer semantic and triple action-probe terms on the routed layers, router
  balance and compute budget, and its training across keep budgets (distill/distillation.py).

The prefix embedding (vision tower, connector, token embeddings; SmolVLA's state projection) stays
frozen, as LeRobot's SmolVLA fine-tuning keeps the vision encoder, so teacher and student share one
prefix embedding per step; the VLM text layers, the expert, the action projections, the router and
the heads train. (e, t) of a step are a pure function of (seed, step), like the data order, so a
resumed run is the uninterrupted one.

The student directory holds LeRobot's files (config.json, the processor pipelines and their
statistics, model.safetensors with the student's weights under LeRobot's names, so LeRobot loads
it as a plain SmolVLA / pi0 / pi0.5), the router (router.safetensors), card.json (family "smolvla"
or "pi0", kind "student") and vlm_processor/ (the VLM's tokenizer, and SmolVLA's VLM config, so it
loads offline).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from actdistill_ros.data.dataset import collate_samples
from actdistill_ros.distill.config import DistillConfig
from actdistill_ros.distill.demos import (Demonstrations, check_policy_takes_demos, demo_cameras,
                                          load_demonstrations)
from actdistill_ros.distill.graph_heads import LayerHeads
from actdistill_ros.distill.losses import (balance_loss, budget_loss, depth_weights, masked_mse, semantic_loss,
                                           triple_action_loss)
from actdistill_ros.distill.runtime import Checkpointer, DistContext, RunLog, init_distributed
from actdistill_ros.distill.training import to_device, train_stage
from actdistill_ros.policies.actdistill import RouterConfig, num_kept_layers
from actdistill_ros.policies.actdistill.modeling_actdistill import TrainRoutes
from actdistill_ros.policies.flow_family import FamilyHooks, family_named, family_of_dir
from actdistill_ros.policies.smolvla.configuration_smolvla import ACTION_KEY, IMAGE_PREFIX, STATE_KEY
from actdistill_ros.policies.smolvla.modeling_smolvla import LEROBOT_PREFIXES, LM_HEAD, Prefix
from actdistill_ros.policies.smolvla.policy_smolvla import CONFIG_FILE, WEIGHTS_FILE
from actdistill_ros.policies.smolvla.processor_smolvla import POSTPROCESSOR_FILE, PREPROCESSOR_FILE
from actdistill_ros.policies.smolvla.routing_smolvla import (CARD_FILE, CARD_FORMAT, KV_PROJECT, KV_SKIP_EXPERT,
                                                            ROUTER_FILE,
                                                            VLM_PROCESSOR_DIR, RoutedFlowStudent, prefix_observation,
                                                            static_plan, student_family)
from actdistill_ros.weights import atomic_write, write_directory

log = logging.getLogger(__name__)

TEACHER_HEADS = "teacher_heads.safetensors"
STUDENT_DIR = "student"
KEEP_SWEEP = (0.25, 0.5, 0.75, 1.0)
# LeRobot's flow-matching time schedule: Beta(1.5, 1) scaled into [0.001, 1].
TIME_BETA = (1.5, 1.0)
TIME_SCALE, TIME_OFFSET = 0.999, 0.001
MAX_EVAL_SAMPLES = 64  # held-out samples the card's metrics average over (each costs a full sample)
# Files of a VLM directory a student needs offline; its weights are in model.safetensors already.
VLM_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")


# ---- the card ----------------------------------------------------------------------------------
# card.json in the layout of the project's model cards (weights.ModelCard: format, kind, family,
# vla_config, action_space, router_config, default_threshold, default_keep_fraction, camera_names,
# metrics, ...), so the tools that read a card read a SmolVLA student's too. What routing needs
# beyond the router's own config sits in vla_config["routing"].
def hooks_of(policy) -> FamilyHooks:
    """The family hooks of a loaded LeRobot policy (its ``family``)."""
    return family_named(policy.family).hooks()


def student_card(teacher, student: RoutedFlowStudent, demos: Demonstrations, metrics: dict,
                 provenance: dict) -> dict:
    config = teacher.config
    cameras = [k for k in config.image_features if not k.startswith(IMAGE_PREFIX + "empty_camera_")]
    image_size = hooks_of(teacher).image_size(config)
    low, high = demos.stats.action_min, demos.stats.action_max
    return {
        "format": CARD_FORMAT, "kind": "student", "family": teacher.family,
        "vla_config": {"image_size": int(image_size), "num_cameras": len(cameras),
                       "chunk_size": config.n_action_steps, "predicted_chunk_size": config.chunk_size,
                       "action_dim": config.action_dim, "state_dim": config.state_dim,
                       "num_layers": student.model.num_vlm_layers,
                       "image_features": {k: list(config.image_features[k].shape) for k in cameras},
                       "routing": {"kv_mode": student.kv_mode, "routed_layers": student.num_routed_layers,
                                   **({"static_layers": [i for i, run in enumerate(student.static_plan) if run]}
                                      if student.static_plan is not None else {})}},
        # Units unknown: the node then commands nothing until action.scale says what a unit is.
        "action_space": {"kind": "joint", "names": list(demos.action_names), "units": ["unknown"] * config.action_dim,
                         "low": [float(v) for v in low], "high": [float(v) for v in high], "gripper_index": None},
        "norm_stats": {},  # the processor files hold LeRobot's normalisation
        "router_config": student.router_config.to_dict(),
        "default_threshold": float(student.threshold), "default_keep_fraction": float(student.keep_fraction),
        "state_names": list(demos.state_names), "camera_names": cameras,
        "provenance": provenance, "metrics": metrics,
    }


# ---- data --------------------------------------------------------------------------------------
class DemoBatches:
    """Demo batches (distill/demos.py items) in LeRobot's raw conventions for one policy."""

    def __init__(self, policy, camera_names: list[str]):
        self.policy = policy
        self.cameras = [name if name.startswith(IMAGE_PREFIX) else None for name in camera_names]
        real = [k for k in policy.config.image_features if not k.startswith(IMAGE_PREFIX + "empty_camera_")]
        if all(self.cameras):  # a LeRobotDataset: its camera feature keys
            if sorted(self.cameras) != sorted(real):
                raise ValueError(f"the demonstrations' cameras {sorted(self.cameras)} are not the policy's {sorted(real)}")
        else:  # rosbags: the camera topics, in the policy's camera order
            if len(camera_names) != len(real):
                raise ValueError(f"{len(camera_names)} camera topic(s) {camera_names}, the policy takes {real}")
            self.cameras = real

    def raw(self, batch: dict) -> tuple[dict[str, Tensor], list[str]]:
        images = batch["image"]  # (B, C, h, w, 3) uint8
        raw = {key: images[:, index].permute(0, 3, 1, 2).float() / 255.0 for index, key in enumerate(self.cameras)}
        raw[STATE_KEY] = batch["state"].float()
        return raw, list(batch["instruction"])

    def target(self, batch: dict) -> Tensor:
        """The normalised action chunk a* (B, H, action_dim), as LeRobot's normalizer computes it."""
        post = self.policy.postprocessor.unnormalizer
        actions = batch["actions"].float()
        return actions if post is None else post.apply(ACTION_KEY, actions)

    @torch.no_grad()
    def prefix(self, batch: dict) -> Prefix:
        raw, tasks = self.raw(batch)
        prefix, _ = self.policy.preprocess(raw, tasks)
        return prefix


def flow_noise_and_time(seed: int, step: int, batch: int, chunk: int, width: int, device) -> tuple[Tensor, Tensor]:
    """The step's start noise e (B, chunk, width) and times t (B,) from LeRobot's schedule: a pure
    function of (seed, step), so that a resumed run draws what the killed one would have."""
    rng = np.random.default_rng([seed, step, 0x666C6F77])  # a stream of its own ("flow")
    noise = torch.from_numpy(rng.standard_normal((batch, chunk, width)).astype(np.float32))
    time = torch.from_numpy((rng.beta(*TIME_BETA, size=batch) * TIME_SCALE + TIME_OFFSET).astype(np.float32))
    return noise.to(device), time.to(device)


def padded(actions: Tensor, width: int) -> Tensor:
    return torch.nn.functional.pad(actions, (0, width - actions.shape[-1]))


def flow_matching_targets(seed: int, step: int, actions: Tensor, chunk_size: int, max_action_dim: int
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """LeRobot's flow-matching training pair for the normalised chunk a* (B, H, action_dim): the noisy
    chunk x_t = t e + (1 - t) a* (padded to max_action_dim), its time t (B,) and the velocity target
    u = e - a*; (e, t) from ``flow_noise_and_time`` (a pure function of seed and step)."""
    noise, time = flow_noise_and_time(seed, step, actions.shape[0], chunk_size, max_action_dim, actions.device)
    target = padded(actions, max_action_dim)
    x_t = time[:, None, None] * noise + (1 - time[:, None, None]) * target
    return x_t, time, noise - target


def flow_matching_loss(model, prefix: Prefix, actions: Tensor, valid: Tensor, seed: int, step: int) -> Tensor:
    """LeRobot's SmolVLA / pi0 training loss MSE(v(x_t, t), u) over the real action columns and valid steps."""
    config = model.config
    x_t, time, u = flow_matching_targets(seed, step, actions, config.chunk_size, config.max_action_dim)
    velocity = model.denoise_step(x_t, time, model.run_prefix(prefix))
    return masked_mse(velocity[..., :config.action_dim], u[..., :config.action_dim], valid)


# ---- stage 1 -------------------------------------------------------------------------------------
def make_heads(model, config: DistillConfig) -> LayerHeads:
    return LayerHeads(model.num_vlm_layers - 1, model.width, config.graph_width, config.graph_top_k,
                      config.graph_heads, config.graph_dropout, model.config.chunk_size, model.config.action_dim)


class ProbedTeacher(nn.Module):
    """The frozen teacher with trainable heads on its routed layers' prefix hidden states."""

    def __init__(self, teacher, heads: LayerHeads):
        super().__init__()
        self.teacher_model = teacher.model.eval().requires_grad_(False)
        self.gated_prefix = hooks_of(teacher).gated_prefix
        self.heads = heads

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher_model.eval()
        return self

    def forward(self, prefix: Prefix) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            _, hiddens = self.gated_prefix(self.teacher_model, prefix, None)
        return self.heads(hiddens, prefix.pad_masks)


class StudentWithHeads(nn.Module):
    def __init__(self, student: RoutedFlowStudent, heads: LayerHeads):
        super().__init__()
        self.student, self.heads = student, heads

    def forward(self, prefix: Prefix, x_t: Tensor, time: Tensor, gate_mode: str, keep: float) -> dict[str, Tensor]:
        if self.student.static_plan is not None:  # the static recipe: its fixed route, no router
            masks = self.student.fixed_masks(x_t.shape[0], x_t.device)
            routes = TrainRoutes(masks, masks, masks)
        else:
            routes = self.student.train_routes(prefix_observation(prefix), gate_mode, keep)
        cache, hiddens = self.student.gated_prefix(prefix, routes.masks)
        if self.student.kv_mode == KV_SKIP_EXPERT:  # the static recipe: dropped layers' expert layers too
            skip = [not run for run in self.student.static_plan] + [False]  # the last layer is never routed
            velocity = self.student.denoise_step(x_t, time, cache, None, [skip] * x_t.shape[0])
        else:
            velocity = self.student.model.denoise_step(x_t, time, cache)
        semantic, probes = self.heads(hiddens, prefix.pad_masks)
        return {"velocity": velocity, "semantic": semantic, "probes": probes, "gates": routes.gates,
                "masks": routes.masks, "threshold_masks": routes.threshold_masks}


def freeze_prefix_embedding(model) -> None:
    """SmolVLA's parts that embed the prefix stay the teacher's (see the module docstring)."""
    for module in (model.vlm.vision_model, model.vlm.connector, model.vlm.text_model.get_input_embeddings(),
                   model.state_proj):
        module.requires_grad_(False)


# ---- the run -------------------------------------------------------------------------------------
def run_flow_distillation(teacher_path: Path, data: list[Path], out_dir: Path, config: DistillConfig,
                          topics=None, stage: str = "all", resume: bool = False, device: str = "auto",
                          vlm_processor: Path | None = None) -> Path | None:
    """Stage 1 and/or 2 on a LeRobot SmolVLA, pi0 or pi0.5 teacher directory; returns the student
    directory."""
    from actdistill_ros.data import TopicConfig

    family = family_of_dir(teacher_path)
    if family is None:
        raise ValueError(f"{teacher_path}: not a LeRobot SmolVLA, pi0 or pi0.5 directory (config.json \"type\")")
    hooks = family.hooks()
    if config.static_drop_expert and family.name == "smolvla":
        # Serving counts a SmolVLA chunk's FLOPs analytically, with every expert layer run.
        raise ValueError(f"{teacher_path}: --static-drop-expert takes a pi0 / pi0.5 teacher (the recipe published "
                         "for them); a SmolVLA static student keeps its expert layers (omit the flag)")
    ctx = init_distributed(device)
    if ctx.distributed:
        raise ValueError(f"{teacher_path}: {family.label} distillation runs in one process (torchrun with several "
                         f"processes is supported for the project's own teachers only)")
    if (Path(teacher_path) / CARD_FILE).is_file() and student_family(teacher_path) is not None:
        raise ValueError(f"{teacher_path}: is a student; distil from a teacher's weights")
    out_dir = Path(out_dir)
    teacher = hooks.policy.load(teacher_path, vlm_processor, device="cpu", float32=True)
    teacher.to(ctx.device)
    teacher.vlm_dir = hooks.vlm_dir(teacher, vlm_processor)  # copied into the student
    c = teacher.config
    topics = topics or TopicConfig()
    cameras = [k for k in c.image_features if not k.startswith(IMAGE_PREFIX + "empty_camera_")]
    check_policy_takes_demos(data, topics, str(teacher_path), len(cameras), c.action_dim, c.state_dim,
                             [k[len(IMAGE_PREFIX):] for k in cameras])
    DemoBatches(teacher, demo_cameras(data, topics))  # the cameras checked before any frame is read
    demos = load_demonstrations(data, topics, None, c.chunk_size, config.val_fraction, config.seed,
                                progress=ctx.is_main)
    if len(demos.action_names) != c.action_dim:
        raise ValueError(f"demonstrations have {len(demos.action_names)} action dims, the teacher predicts {c.action_dim}")
    batches = DemoBatches(teacher, demos.camera_names)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps({**config.to_dict(), "teacher_family": family.name}, indent=2) + "\n"
    atomic_write(out_dir / "distill_config.json", lambda p: p.write_text(text))
    run_log = RunLog(out_dir, ctx.is_main)
    config.amp_bf16 = False  # float32 training: the teacher's velocities are the targets
    heads_path = out_dir / TEACHER_HEADS

    if stage in ("all", "probe"):
        if heads_path.is_file() and not resume:
            raise ValueError(f"{heads_path}: stage 1 already ran here; pass --resume or choose a new --out")
        if not heads_path.is_file():
            heads = probe_teacher(teacher, batches, demos, config, ctx, out_dir, run_log, resume)
            atomic_write(heads_path, lambda p: save_file({k: v.contiguous() for k, v in heads.state_dict().items()},
                                                         str(p)))
            Checkpointer(out_dir / "checkpoints", "probe").clear()
    if stage == "probe":
        run_log.close()
        return None
    if not heads_path.is_file():
        raise ValueError(f"{heads_path}: missing; run stage 1 first (--stage probe or --stage all)")
    student_dir = out_dir / STUDENT_DIR
    if (student_dir / CARD_FILE).is_file() and not resume:
        raise ValueError(f"{student_dir}: a student was already exported here; choose a new --out")
    if not (student_dir / CARD_FILE).is_file():
        teacher_heads = make_heads(teacher.model, config)
        teacher_heads.load_state_dict(load_file(str(heads_path)))
        student = distill_student(teacher, teacher_heads.to(ctx.device), batches, demos, config, ctx, out_dir,
                                  run_log, resume)
        export_student(student_dir, student, teacher, demos, config, teacher_path, data, run_log)
        Checkpointer(out_dir / "checkpoints", "distill").clear()
    run_log.close()
    return student_dir


def probe_teacher(teacher, batches: DemoBatches, demos: Demonstrations, config: DistillConfig,
                  ctx: DistContext, out_dir: Path, run_log: RunLog, resume: bool) -> LayerHeads:
    torch.manual_seed(config.seed)
    heads = make_heads(teacher.model, config).to(ctx.device)
    probed = ProbedTeacher(teacher, heads)

    def loss_fn(model, batch, step):
        _, probes = model(batches.prefix(batch))
        target = batches.target(batch)
        per_layer = torch.stack([masked_mse(a.float(), target, batch["chunk_valid"]) for a in probes])
        return per_layer.mean(), {"deepest_probe": per_layer[-1].detach(), "first_probe": per_layer[0].detach()}

    train_stage(stage="probe", model=probed, checkpoint_modules={"heads": heads}, parameters=list(heads.parameters()),
                loss_fn=loss_fn, dataset=demos.train, config=config.probe, ctx=ctx, out_dir=out_dir,
                run_log=run_log, resume=resume, seed=config.seed, checkpoint_every=config.checkpoint_every,
                log_every=config.log_every, amp_bf16=False)
    return heads


def distill_student(teacher, teacher_heads: LayerHeads, batches: DemoBatches, demos: Demonstrations,
                    config: DistillConfig, ctx: DistContext, out_dir: Path, run_log: RunLog, resume: bool
                    ) -> RoutedFlowStudent:
    torch.manual_seed(config.seed + 1)
    router_config = RouterConfig(default_threshold=config.threshold, dropout=config.router_dropout,
                                 budget_conditioned=config.keep_range is not None, threshold_keep=config.target_keep)
    hooks = hooks_of(teacher)
    static = config.static_layers is not None
    kv_mode = KV_SKIP_EXPERT if config.static_drop_expert else KV_PROJECT
    student = hooks.routed.derive_from(teacher.model, router_config, kv_mode)
    hooks.freeze_prefix_embedding(student.model)
    if static:
        layers = student.num_routed_layers
        kept = num_kept_layers(config.target_keep, layers)
        if config.static_drop_expert:
            sample = to_device(collate_samples([demos.train[0]]), teacher.device)
            kept = pairs_at_equal_flops(teacher.model, batches, sample, kept, layers)
        student.static_plan = static_plan(config.static_layers, layers, kept)
        log.info("static student: routed layers %s of %d kept (%s%s)",
                 [i for i, run in enumerate(student.static_plan) if run], layers, config.static_layers,
                 ", with their expert layers" if config.static_drop_expert else "")
    student_heads = copy.deepcopy(teacher_heads).requires_grad_(True)
    combined = StudentWithHeads(student, student_heads)
    probed_teacher = ProbedTeacher(teacher, teacher_heads.requires_grad_(False)).eval()
    num_layers = student.num_routed_layers
    weights = depth_weights(num_layers, config.gamma).to(ctx.device)
    soft_steps = int(config.soft_gate_fraction * config.distill.steps)
    model_config = teacher.config
    action_dim = model_config.action_dim
    from actdistill_ros.distill.distillation import step_budget  # the project's draw of a step's budget

    def loss_fn(model, batch, step):
        gate_mode = "soft" if step < soft_steps else "hard"
        keep, keep_routes = step_budget(step, config, num_layers)
        prefix = batches.prefix(batch)  # the teacher's frozen embedding, shared with the student
        target = batches.target(batch)
        valid = batch["chunk_valid"]
        x_t, time, u = flow_matching_targets(config.seed, step, target, model_config.chunk_size,
                                             model_config.max_action_dim)
        with torch.no_grad():
            teacher_cache, teacher_hiddens = hooks.gated_prefix(teacher.model, prefix, None)
            teacher_velocity = teacher.model.denoise_step(x_t, time, teacher_cache)
            teacher_semantic, teacher_probes = probed_teacher.heads(teacher_hiddens, prefix.pad_masks)
        out = model(prefix, x_t, time, gate_mode, keep if keep_routes else 0.0)
        velocity = out["velocity"][..., :action_dim]
        task = masked_mse(velocity, u[..., :action_dim], valid)
        velocity_distill = masked_mse(velocity, teacher_velocity[..., :action_dim], valid)
        semantic = semantic_loss(out["semantic"].float(), teacher_semantic.float(), config.eta)
        action = triple_action_loss(out["probes"].float(), teacher_probes.float(), target, valid)
        layers = (weights * (config.alpha * semantic + config.beta * action)).sum()
        budgeted = out["masks"] if gate_mode == "soft" else out["threshold_masks"]
        balance, budget = balance_loss(out["gates"]), budget_loss(budgeted, keep)
        total = task + velocity_distill + layers
        if not static:  # a fixed route has no router to balance or budget
            total = total + config.lambda_balance * balance + config.lambda_budget * budget
        return total, {"task": task.detach(), "velocity_distill": velocity_distill.detach(),
                       "distill": layers.detach(), "budget": budget.detach(), "balance": balance.detach(),
                       "keep": out["threshold_masks"].detach().mean(), "target": out["gates"].new_tensor(keep)}

    router_params = list(student.router.parameters())
    other_params = [p for p in combined.parameters() if p.requires_grad and not any(p is r for r in router_params)]
    groups = [{"params": other_params}] + ([] if static else [{"params": router_params,
                                                                "lr_scale": config.router_lr_scale}])
    train_stage(stage="distill", model=combined, checkpoint_modules={"student": student, "heads": student_heads},
                parameters=groups,
                loss_fn=loss_fn, dataset=demos.train, config=config.distill, ctx=ctx, out_dir=out_dir,
                run_log=run_log, resume=resume, seed=config.seed + 1, checkpoint_every=config.checkpoint_every,
                log_every=config.log_every, amp_bf16=False)
    if static:  # its card's keep is the fraction of routed layers it runs
        student.keep_fraction = sum(student.static_plan) / num_layers
    else:
        student.keep_fraction = config.target_keep if config.keep_range is not None else 0.0
    return student.eval()


# ---- evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
def action_error_vs_teacher(teacher, student: RoutedFlowStudent, batches: DemoBatches, dataset,
                            keep_fractions=KEEP_SWEEP, threshold_too: bool = True, seed: int = 0,
                            max_samples: int = MAX_EVAL_SAMPLES) -> list[dict]:
    """Per routing: MSE of the student's normalised chunk against the teacher's from the same start
    noise, and the fraction of routed layers executed; on up to ``max_samples`` held-out samples."""
    count = min(len(dataset), max_samples)
    indices = np.random.default_rng(seed).permutation(len(dataset))[:count]
    settings = [("keep", k) for k in keep_fractions] + ([("threshold", student.threshold)] if threshold_too else [])
    sums = {s: [0.0, 0.0] for s in settings}
    default = student.keep_fraction
    device = teacher.device
    for start in range(0, count, 16):
        batch = to_device(collate_samples([dataset[int(i)] for i in indices[start:start + 16]]), device)
        prefix = batches.prefix(batch)
        noise = torch.from_numpy(np.random.default_rng([seed, start]).standard_normal(
            (prefix.embeddings.shape[0], teacher.config.chunk_size, teacher.config.max_action_dim)).astype(np.float32)
        ).to(device)
        reference = teacher.model.sample_actions(prefix, noise)[..., :teacher.config.action_dim]
        for kind, value in settings:
            try:
                student.keep_fraction = value if kind == "keep" else 0.0
                _, plan = student.route(prefix)
                actions = student.sample_actions(prefix, noise, plan)[..., :teacher.config.action_dim]
            finally:
                student.keep_fraction = default
            sums[(kind, value)][0] += float(((actions - reference) ** 2).mean(dim=(1, 2)).sum())
            sums[(kind, value)][1] += float(np.mean(plan, axis=1).sum())
    return [{"routing": kind, ("keep_fraction" if kind == "keep" else "threshold"): value,
             "action_mse_vs_teacher": sums[(kind, value)][0] / count,
             "executed_layer_fraction": sums[(kind, value)][1] / count} for kind, value in settings]


def route_costs(model, batches: DemoBatches, sample: dict):
    """The family's per-piece FLOPs of one chunk for the one observation in ``sample``."""
    prefix = batches.prefix(sample)
    # The vision tower's cost depends only on the resized image shape, so the raw pixels do.
    images = batches.policy._prepare_images(batches.raw(sample)[0], 1)[0]
    return hooks_of(batches.policy).route_costs(model, prefix, images)


def pairs_at_equal_flops(model, batches: DemoBatches, sample: dict, routed_kept: int, layers: int) -> int:
    """How many routed layers a static ``skip_expert`` student keeps (each with its expert layer):
    the count whose chunk FLOPs come nearest to those of a routed student (``project``) running
    ``routed_kept`` of the ``layers`` routed layers; a tie goes to the cheaper. Which layers run does
    not change a count (the layers of a stack cost the same)."""
    costs = route_costs(model, batches, sample)

    def total(kept: int, kv_mode: str) -> float:
        return costs.total([layer < kept for layer in range(layers)], kv_mode)["total"]

    target = total(routed_kept, KV_PROJECT)
    return min(range(1, layers + 1), key=lambda kept: (abs(total(kept, KV_SKIP_EXPERT) - target), kept))


def flops_summary(student: RoutedFlowStudent, batches: DemoBatches, sample: dict, target_keep: float) -> dict:
    """Per-chunk FLOPs of one observation: the teacher (every layer) and the student at the card's
    keep fractions, vision per camera, prefix and expert counted apart (the family's route costs,
    counted on what runs). A static student has its one route, and the routed student's at
    ``target_keep`` (what it is compared with)."""
    model, layers = student.model, student.num_routed_layers
    costs = route_costs(model, batches, sample)
    rows = {"teacher": costs.total(None)}
    if student.static_plan is not None:  # one route, whatever the dial
        rows["static"] = costs.total(student.static_plan, student.kv_mode)
        kept = num_kept_layers(target_keep, layers)
        rows[f"routed_keep_{target_keep:g}"] = costs.total([i < kept for i in range(layers)], KV_PROJECT)
        return rows
    for keep in KEEP_SWEEP:
        kept = num_kept_layers(keep, layers)
        plan = [i >= layers - kept for i in range(layers)]  # which k layers run does not change the count
        rows[f"keep_{keep:g}"] = costs.total(plan, student.kv_mode)
    return rows


# ---- export --------------------------------------------------------------------------------------
def lerobot_state(model, teacher_file: Path | None) -> dict[str, Tensor]:
    """The model's weights under LeRobot's SmolVLAPolicy names, in the dtypes the teacher's file
    stores them in (float32 without one); tensors LeRobot saves that are never used here (lm_head)
    are carried over."""
    inverse = [(new, old) for old, new in LEROBOT_PREFIXES]
    stored = load_file(str(teacher_file)) if teacher_file is not None else {}
    out: dict[str, Tensor] = {}
    for name, tensor in model.state_dict().items():
        lerobot = next(old + name[len(new):] for new, old in inverse if name.startswith(new))
        dtype = stored[lerobot].dtype if lerobot in stored else tensor.dtype
        out[lerobot] = tensor.detach().to("cpu", dtype).contiguous().clone()
    if LM_HEAD in stored:
        out[LM_HEAD] = stored[LM_HEAD].contiguous()
    if LM_HEAD in stored and "model.vlm_with_expert.vlm.model.text_model.embed_tokens.weight" not in stored:
        # Tied embeddings: LeRobot's file holds only the head, and the loader reads the embedding from it.
        out.pop("model.vlm_with_expert.vlm.model.text_model.embed_tokens.weight", None)
    return out


def copy_vlm_processor(source: Path, target: Path) -> None:
    """The VLM directory without its weights (config, tokenizer, processor settings)."""
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.name.endswith(VLM_WEIGHT_SUFFIXES):
            shutil.copy2(path, target / path.name)


def export_student(student_dir: Path, student: RoutedFlowStudent, teacher, demos: Demonstrations,
                   config: DistillConfig, teacher_path: Path, data: list[Path], run_log: RunLog | None = None) -> Path:
    """Write the student directory atomically (a staging sibling that replaces it)."""
    teacher_path = Path(teacher_path)
    batches = DemoBatches(teacher, demos.camera_names)
    held_out = demos.val or demos.train
    static = student.static_plan is not None  # its one route: one row
    sweep = action_error_vs_teacher(teacher, student, batches, held_out,
                                    keep_fractions=(student.keep_fraction,) if static else KEEP_SWEEP,
                                    threshold_too=not static, seed=config.seed)
    sample = to_device(collate_samples([held_out[0]]), teacher.device)
    flops = flops_summary(student, batches, sample, config.target_keep)
    metrics = {"held_out_split": "val" if demos.val else "train",
               "held_out_samples": min(len(held_out), MAX_EVAL_SAMPLES),
               "routing_sweep": sweep, "chunk_flops": flops,
               "note": "action_mse_vs_teacher: normalised chunk, same start noise as the teacher"}
    card = student_card(teacher, student, demos, metrics, {
        "distilled_by": "actdistill distill", "teacher": str(teacher_path), "data": [str(d) for d in data],
        "episodes": demos.bags, "distill_config": config.to_dict()})
    def write(staging: Path) -> None:
        for name in (CONFIG_FILE, PREPROCESSOR_FILE, POSTPROCESSOR_FILE):
            shutil.copy2(teacher_path / name, staging / name)
        for pipeline in (PREPROCESSOR_FILE, POSTPROCESSOR_FILE):
            for step in json.loads((teacher_path / pipeline).read_text()).get("steps", []):
                if step.get("state_file"):
                    shutil.copy2(teacher_path / step["state_file"], staging / step["state_file"])
        save_file(hooks_of(teacher).lerobot_state(student.model, teacher_path / WEIGHTS_FILE),
                  str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        save_file({k: v.detach().cpu().contiguous() for k, v in student.router.state_dict().items()},
                  str(staging / ROUTER_FILE))
        copy_vlm_processor(_vlm_dir_of(teacher), staging / VLM_PROCESSOR_DIR)
        (staging / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")

    student_dir = write_directory(student_dir, write)
    if run_log is not None:
        atomic_write(run_log.path.parent / "summary.json", lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))
    default = next((row for row in sweep if row.get("keep_fraction") == student.keep_fraction), None)
    log.info("%s student written to %s%s", family_named(teacher.family).label, student_dir,
             f": at keep {student.keep_fraction:g}, action MSE vs the teacher {default['action_mse_vs_teacher']:.4g}"
             if default else "")
    return student_dir


def _vlm_dir_of(policy) -> Path:
    """The VLM directory the teacher was loaded with (run_flow_distillation records it), else the
    one its family resolves offline."""
    recorded = getattr(policy, "vlm_dir", None)
    return recorded if recorded is not None else hooks_of(policy).vlm_dir(policy, None)
