"""Which keys/values does the expert get when a SmolVLA VLM layer is skipped? The measurement behind
METHOD.md's "SmolVLA: keys/values of a skipped layer".

For a teacher (the LeRobot-made tiny fixture with random weights, and a small SmolVLA-architecture
policy trained here from scratch with LeRobot's flow-matching conventions on the generated
two-camera demonstrations), every route of k of the L - 1 routed VLM layers is run under each
candidate (project / reuse / skip_expert, policies/smolvla/routing_smolvla.py) from the same start
noise as the teacher, on held-out observations. Reported per candidate and budget: the action MSE
against the teacher's chunk (normalised units) of the evenly spaced route and of the best route,
among the routes whose counted FLOPs per chunk (vision per camera + prefix once + every expert
step) are at most the budget: the FLOPs of ``project`` at keep 0.25 / 0.5 / 0.75. Then the trained
teacher is distilled (``actdistill distill``, keys/values projected) and the student's routes are
measured the same way.

    python scripts/smolvla_keys_values.py --out DIR [--train-steps 300] [--distill-steps 120] [--batch-size 16]

Minutes on two CPU cores. Prints one JSON object (also written to OUT/kv_candidates.json).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from actdistill_ros.data import TopicConfig  # noqa: E402
from actdistill_ros.data.dataset import collate_samples  # noqa: E402
from actdistill_ros.data.synthetic import write_synthetic_demos  # noqa: E402
from actdistill_ros.distill.config import TrainConfig  # noqa: E402
from actdistill_ros.distill.demos import load_demonstrations  # noqa: E402
from actdistill_ros.distill.losses import masked_mse  # noqa: E402
from actdistill_ros.distill.runtime import DistContext, RunLog  # noqa: E402
from actdistill_ros.distill.training import train_stage  # noqa: E402
from actdistill_ros.policies.actdistill import num_kept_layers  # noqa: E402
from actdistill_ros.policies.smolvla import SmolVLAPolicy  # noqa: E402
from actdistill_ros.policies.smolvla.distill_smolvla import (DemoBatches, flow_noise_and_time, lerobot_state,  # noqa: E402
                                                            padded)
from actdistill_ros.policies.smolvla.routing_smolvla import (KV_MODES, RouteCosts, evenly_spaced_plan,  # noqa: E402
                                                            load_student, sample_routed)

FIXTURES = REPO / "test" / "fixtures" / "lerobot"
PROCESSOR = FIXTURES / "processor"
CAMERAS = ["/cam_high/image_raw", "/cam_wrist/image_raw"]
KEEPS = (0.25, 0.5, 0.75)


def lerobot_policy_dir(out: Path, camera_shapes: dict[str, list[int]], state_dim: int, action_dim: int,
                       stats: dict[str, dict[str, list[float]]], num_vlm_layers: int | None, chunk_size: int,
                       source: Path = FIXTURES / "cross_attn" / "policy") -> Path:
    """A LeRobot directory laid out as the fixture ``source``'s (pipelines, config fields), with these
    features, statistics and (SmolVLA) VLM depth; its weights are written by the caller."""
    shutil.copytree(source, out)
    (out / "model.safetensors").unlink()
    config = json.loads((out / "config.json").read_text())
    config["input_features"] = {k: {"type": "VISUAL", "shape": s} for k, s in camera_shapes.items()}
    config["input_features"]["observation.state"] = {"type": "STATE", "shape": [state_dim]}
    config["output_features"] = {"action": {"type": "ACTION", "shape": [action_dim]}}
    config.update(chunk_size=chunk_size, n_action_steps=chunk_size)
    if num_vlm_layers is not None:
        config.update(num_vlm_layers=num_vlm_layers)
    (out / "config.json").write_text(json.dumps(config, indent=4))
    for pipeline, keys in (("policy_preprocessor.json", ["observation.state", "action"]),
                           ("policy_postprocessor.json", ["action"])):
        data = json.loads((out / pipeline).read_text())
        for step in data["steps"]:
            if step.get("registry_name") in ("normalizer_processor", "unnormalizer_processor"):
                features = {k: config["input_features"].get(k) or config["output_features"][k] for k in keys}
                if step["registry_name"] == "normalizer_processor":
                    features.update({k: config["input_features"][k] for k in camera_shapes})
                step["config"]["features"] = features
                save_file({f"{k}.{n}": torch.tensor(v, dtype=torch.float32) for k in keys for n, v in stats[k].items()},
                          str(out / step["state_file"]))
        (out / pipeline).write_text(json.dumps(data, indent=2))
    return out


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Fresh weights for a model built without initialisation: N(0, 0.02) matrices, unit norms."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            torch.nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, std=0.02)
        elif "Norm" in type(module).__name__ and getattr(module, "weight", None) is not None:
            torch.nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)


def train_teacher(out: Path, bags: Path, steps: int, batch_size: int, seed: int = 0) -> Path:
    """A SmolVLA (the fixture VLM's 8 text layers, expert 0.75, chunk 8, 10 steps) trained from
    scratch with LeRobot's flow-matching loss, saved in LeRobot's layout."""
    topics = TopicConfig(cameras=CAMERAS)
    demos = load_demonstrations([bags], topics, None, 8, 0.15, seed, progress=False)
    frames = [e for e in demos.train.episodes]
    states = np.concatenate([e.states for e in frames])
    actions = np.concatenate([e.actions for e in frames])
    stats = {key: {"mean": v.mean(0).tolist(), "std": v.std(0).tolist(), "min": v.min(0).tolist(),
                   "max": v.max(0).tolist()} for key, v in (("observation.state", states), ("action", actions))}
    height, width = frames[0].images.shape[2:4]
    shapes = {"observation.images.high": [3, height, width], "observation.images.wrist": [3, height, width]}
    directory = lerobot_policy_dir(out, shapes, states.shape[1], actions.shape[1], stats, 8, 8)
    # Build the architecture, initialise it, write it, then load it the way a user's policy loads.
    from actdistill_ros.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from actdistill_ros.policies.smolvla.modeling_smolvla import SmolVLAModel
    from actdistill_ros.policies.smolvla.processor_smolvla import load_vlm_config_and_tokenizer

    vlm_config, _ = load_vlm_config_and_tokenizer(PROCESSOR)
    model = SmolVLAModel(SmolVLAConfig.from_file(directory / "config.json"), vlm_config)
    init_weights(model, seed)
    save_file(lerobot_state(model, None), str(directory / "model.safetensors"))
    policy = SmolVLAPolicy.load(directory, PROCESSOR, float32=True)
    policy.model.train()
    batches = DemoBatches(policy, [k for k in shapes])  # the bags' two topics, in the policy's camera order
    config = policy.config

    def loss_fn(model, batch, step):
        raw, tasks = batches.raw(batch)
        prefix, _ = policy.preprocess(raw, tasks)
        target = batches.target(batch)
        noise, t = flow_noise_and_time(seed, step, target.shape[0], config.chunk_size, config.max_action_dim, "cpu")
        a = padded(target, config.max_action_dim)
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * a
        velocity = policy.model.denoise_step(x_t, t, policy.model.run_prefix(prefix))
        loss = masked_mse(velocity[..., :config.action_dim], (noise - a)[..., :config.action_dim], batch["chunk_valid"])
        return loss, {"task": loss.detach()}

    train_stage(stage="teacher", model=policy.model, checkpoint_modules={"model": policy.model},
                parameters=[p for p in policy.model.parameters() if p.requires_grad], loss_fn=loss_fn,
                dataset=demos.train, config=TrainConfig(steps=steps, batch_size=batch_size, lr=1e-3, warmup_steps=50),
                ctx=DistContext(), out_dir=out.parent / "teacher_run", run_log=RunLog(out.parent / "teacher_run", True),
                resume=False, seed=seed, checkpoint_every=max(steps, 1), log_every=50, amp_bf16=False)
    save_file(lerobot_state(policy.model, None), str(directory / "model.safetensors"))
    return directory


def held_out(policy: SmolVLAPolicy, bags: Path | None, count: int, seed: int = 0):
    """(prefix, noise, one-observation prefix, its images) of ``count`` held-out observations."""
    if bags is None:  # the fixture: random observations of its own cameras
        generator = torch.Generator().manual_seed(seed)
        batch = {k: torch.rand(count, *f.shape, generator=generator) for k, f in policy.config.image_features.items()}
        batch["observation.state"] = torch.randn(count, policy.config.state_dim, generator=generator)
        tasks = ["pick up the red cube and place it in the bowl"] * count
    else:
        demos = load_demonstrations([bags], TopicConfig(cameras=CAMERAS), None, policy.config.chunk_size, 0.15, seed,
                                    progress=False)
        dataset = demos.val
        rows = np.random.default_rng(seed).permutation(len(dataset))[:count]
        items = collate_samples([dataset[int(i)] for i in rows])
        batch, tasks = DemoBatches(policy, list(policy.config.image_features)).raw(items)
    with torch.no_grad():
        prefix, _ = policy.preprocess(batch, tasks)
        one, _ = policy.preprocess({k: v[:1] for k, v in batch.items()}, tasks[:1])
        images = policy._prepare_images({k: v[:1] for k, v in batch.items()}, 1)[0]
    noise = torch.from_numpy(np.random.default_rng([seed, 1]).standard_normal(
        (prefix.embeddings.shape[0], policy.config.chunk_size, policy.config.max_action_dim)).astype(np.float32))
    return prefix, noise, one, images


def published_costs(small: RouteCosts) -> RouteCosts:
    """``small``'s layers priced at SmolVLA's published size (SmolVLM2-500M, 16 kept text layers,
    expert width 0.75, chunk 50, 10 steps, two 512 x 512 cameras, a 12-token task; counted on a
    meta-device model, nothing run): each VLM layer costs the published average of its kind (a
    full layer, keys/values only; its expert layer and cross projection by attention kind), so an
    equal-FLOPs comparison sees the published ratio of prefix to expert to vision."""
    from actdistill_ros.policies.smolvla.compute_smolvla import (PUBLISHED_POLICY, PUBLISHED_SCALE_FACTOR,
                                                                 PUBLISHED_TEXT, PUBLISHED_VISION,
                                                                 PUBLISHED_VLM_NAME, smolvla_config, smolvlm_config)
    from actdistill_ros.policies.smolvla.modeling_smolvla import Prefix, SmolVLAModel

    vlm = smolvlm_config(PUBLISHED_TEXT, PUBLISHED_VISION, PUBLISHED_SCALE_FACTOR)
    config = smolvla_config(["high", "wrist"], (512, 512), 6, 6, vlm_model_name=PUBLISHED_VLM_NAME, **PUBLISHED_POLICY)
    with torch.device("meta"):
        model = SmolVLAModel(config, vlm)
        length = 2 * 64 + 12 + 1
        prefix = Prefix(torch.zeros(1, length, model.width), torch.ones(1, length, dtype=torch.bool),
                        torch.tensor([[False] * (length - 1) + [True]]), (0,) * 128 + (1,) * 12 + (2,))
        big = RouteCosts(model, prefix, [torch.zeros(1, 3, 512, 512)] * 2)
    self_attention = [config.is_self_attention_layer(i) for i in range(model.num_vlm_layers)]

    def mean_of(values, kind):
        chosen = [v for v, s in zip(values, self_attention) if s == kind]
        return sum(chosen) / len(chosen)

    priced = copy.copy(small)
    kinds = small.self_attention
    priced.vision, priced.step_base = big.vision, big.step_base
    priced.full = [sum(big.full[:-1]) / (len(big.full) - 1)] * small.num_vlm_layers
    priced.kv = [sum(big.kv) / len(big.kv)] * small.num_vlm_layers
    priced.cross = [mean_of(big.cross, kind) for kind in kinds]
    priced.expert = [mean_of(big.expert, kind) for kind in kinds]
    return priced


def smolvla_cost_models(policy: SmolVLAPolicy, one, images) -> dict:
    counted = RouteCosts(policy.model, one, images)
    counted.self_attention = [policy.config.is_self_attention_layer(i) for i in range(policy.model.num_vlm_layers)]
    return {"counted": counted, "published_ratios": published_costs(counted)}


@torch.no_grad()
def candidate_table(policy, prefix, noise, one, images, cost_models=smolvla_cost_models,
                    sample=sample_routed) -> dict:
    """Every route of every size under each candidate: error against the teacher; then, per budget
    and cost model (``cost_models(policy, one, images)``: name -> .total(plan, mode)), the best
    error each candidate reaches within the budget. ``sample`` is the family's sample_routed."""
    model, dim = policy.model, policy.config.action_dim
    layers = model.num_vlm_layers - 1
    reference = model.sample_actions(prefix, noise)[..., :dim]
    cost_models = cost_models(policy, one, images)
    routes = []
    for kept in range(1, layers + 1):
        for chosen in itertools.combinations(range(layers), kept):
            plan = [i in chosen for i in range(layers)]
            for mode in KV_MODES:
                actions = sample(model, prefix, noise, [plan] * noise.shape[0], mode)[..., :dim]
                routes.append({"mode": mode, "kept": kept, "plan": plan,
                               "evenly_spaced": plan == evenly_spaced_plan(layers, kept),
                               "mse": float(((actions - reference) ** 2).mean()),
                               **{f"flops_{name}": costs.total(plan, mode)["total"] for name, costs in cost_models.items()}})
    tables = {}
    for name, costs in cost_models.items():
        teacher_total = costs.total(None)["total"]
        budgets = {}
        for keep in KEEPS:
            kept = num_kept_layers(keep, layers)
            budget = costs.total(evenly_spaced_plan(layers, kept), "project")["total"]
            row = {"project_layers": kept, "flops_fraction": budget / teacher_total}
            for mode in KV_MODES:
                fits = [r for r in routes if r["mode"] == mode and r[f"flops_{name}"] <= budget * (1 + 1e-9)]
                even = [r for r in fits if r["evenly_spaced"]]
                best = min(fits, key=lambda r: r["mse"]) if fits else None
                best_even = min(even, key=lambda r: r["mse"]) if even else None
                row[mode] = {"best": best and [best["mse"], best["kept"]],
                             "evenly_spaced": best_even and [best_even["mse"], best_even["kept"]]}
            budgets[f"keep_{keep:g}"] = row
        tables[name] = {"teacher_flops": costs.total(None), "budgets": budgets}
    same_route = [{k: r[k] for k in ("mode", "kept", "mse", "flops_counted", "flops_published_ratios")}
                  for r in routes if r["evenly_spaced"]]
    return {"routed_layers": layers, "cost_models": tables, "same_evenly_spaced_route": same_route}


@torch.no_grad()
def student_table(student_dir: Path, teacher, prefix, noise, one, images, cost_models=smolvla_cost_models,
                  processor: Path = PROCESSOR) -> dict:
    """The distilled student's routes (its router, per observation) against the teacher; FLOPs by
    ``cost_models`` (the teacher's: the student has its shapes)."""
    student = load_student(student_dir, processor, float32=True)
    routed, dim = student.routed, teacher.config.action_dim
    reference = teacher.model.sample_actions(prefix, noise)[..., :dim]
    cost_models = cost_models(teacher, one, images)
    rows = {}
    for keep in (*KEEPS, 1.0):
        routed.keep_fraction = keep
        _, plan = routed.route(prefix)
        actions = routed.sample_actions(prefix, noise, plan)[..., :dim]
        row = {"mse": float(((actions - reference) ** 2).mean()), "executed": float(np.mean(plan))}
        for name, costs in cost_models.items():
            row[f"flops_fraction_{name}"] = float(np.mean([costs.total(p, routed.kv_mode)["total"] for p in plan])
                                                  / costs.total(None)["total"])
        rows[f"keep_{keep:g}"] = row
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--distill-steps", type=int, default=120)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = {}
    started = time.time()
    fixture = SmolVLAPolicy.load(FIXTURES / "cross_attn" / "policy", PROCESSOR, float32=True)
    result["fixture_random_weights"] = candidate_table(fixture, *held_out(fixture, None, args.samples))
    bags = args.out / "bags"
    if not bags.is_dir():
        write_synthetic_demos(bags, episodes=48, length=12, size=32, cameras=CAMERAS)
    teacher_dir = args.out / "teacher"
    if not (teacher_dir / "model.safetensors").is_file():
        shutil.rmtree(teacher_dir, ignore_errors=True)
        train_teacher(teacher_dir, bags, args.train_steps, args.batch_size)
    teacher = SmolVLAPolicy.load(teacher_dir, PROCESSOR, float32=True)
    data = held_out(teacher, bags, args.samples)
    result["trained"] = candidate_table(teacher, *data)
    prefix, noise, one, images = data
    # The teacher's own error: its chunk from other start noise (how much the noise alone moves it).
    other = torch.from_numpy(np.random.default_rng(7).standard_normal(noise.shape).astype(np.float32))
    with torch.no_grad():
        dim = teacher.config.action_dim
        result["trained"]["teacher_vs_itself_other_noise_mse"] = float(
            ((teacher.model.sample_actions(prefix, other) - teacher.model.sample_actions(prefix, noise))[..., :dim] ** 2
             ).mean())
    if args.distill_steps > 0:
        from actdistill_ros.cli import main as cli
        run = args.out / "distill"
        if not (run / "student" / "card.json").is_file():
            shutil.rmtree(run, ignore_errors=True)
            code = cli(["distill", "--teacher", str(teacher_dir), "--data", str(bags), "--out", str(run),
                        "--vlm-processor", str(PROCESSOR), "--camera-topic", CAMERAS[0], "--camera-topic", CAMERAS[1],
                        "--probe-steps", str(max(50, args.distill_steps // 4)), "--distill-steps",
                        str(args.distill_steps), "--batch-size", str(args.batch_size)])
            if code:
                return code
        result["student"] = student_table(run / "student", teacher, prefix, noise, one, images)
    result["seconds"] = round(time.time() - started, 1)
    text = json.dumps(result, indent=1)
    (args.out / "kv_candidates.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
