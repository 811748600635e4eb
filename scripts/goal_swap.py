"""Goal-swap test: does a Meta-World policy read the goal from the marker in its image?

For each reach seed, the scripted expert moves the hand for --steps steps (noise-free). Then the
policy predicts its motion (mean xyz of the first 4 actions of its chunk) twice: on the frame as
rendered, and on the same frame with the goal marker moved to the next seed's goal, state unchanged.
A policy that reads the marker turns toward the goal shown; one that reads the goal from the hand's
position keeps heading for the true goal.

  python scripts/goal_swap.py WEIGHTS [--steps 10 30] [--seeds 20] [--seed-base 10000] [--camera corner4,topview]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from actdistill_ros.policy import Policy
from actdistill_ros.sim.metaworld_env import MetaWorldTask  # before mujoco: it picks the offscreen GL backend

import mujoco  # noqa: E402


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))


def motion(policy: Policy, task: MetaWorldTask) -> tuple[np.ndarray, np.ndarray]:
    """(the policy's motion, the frame it saw)."""
    task._frames = None  # render again: the marker may have moved
    images, state = task.observe()
    actions = np.asarray(policy.predict(images, task.instruction, state).actions, np.float32)
    return actions[:4, :3].mean(0), [image.copy() for image in images]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("weights")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 30], help="expert steps before the test")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--seed-base", type=int, default=10000)
    p.add_argument("--camera", default="corner4", help="one Meta-World camera per image the policy takes, in its order")
    args = p.parse_args()
    policy = Policy.load(args.weights, device="cpu")
    task = MetaWorldTask("reach", image_size=policy.vla.config.image_size, camera=args.camera, horizon=200)
    env, seeds = task._env, list(range(args.seed_base, args.seed_base + args.seeds))
    goals = {}
    for seed in seeds:
        task.reset(seed)
        goals[seed] = np.array(env._target_pos, dtype=np.float64)
    site = env.model.site("goal")
    report = {}
    for steps in args.steps:
        rows = []
        for i, seed in enumerate(seeds):
            shown_goal = goals[seeds[(i + 1) % len(seeds)]]
            task.reset(seed)
            for _ in range(steps):
                task.step(task.expert_action())
            hand = task.state()[:3].astype(np.float64)
            true_motion, frame = motion(policy, task)
            site.pos = shown_goal
            mujoco.mj_forward(env.model, env.data)
            swapped_motion, swapped_frame = motion(policy, task)
            site.pos = goals[seed]
            mujoco.mj_forward(env.model, env.data)
            rows.append({"seed": seed, "distance_to_goal": float(np.linalg.norm(goals[seed] - hand)),
                         "cos_true": cosine(true_motion, goals[seed] - hand),
                         "swapped_cos_true": cosine(swapped_motion, goals[seed] - hand),
                         "swapped_cos_shown": cosine(swapped_motion, shown_goal - hand),
                         "motion_norm": float(np.linalg.norm(true_motion)),
                         "change": float(np.linalg.norm(swapped_motion - true_motion)),
                         "pixels_changed": int(sum((a != b).any(-1).sum() for a, b in zip(frame, swapped_frame)))})
        summary = {key: round(float(np.mean([r[key] for r in rows])), 3) for key in rows[0] if key != "seed"}
        summary["median_distance_to_goal"] = round(float(np.median([r["distance_to_goal"] for r in rows])), 3)
        report[f"after_{steps}_steps"] = summary
        print(f"after {steps} expert steps ({len(rows)} reach seeds from {args.seed_base}): " + json.dumps(summary))
    task.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
