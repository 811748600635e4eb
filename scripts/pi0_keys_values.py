"""Which keys/values does the pi0 expert get when a VLM layer is skipped? The measurement behind
METHOD.md's "pi0: keys/values of a skipped layer", made as scripts/smolvla_keys_values.py makes
SmolVLA's (its candidate table, held-out observations and directory layout are reused).

Every pi0 expert layer i attends jointly over VLM layer i's keys/values and its own, in every
denoising step. For a teacher (the LeRobot-made tiny pi0 and pi0.5 fixtures with random weights,
and a pi0 of the fixture's widths with 8 + 8 layers trained here from scratch with LeRobot's
flow-matching loss on generated two-camera demonstrations), every route of k of the L - 1 routed
VLM layers is run under each candidate (project / reuse / skip_expert, policies/pi0/routing_pi0.py)
from the same start noise as the teacher, on held-out observations. Reported per candidate and
budget: the action MSE against the teacher's chunk (normalised units) of the evenly spaced route
and of the best route among the routes whose FLOPs per chunk (vision per camera + prefix once +
every expert step) are at most the budget, the FLOPs of ``project`` at keep 0.25 / 0.5 / 0.75; FLOPs
as counted on the measured model and at pi0's published size's per-layer prices. Then the trained
teacher is distilled (``actdistill distill``, keys/values projected) and the student's routes are
measured the same way.

    python scripts/pi0_keys_values.py --out DIR [--train-steps 300] [--samples 32] [--batch-size 16]
        [--distill-steps 120]

Minutes on two CPU cores. Prints one JSON object (also written to OUT/kv_candidates.json).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
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
sys.path.insert(0, str(REPO / "scripts"))

from actdistill_ros.data import TopicConfig  # noqa: E402
from actdistill_ros.data.synthetic import write_synthetic_demos  # noqa: E402
from actdistill_ros.distill.config import TrainConfig  # noqa: E402
from actdistill_ros.distill.demos import load_demonstrations  # noqa: E402
from actdistill_ros.distill.runtime import DistContext, RunLog  # noqa: E402
from actdistill_ros.distill.training import train_stage  # noqa: E402
from actdistill_ros.policies.pi0 import PI0Policy  # noqa: E402
from actdistill_ros.policies.pi0.compute_pi0 import PI0RouteCosts  # noqa: E402
from actdistill_ros.policies.pi0.configuration_pi0 import PI0Config  # noqa: E402
from actdistill_ros.policies.pi0.modeling_pi0 import GemmaSizes, PI0Model, Prefix  # noqa: E402
from actdistill_ros.policies.pi0.routing_pi0 import lerobot_state, sample_routed  # noqa: E402
from actdistill_ros.policies.smolvla.distill_smolvla import DemoBatches, flow_matching_loss  # noqa: E402
from smolvla_keys_values import CAMERAS, FIXTURES, candidate_table, held_out, init_weights  # noqa: E402
from smolvla_keys_values import lerobot_policy_dir, student_table  # noqa: E402

PI0_FIXTURES = FIXTURES / "pi0"
TOKENIZER = PI0_FIXTURES / "paligemma_tokenizer"
# pi0's published sizes (PaliGemma gemma_2b + the gemma_300m expert, SigLIP So400m/14 at 224) and
# LeRobot's PI0Config defaults: chunk 50, 10 steps, 48 prompt tokens; two cameras, as for SmolVLA.
PUBLISHED_VLM = GemmaSizes(width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1, head_dim=256)
PUBLISHED_EXPERT = GemmaSizes(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256)
PUBLISHED_VISION = dict(vision_width=1152, vision_depth=27, vision_mlp_dim=4304, patch_size=14, image_size=224)
PUBLISHED_VOCAB, PUBLISHED_TOKENS, PUBLISHED_CAMERAS = 257152, 48, 2


def published_model() -> tuple[PI0Model, Prefix, list[torch.Tensor]]:
    """pi0 at its published size on the meta device (nothing allocated or run) and a prefix of it."""
    from actdistill_ros.policies.pi0.modeling_pi0 import PI0Sizes

    data = json.loads((PI0_FIXTURES / "pi0" / "policy" / "config.json").read_text())
    data["input_features"] = {f"observation.images.camera{i}": {"type": "VISUAL", "shape": [3, 224, 224]}
                              for i in range(PUBLISHED_CAMERAS)}
    data["input_features"]["observation.state"] = {"type": "STATE", "shape": [6]}
    data["output_features"] = {"action": {"type": "ACTION", "shape": [6]}}
    data.update(image_resolution=[224, 224], chunk_size=50, n_action_steps=50, max_state_dim=32, max_action_dim=32,
                num_inference_steps=10, tokenizer_max_length=PUBLISHED_TOKENS, empty_cameras=0)
    config = PI0Config.from_dict(data, "pi0 published sizes")
    sizes = PI0Sizes(vocab=PUBLISHED_VOCAB, vlm=PUBLISHED_VLM, expert=PUBLISHED_EXPERT, **PUBLISHED_VISION)
    with torch.device("meta"):
        model = PI0Model(config, sizes)
        length = PUBLISHED_CAMERAS * 256 + PUBLISHED_TOKENS
        prefix = Prefix(torch.zeros(1, length, PUBLISHED_VLM.width), torch.ones(1, length, dtype=torch.bool),
                        PUBLISHED_CAMERAS * 256, torch.zeros(1, 32))
        images = [torch.zeros(1, 3, 224, 224)] * PUBLISHED_CAMERAS
    return model, prefix, images


def published_costs(small: PI0RouteCosts) -> PI0RouteCosts:
    """``small``'s layers priced at pi0's published size: each VLM layer (full, keys/values only) and
    each expert layer at the published average, vision and the per-step rest as published, so an
    equal-FLOPs comparison sees the published ratio of prefix to expert to vision."""
    model, prefix, images = published_model()
    with torch.device("meta"):
        big = PI0RouteCosts(model, prefix, images)
    priced = copy.copy(small)
    priced.vision, priced.step_base, priced.context, priced.steps = big.vision, big.step_base, big.context, big.steps
    priced.full = [sum(big.full[:-1]) / (len(big.full) - 1)] * small.num_vlm_layers
    priced.kv = [sum(big.kv) / len(big.kv)] * small.num_vlm_layers
    priced.expert = [sum(big.expert) / len(big.expert)] * small.num_vlm_layers
    return priced


def pi0_cost_models(policy: PI0Policy, one, images) -> dict:
    counted = PI0RouteCosts(policy.model, one, images)
    return {"counted": counted, "published_ratios": published_costs(counted)}


def fixture_observations(policy: PI0Policy, count: int, seed: int = 0):
    """(prefix, noise, one-observation prefix, its images) of random observations of the fixture's
    real cameras (its placeholder camera stays missing, as LeRobot feeds it)."""
    generator = torch.Generator().manual_seed(seed)
    batch = {k: torch.rand(count, *f.shape, generator=generator) for k, f in policy.config.image_features.items()
             if "empty_camera_" not in k}
    batch["observation.state"] = torch.randn(count, policy.config.state_dim, generator=generator)
    tasks = ["pick up the red cube and place it in the bowl"] * count
    with torch.no_grad():
        prefix, _ = policy.preprocess(batch, tasks)
        one, _ = policy.preprocess({k: v[:1] for k, v in batch.items()}, tasks[:1])
        images = policy._prepare_images({k: v[:1] for k, v in batch.items()}, 1)[0]
    noise = torch.from_numpy(np.random.default_rng([seed, 1]).standard_normal(
        (count, policy.config.chunk_size, policy.config.max_action_dim)).astype(np.float32))
    return prefix, noise, one, images


def train_teacher(out: Path, bags: Path, steps: int, batch_size: int, depth: int = 8, seed: int = 0) -> Path:
    """A pi0 of the fixture's widths with ``depth`` VLM and expert layers, chunk 8, 10 steps, trained
    from scratch with LeRobot's flow-matching loss, saved in LeRobot's layout."""
    topics = TopicConfig(cameras=CAMERAS)
    demos = load_demonstrations([bags], topics, None, 8, 0.15, seed, progress=False)
    frames = list(demos.train.episodes)
    states = np.concatenate([e.states for e in frames])
    actions = np.concatenate([e.actions for e in frames])
    stats = {key: {"mean": v.mean(0).tolist(), "std": v.std(0).tolist(), "min": v.min(0).tolist(),
                   "max": v.max(0).tolist()} for key, v in (("observation.state", states), ("action", actions))}
    height, width = frames[0].images.shape[2:4]
    shapes = {"observation.images.high": [3, height, width], "observation.images.wrist": [3, height, width]}
    directory = lerobot_policy_dir(out, shapes, states.shape[1], actions.shape[1], stats, None, 8,
                                   source=PI0_FIXTURES / "pi0" / "policy")
    config = json.loads((directory / "config.json").read_text())
    config.update(num_inference_steps=10, empty_cameras=0)
    (directory / "config.json").write_text(json.dumps(config, indent=4))
    fixture = PI0Policy.load(PI0_FIXTURES / "pi0" / "policy", TOKENIZER)
    sizes = dataclasses.replace(fixture.model.sizes, vlm=dataclasses.replace(fixture.model.sizes.vlm, depth=depth),
                                expert=dataclasses.replace(fixture.model.sizes.expert, depth=depth))
    model = PI0Model(PI0Config.from_file(directory / "config.json"), sizes)
    init_weights(model, seed)
    save_file(lerobot_state(model, None), str(directory / "model.safetensors"))
    policy = PI0Policy.load(directory, TOKENIZER)
    policy.model.train()
    batches = DemoBatches(policy, list(shapes))

    def loss_fn(model, batch, step):
        loss = flow_matching_loss(policy.model, batches.prefix(batch), batches.target(batch), batch["chunk_valid"],
                                  seed, step)
        return loss, {"task": loss.detach()}

    run = out.parent / "teacher_run"
    train_stage(stage="teacher", model=policy.model, checkpoint_modules={"model": policy.model},
                parameters=[p for p in policy.model.parameters() if p.requires_grad], loss_fn=loss_fn,
                dataset=demos.train, config=TrainConfig(steps=steps, batch_size=batch_size, lr=1e-3, warmup_steps=50),
                ctx=DistContext(), out_dir=run, run_log=RunLog(run, True), resume=False, seed=seed,
                checkpoint_every=max(steps, 1), log_every=50, amp_bf16=False)
    save_file(lerobot_state(policy.model, None), str(directory / "model.safetensors"))
    return directory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--distill-steps", type=int, default=120, help="then distil the trained teacher (0: no)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result, started = {}, time.time()
    for variant in ("pi0", "pi05"):
        fixture = PI0Policy.load(PI0_FIXTURES / variant / "policy", TOKENIZER)
        result[f"fixture_{variant}_random_weights"] = candidate_table(
            fixture, *fixture_observations(fixture, args.samples), cost_models=pi0_cost_models, sample=sample_routed)
        print(f"fixture {variant}: {time.time() - started:.0f} s", file=sys.stderr)
    bags = args.out / "bags"
    if not bags.is_dir():
        write_synthetic_demos(bags, episodes=48, length=12, size=32, cameras=CAMERAS)
    teacher_dir = args.out / "teacher"
    if not (teacher_dir / "model.safetensors").is_file() or not (args.out / "teacher_run" / "trained.done").exists():
        shutil.rmtree(teacher_dir, ignore_errors=True)
        train_teacher(teacher_dir, bags, args.train_steps, args.batch_size)
        (args.out / "teacher_run" / "trained.done").write_text("{}\n")
    teacher = PI0Policy.load(teacher_dir, TOKENIZER)
    prefix, noise, one, images = held_out(teacher, bags, args.samples)
    result["trained"] = candidate_table(teacher, prefix, noise, one, images, cost_models=pi0_cost_models,
                                        sample=sample_routed)
    other = torch.from_numpy(np.random.default_rng(7).standard_normal(noise.shape).astype(np.float32))
    with torch.no_grad():  # how much the start noise alone moves the teacher's chunk
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
                        "--vlm-processor", str(TOKENIZER), "--camera-topic", CAMERAS[0], "--camera-topic", CAMERAS[1],
                        "--probe-steps", str(max(50, args.distill_steps // 4)), "--distill-steps",
                        str(args.distill_steps), "--batch-size", str(args.batch_size)])
            if code:
                return code
        result["student"] = student_table(run / "student", teacher, prefix, noise, one, images,
                                          cost_models=pi0_cost_models, processor=TOKENIZER)
    model, big_prefix, big_images = published_model()
    with torch.device("meta"):
        big = PI0RouteCosts(model, big_prefix, big_images).total(None)
    result["published_size_chunk_gflops"] = {k: (v / 1e9 if isinstance(v, float) else v) for k, v in big.items()
                                             if k != "vision_per_camera"}
    result["seconds"] = round(time.time() - started, 1)
    text = json.dumps(result, indent=1)
    (args.out / "kv_candidates.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
