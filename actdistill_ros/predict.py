"""`actdistill predict`: one action chunk per observation of a saved batch, for checking a checkpoint.

Takes a LeRobot SmolVLA, pi0 or pi0.5 policy directory (config.json with "type": "smolvla", "pi0" or
"pi05") or this project's own teacher/student weights (card.json). The batch is in LeRobot's conventions:
``observation.images.<camera>`` float32 [B, 3, H, W] in [0, 1] and ``observation.state`` float32
[B, S]. The output holds ``action``: the un-normalised chunk [B, chunk, action_dim].
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

IMAGE_PREFIX = "observation.images."
STATE_KEY = "observation.state"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("predict", help="predict action chunks for a saved batch (LeRobot conventions)",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, type=Path,
                        help="a LeRobot SmolVLA, pi0 or pi0.5 policy directory, or actdistill teacher/student weights")
    parser.add_argument("--batch", required=True, type=Path,
                        help="safetensors: observation.images.<camera> [B,3,H,W] in [0,1], observation.state [B,S]")
    parser.add_argument("--task", required=True, help="the instruction, used for every row of the batch")
    parser.add_argument("--noise", type=Path, default=None,
                        help="safetensors with key `noise` [B, chunk_size, max_action_dim]: the flow-matching start "
                             "noise (default: drawn from --seed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the start noise when --noise is not given")
    parser.add_argument("--out", required=True, type=Path, help="output safetensors (key `action`)")
    parser.add_argument("--vlm-processor", type=Path, default=None,
                        help="SmolVLA: a directory with the VLM's config.json and tokenizer (default: the Hugging "
                             "Face cache of the config's vlm_model_name, offline); pi0/pi0.5: a directory with the "
                             "PaliGemma tokenizer (default: the cache of the name its tokenizer step saved)")
    parser.add_argument("--float32", action="store_true",
                        help="SmolVLA: run every part in float32 (default: the dtypes LeRobot runs them in, e.g. "
                             "a bfloat16 VLM for a policy saved with load_vlm_weights); pi0/pi0.5: required to run a "
                             "dtype bfloat16 policy (in float32)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--keep-fraction", type=float, default=None,
                        help="SmolVLA / pi0 student: keep routing at this fraction of the routed VLM layers (1.0 runs "
                             "them all; 0 selects threshold routing); default: the card's")
    parser.add_argument("--threshold", type=float, default=None,
                        help="SmolVLA / pi0 student: the router threshold of threshold routing; default: the card's")
    parser.set_defaults(func=run)


def read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{what} {path}: not a readable safetensors file ({err})") from None


def run(args: argparse.Namespace) -> int:
    batch = read_tensors(args.batch, "--batch")
    noise = None
    if args.noise is not None:
        tensors = read_tensors(args.noise, "--noise")
        if "noise" not in tensors:
            raise ValueError(f"--noise {args.noise}: no tensor named `noise` (has {sorted(tensors)})")
        noise = tensors["noise"]
    from actdistill_ros.policies.flow_family import family_of_dir
    from actdistill_ros.policies.smolvla.routing_smolvla import load_student, student_family

    routing = [f"--{n.replace('_', '-')}" for n in ("keep_fraction", "threshold") if getattr(args, n) is not None]
    is_student = student_family(args.policy) is not None
    if routing and not is_student:
        raise ValueError(f"{' and '.join(routing)}: {args.policy} is not a SmolVLA student nor a pi0 / pi0.5 one "
                         f"(no routed layers)")
    if is_student:  # routed at its card's default keep fraction / threshold
        student = load_student(args.policy, args.vlm_processor, args.device, args.float32)
        if args.keep_fraction is not None:
            student.keep_fraction = args.keep_fraction
        if args.threshold is not None:
            student.threshold = args.threshold
        actions = predict_flow_matching(student, batch, args.task, noise, args.seed)
    elif family_of_dir(args.policy) is not None:  # a LeRobot SmolVLA / pi0 / pi0.5 teacher
        policy = family_of_dir(args.policy).hooks().policy.load(args.policy, args.vlm_processor, args.device,
                                                                args.float32)
        actions = predict_flow_matching(policy, batch, args.task, noise, args.seed)
    else:
        if noise is not None:
            raise ValueError(f"--noise: {args.policy} is not a flow-matching policy (its action head is "
                             f"deterministic); leave --noise out")
        actions = predict_own(args.policy, batch, args.task, args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"action": actions.contiguous()}, str(args.out))
    print(f"{args.out}: action {list(actions.shape)} (min {actions.min():.4g}, max {actions.max():.4g})")
    return 0


def predict_flow_matching(policy, batch: dict[str, torch.Tensor], task: str, noise: torch.Tensor | None,
                    seed: int) -> torch.Tensor:
    if noise is None:
        size = batch[STATE_KEY].shape[0] if STATE_KEY in batch else 1
        noise = policy.start_noise(size, torch.Generator().manual_seed(seed))
    return policy.predict_action_chunk(batch, task, noise)


def predict_own(weights: Path, batch: dict[str, torch.Tensor], task: str, device: str) -> torch.Tensor:
    """This project's teacher/student: frames to uint8 RGB in the card's camera order, then Policy."""
    from actdistill_ros.policy import Policy

    policy = Policy.load(weights, device=device)
    cameras = sorted(k for k in batch if k.startswith(IMAGE_PREFIX))
    names = list(policy.card.camera_names)
    if names:
        wanted = [IMAGE_PREFIX + n for n in names]
        missing = [k for k in wanted if k not in batch]
        if missing:
            raise ValueError(f"--batch: missing {missing}; the policy's cameras are {wanted}")
        cameras = wanted
    elif len(cameras) != policy.num_cameras:
        raise ValueError(f"--batch: {len(cameras)} observation.images.* tensors, the policy takes "
                         f"{policy.num_cameras} camera(s) (its card names none, so the count must match)")
    frames = []
    for key in cameras:
        image = batch[key]
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"--batch: {key} must be float [B, 3, H, W] in [0, 1], got {list(image.shape)}")
        frames.append((image.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    size = frames[0].shape[0]
    if any(f.shape[0] != size for f in frames):
        raise ValueError("--batch: the cameras have different batch sizes")
    states = batch[STATE_KEY].float().numpy() if STATE_KEY in batch else None
    images = [[np.ascontiguousarray(f[row]) for f in frames] for row in range(size)]
    outputs = policy.predict_batch(images, [task] * size, states)
    return torch.from_numpy(np.stack([o.actions for o in outputs])).float()
