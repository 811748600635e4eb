"""Is the reach goal linearly readable from one frame? Ridge regression from frozen ImageNet MobileNetV2
features (features[:7], features[:14]) or the pixels to the goal xyz, 5-fold cross-validated R^2,
300 reach seeds from 20000 (outside the collection and evaluation seeds): python scripts/goal_probe.py
[TEACHER ...]: also from the keypoint coordinates of each keypoint teacher (--image-encoder keypoints)."""
import sys
import numpy as np, torch
from actdistill_ros.sim.metaworld_env import MetaWorldTask
from actdistill_ros.policies.vla.mobilenet_v2 import MobileNetV2Features, read_imagenet_weights, DEFAULT_IMAGENET_WEIGHTS, IMAGENET_MEAN, IMAGENET_STD
torch.set_num_threads(1)
N = 300
for size in (128,):
    task = MetaWorldTask("reach", image_size=size)
    frames, goals = [], []
    for s in range(20000, 20000 + N):
        task.reset(s); frames.append(task.observe()[0][0].copy()); goals.append(np.array(task._env._target_pos))
    task.close()
    x = torch.tensor(np.stack(frames)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    y = np.stack(goals)
    feats = {"pixels": (torch.tensor(np.stack(frames)).float() / 255).flatten(1).numpy()}
    for blocks in (7, 14):
        enc = MobileNetV2Features(blocks).eval(); enc.load_state_dict(read_imagenet_weights(DEFAULT_IMAGENET_WEIGHTS, blocks))
        with torch.no_grad():
            feats[f"mnv2[:{blocks}]"] = enc(x).flatten(1).numpy()
    from actdistill_ros.policy import Policy
    for weights in sys.argv[1:]:
        vla = Policy.load(weights, device="cpu").vla
        with torch.no_grad():
            pixels = torch.tensor(np.stack(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1
            feats[f"keypoints({weights})"] = vla.image_encoder(pixels).flatten(1).numpy()
    for name, f in feats.items():
        f = (f - f.mean(0)) / (f.std(0) + 1e-6)
        for lam in (1e1, 1e2, 1e3, 1e4):
            pred = np.zeros_like(y)
            folds = np.arange(N) % 5
            for k in range(5):
                tr, te = folds != k, folds == k
                A = f[tr]; K = A @ A.T
                alpha = np.linalg.solve(K + lam * np.eye(len(A)), y[tr] - y[tr].mean(0))
                pred[te] = f[te] @ A.T @ alpha + y[tr].mean(0)
            r2 = 1 - ((pred - y) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)
            err = np.linalg.norm(pred - y, axis=1)
            print(f"{size}px {name:10s} lam {lam:g}: R2 x,y,z = {np.round(r2, 3)}  median error {np.median(err)*100:.1f} cm")
