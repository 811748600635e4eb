"""Can the keypoint encoder find the reach goal when it is told to? The encoder of
``train-teacher --image-encoder keypoints`` (16 keypoints, 32 channels, from scratch) and a linear readout
trained to regress the goal's xyz from one 128 px corner4 frame (the first of an episode; reach seeds
20000..21199, outside the collection and evaluation seeds: 1,000 to train, 200 to test), batch 32,
Adam 1e-3, one torch thread. Prints the test R^2 for x / y / z and the median error every 250 steps.

Behaviour cloning never taught this encoder the goal (docs/BENCHMARKS.md, issue 22); this measures
whether a direct, auxiliary localisation loss would:  python scripts/goal_locator_probe.py [STEPS]
"""

import sys
import time

import numpy as np
import torch

from actdistill_ros.policies.vla.keypoints import SpatialKeypointEncoder
from actdistill_ros.sim.metaworld_env import MetaWorldTask

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 1500
TRAIN, TEST = 1000, 200
torch.set_num_threads(1)
torch.manual_seed(0)
start = time.time()
task = MetaWorldTask("reach", image_size=128)
frames, goals = [], []
for seed in range(20000, 20000 + TRAIN + TEST):
    task.reset(seed)
    frames.append(task.observe()[0][0].copy())
    goals.append(np.array(task._env._target_pos))
task.close()
pixels = torch.tensor(np.stack(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1  # the encoder's input range
goal = torch.tensor(np.stack(goals)).float()
mean, std = goal[:TRAIN].mean(0), goal[:TRAIN].std(0)
encoder, readout = SpatialKeypointEncoder(16, 32), torch.nn.Linear(32, 3)
optimizer = torch.optim.Adam([*encoder.parameters(), *readout.parameters()], lr=1e-3)
for step in range(1, STEPS + 1):
    batch = torch.randint(0, TRAIN, (32,))
    loss = (readout(encoder(pixels[batch]).flatten(1)) - (goal[batch] - mean) / std).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 250 == 0:
        with torch.no_grad():
            predicted = readout(encoder(pixels[TRAIN:]).flatten(1)) * std + mean
        truth = goal[TRAIN:]
        r2 = 1 - ((predicted - truth) ** 2).sum(0) / ((truth - truth.mean(0)) ** 2).sum(0)
        error_cm = float((predicted - truth).norm(dim=1).median()) * 100
        print(f"step {step}: test R^2 x, y, z = {np.round(r2.numpy(), 2)}, median error {error_cm:.1f} cm "
              f"({time.time() - start:.0f} s)", flush=True)
