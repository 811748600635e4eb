"""`actdistill train-teacher`: behaviour cloning of a VLA teacher on rosbag demonstrations, so
that a real trained teacher exists to distil.

The teacher is the reference VLA (``--size`` and the architecture flags), or, with ``--backbone``,
a Hugging Face image-text-to-text model fine-tuned into a VLA (policies/hf_vla). Its vision tower
is frozen by default (``--train-vision`` trains it too): robot datasets are small next to the
tower's pretraining data, a frozen tower keeps its features and saves the memory and time of its
backward pass; the projector, the whole decoder, the state/query tokens and the head train
(SmolVLA's choice). A from-scratch ``make-backbone`` model has nothing to keep: use --train-vision.

``--init-from TEACHER`` starts from a trained reference teacher. With ``--layers k`` it is cut to its
first k layers (``--layer-choice even``: k evenly spaced ones, the last included): the fine-tuned
truncated baselines ("train a smaller model") of the compute dial sweep. With ``--image-size`` it is
fine-tuned at another resolution, same patch size: its position embeddings are resampled to the
new patch grid (the ViT recipe for fine-tuning at higher resolution), which is far cheaper than
training the larger input from scratch.

``--image-encoder mobilenet_v2`` gives the reference VLA ImageNet MobileNetV2 features as its image
tokens (frozen by default, ``--train-encoder`` fine-tunes them; the projection to the width always
trains); with ``--init-from`` a patch teacher, only its patch embedding is replaced.
``--image-encoder keypoints`` gives it ``--num-keypoints`` spatial soft-argmax keypoints of a conv
encoder trained from scratch with the rest (policies/vla/keypoints.py): image locations as tokens.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from actdistill_ros.distill.config import TrainConfig
from actdistill_ros.distill.demos import (add_data_arguments, demo_cameras, infer_action_space,
                                          load_demonstrations, topics_from_args)
from actdistill_ros.distill.evaluation import evaluate_routing
from actdistill_ros.distill.losses import masked_mse
from actdistill_ros.distill.plots import plot_losses
from actdistill_ros.distill.runtime import Checkpointer, RunLog, init_distributed
from actdistill_ros.distill.training import train_stage, wrap_parallel
from actdistill_ros.policies.hf_vla.configuration_hf_vla import HFVLAConfig
from actdistill_ros.policies.vla import ReferenceVLA, VLAConfig
from actdistill_ros.policies.vla.mobilenet_v2 import (DEFAULT_IMAGENET_WEIGHTS, TORCHVISION_FILE, encoder_geometry,
                                                     read_imagenet_weights)
from actdistill_ros.policies.vla.modeling_vla import resample_visual_positions
from actdistill_ros.policy import evenly_spaced_layers, make_card, save_model
from actdistill_ros.weights import atomic_write, load_state_into, read_card, read_weights, resolve_weights_path

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train-teacher",
                              help="behaviour-clone a VLA teacher (reference VLA or --backbone) on rosbags")
    add_data_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="output directory (teacher/ is the weights)")
    p.add_argument("--backbone", help="fine-tune this transformers image-text-to-text model into the teacher: a local "
                                      "directory (read offline) or a hub id (default: the reference VLA)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="--backbone: allow a model whose code ships with it (runs that code; off by default)")
    p.add_argument("--train-vision", action="store_true",
                   help="--backbone: train the vision tower too (default: frozen; the projector trains)")
    p.add_argument("--max-text-tokens", type=int, help="--backbone: instruction length in tokens (default 16)")
    p.add_argument("--family", choices=["reference_vla", "smolvla", "pi0"], default="reference_vla",
                   help="smolvla / pi0: a SmolVLA- / pi0-architecture policy trained from scratch with LeRobot's "
                        "conventions, written as a LeRobot SmolVLA / pi0 directory (policies/smolvla/train_smolvla.py, "
                        "policies/pi0/train_pi0.py)")
    p.add_argument("--size", choices=["tiny", "default", "bench", "metaworld"],
                   help="size preset: reference VLA tiny/default/bench (default: default); smolvla / pi0 "
                        "tiny/metaworld (default: metaworld)")
    p.add_argument("--image-size", type=int, help="input resolution (reference: override the preset's; --init-from: "
                                                  "fine-tune at this size, position embeddings resampled; --backbone: "
                                                  "default the vision tower's own)")
    p.add_argument("--chunk-size", type=int, help="action chunk length H (default: the preset's, 8 with --backbone)")
    p.add_argument("--patch-size", type=int, help="override the preset's patch size")
    p.add_argument("--width", type=int, help="override the preset's model width")
    p.add_argument("--layers", type=int, help="override the preset's number of backbone layers")
    p.add_argument("--heads", type=int, help="override the preset's attention heads")
    p.add_argument("--image-encoder", choices=["patch", "mobilenet_v2", "keypoints"],
                   help="reference VLA image tokens: a patch embedding trained from scratch (default), ImageNet "
                        "MobileNetV2 features[:--encoder-blocks] (its stride is the patch size; with --init-from a "
                        "patch teacher, its patch embedding is replaced and the rest kept), or --num-keypoints "
                        "spatial soft-argmax keypoints of a conv encoder trained from scratch")
    p.add_argument("--num-keypoints", type=int, default=32,
                   help="--image-encoder keypoints: keypoints (image tokens) per camera")
    p.add_argument("--encoder-blocks", type=int, default=14,
                   help="MobileNetV2 blocks kept: 14 gives 96 x 8 x 8 at 128 px (stride 16), 7 gives 32 x 16 x 16")
    p.add_argument("--encoder-weights", type=Path, default=DEFAULT_IMAGENET_WEIGHTS,
                   help="the converted ImageNet MobileNetV2 safetensors (scripts/setup.sh writes the default)")
    p.add_argument("--train-encoder", action="store_true",
                   help="fine-tune the MobileNetV2 encoder too (default: frozen; its projection always trains)")
    p.add_argument("--init-from", type=Path, metavar="TEACHER",
                   help="start from these reference teacher weights: cut to their first --layers layers (the "
                   "fine-tuned truncated baseline of eval-sim --sweep-keep), at another --image-size, and/or, "
                   "from a one-camera teacher, with the demos' --camera-topic cameras")
    p.add_argument("--layer-choice", choices=["first", "even"], default="first",
                   help="--init-from with --layers k: keep the first k layers (default) or k evenly spaced ones, "
                        "the last included (the static routes of eval-sim --sweep-keep)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--action-space", default="auto", choices=["auto", "metaworld"])
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true", help="continue a killed run in --out")
    p.set_defaults(func=run)


def _teacher_from(args, topics, ctx):
    """--init-from's teacher, cut to --layers of its layers (--layer-choice), resampled to --image-size
    and/or given the demos' extra cameras (its weights kept otherwise), the demonstrations, and the
    card's provenance of the start (the teacher, the layers kept)."""
    other = [flag for flag, value in (("--size", args.size), ("--chunk-size", args.chunk_size),
                                      ("--patch-size", args.patch_size), ("--width", args.width),
                                      ("--heads", args.heads)) if value]
    if other:
        raise ValueError(f"{', '.join(other)}: --init-from {args.init_from} brings its architecture; "
                         "only --layers, --image-size and --image-encoder are set")
    weights_file, card_file = resolve_weights_path(args.init_from)
    card = read_card(card_file)
    if card.family != "reference_vla" or card.is_student:
        raise ValueError(f"--init-from {args.init_from}: expected reference VLA teacher weights, got a "
                         f"{card.family} {card.kind}")
    full = VLAConfig.from_dict(card.vla_config)
    layers = args.layers or full.num_layers
    if not 1 <= layers <= full.num_layers:
        raise ValueError(f"--layers {layers}: --init-from keeps the first 1..{full.num_layers} of its teacher's layers")
    image_size = args.image_size or full.image_size
    if image_size % full.patch_size:
        raise ValueError(f"--image-size {image_size}: --init-from {args.init_from} has {full.patch_size} px patches; "
                         f"expected a multiple of {full.patch_size}")
    cameras = demo_cameras(args.data, topics)
    if full.num_cameras != len(cameras) and full.num_cameras != 1:
        raise ValueError(f"--init-from {args.init_from}: its teacher takes {full.num_cameras} cameras, the demos give "
                         f"{len(cameras)}; only a one-camera teacher can be given more cameras")
    encoder = _encoder_overrides(args)
    if encoder and full.image_encoder == "mobilenet_v2" and encoder["image_encoder"] == "mobilenet_v2" \
            and encoder["encoder_blocks"] != full.encoder_blocks:
        raise ValueError(f"--encoder-blocks {args.encoder_blocks}: --init-from {args.init_from} has MobileNetV2 "
                         f"features[:{full.encoder_blocks}]")
    if encoder.get("image_encoder") == "patch" and full.image_encoder != "patch":
        raise ValueError(f"--image-encoder patch: --init-from {args.init_from} has a {full.image_encoder} encoder")
    if "keypoints" in (encoder.get("image_encoder"), full.image_encoder) and \
            encoder.get("image_encoder", full.image_encoder) != full.image_encoder:
        raise ValueError(f"--image-encoder {args.image_encoder}: --init-from {args.init_from} has a "
                         f"{full.image_encoder} encoder; a keypoint teacher trains from scratch and keeps its encoder")
    new_encoder = encoder.get("image_encoder", full.image_encoder) != full.image_encoder
    config = VLAConfig.from_dict({**card.vla_config, "num_layers": layers, "image_size": image_size,
                                  "num_cameras": len(cameras), **(encoder if new_encoder else {})})
    imagenet = read_imagenet_weights(args.encoder_weights, config.encoder_blocks) if new_encoder else None
    demos = load_demonstrations(args.data, topics, config.image_size, config.chunk_size, args.val_fraction, args.seed,
                                progress=ctx.is_main)
    found = (len(demos.action_names), len(demos.state_names) if demos.stats.state_dim else 0)
    drop_state = found == (config.action_dim, 0) and config.state_dim > 0
    if drop_state:
        # Demos read without a state (--state-topic ''): the teacher's state token goes, so the new
        # policy has to find in its images what the state told it (the hand's position, say).
        config = VLAConfig.from_dict({**config.to_dict(), "state_dim": 0})
        log.info("--init-from %s: its state token dropped (the demos are read without a state)", args.init_from)
    elif found != (config.action_dim, config.state_dim):
        raise ValueError(f"--init-from {args.init_from}: the demos give (actions, state) = {found}, "
                         f"its teacher takes {(config.action_dim, config.state_dim)}")
    model = ReferenceVLA(config)
    kept = kept_layers(args.layer_choice, layers, full.num_layers)
    tensors = {}
    for name, tensor in read_weights(weights_file).items():
        if name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            if int(index) not in kept:
                continue
            name = f"layers.{kept.index(int(index))}.{rest}"
        elif drop_state and name.startswith("state_embed."):
            continue
        tensors[name] = tensor
    if new_encoder:
        # The patch embedding gives way to ImageNet MobileNetV2 and a fresh projection; the backbone,
        # the language/state/query tokens, the head and the position embeddings are kept.
        del tensors["patch_embed.weight"], tensors["patch_embed.bias"]
        tensors.update({f"image_encoder.{name}": t for name, t in imagenet.items()})
        tensors.update({f"encoder_proj.{name}": t for name, t in model.encoder_proj.state_dict().items()})
        log.info("--init-from %s: patch embedding replaced by ImageNet MobileNetV2 features[:%d]", args.init_from,
                 config.encoder_blocks)
    grid = image_size // config.patch_size
    if config.image_encoder != "keypoints" and grid * grid != tensors["visual_pos"].shape[1]:
        tensors["visual_pos"] = resample_visual_positions(tensors["visual_pos"], grid)
        log.info("--init-from %s: position embeddings resampled from %d px to %d px (%d -> %d patches)",
                 args.init_from, full.image_size, image_size, full.num_patches, config.num_patches)
    if config.num_cameras > full.num_cameras:
        # Every camera goes through the teacher's patch embedding and positions; a zero camera embedding
        # starts each camera's tokens exactly as the one-camera teacher saw its image.
        tensors["camera_embed"] = torch.zeros_like(model.camera_embed)
        log.info("--init-from %s: %d cameras (%s), camera embeddings start at zero", args.init_from,
                 config.num_cameras, ", ".join(cameras))
    load_state_into(model, tensors, weights_file)
    return model, demos, {"init_from": str(args.init_from), "kept_layers": kept}


def kept_layers(choice: str, layers: int, num_layers: int) -> list[int]:
    """The teacher's layers an --init-from student keeps, in order: the first ``layers`` or evenly spaced."""
    if choice == "first":
        return list(range(layers))
    return evenly_spaced_layers(layers, num_layers)


def _encoder_overrides(args) -> dict:
    """The VLAConfig fields --image-encoder sets (none without it)."""
    if not args.image_encoder:
        return {}
    if args.image_encoder == "patch":
        return {"image_encoder": "patch"}
    if args.image_encoder == "keypoints":
        return {"image_encoder": "keypoints", "num_keypoints": args.num_keypoints}
    try:
        stride = encoder_geometry(args.encoder_blocks)[1]
    except ValueError as error:
        raise ValueError(f"--encoder-blocks {args.encoder_blocks}: {error}") from None
    return {"image_encoder": "mobilenet_v2", "encoder_blocks": args.encoder_blocks, "patch_size": stride}


def _reference_teacher(args, topics, ctx):
    """The reference VLA of --size and the architecture flags, and the demonstrations at its input size."""
    overrides = {k: v for k, v in (("image_size", args.image_size), ("chunk_size", args.chunk_size),
                                   ("patch_size", args.patch_size), ("width", args.width),
                                   ("num_layers", args.layers), ("num_heads", args.heads)) if v}
    encoder = _encoder_overrides(args)
    if args.patch_size and encoder.get("image_encoder") == "mobilenet_v2" and args.patch_size != encoder["patch_size"]:
        raise ValueError(f"--patch-size {args.patch_size}: MobileNetV2 features[:{args.encoder_blocks}] has stride "
                         f"{encoder['patch_size']}; leave --patch-size out")
    overrides.update(encoder)
    size = args.size or "default"
    probe_config = VLAConfig.sized(size, **overrides)
    imagenet = (read_imagenet_weights(args.encoder_weights, probe_config.encoder_blocks)
                if probe_config.image_encoder == "mobilenet_v2" else None)
    demos = load_demonstrations(args.data, topics, probe_config.image_size, probe_config.chunk_size,
                                args.val_fraction, args.seed, progress=ctx.is_main)
    config = VLAConfig.sized(size, **overrides, action_dim=len(demos.action_names),
                             state_dim=len(demos.state_names) if demos.stats.state_dim else 0,
                             num_cameras=len(demos.camera_names))
    model = ReferenceVLA(config)
    if imagenet is not None:
        load_state_into(model.image_encoder, imagenet, args.encoder_weights)
    return model, demos, {}


def _backbone_teacher(args, topics, ctx):
    """--backbone fine-tuned into an HFVLA, and the demonstrations at its vision tower's input size."""
    from actdistill_ros.policies.hf_vla import HFVLA
    from actdistill_ros.policies.hf_vla.modeling_hf_vla import input_image_size, load_backbone

    reference_only = [flag for flag, value in (("--size", args.size), ("--patch-size", args.patch_size),
                                               ("--width", args.width), ("--layers", args.layers),
                                               ("--heads", args.heads), ("--image-encoder", args.image_encoder)) if value]
    if reference_only:
        raise ValueError(f"{', '.join(reference_only)}: set the reference VLA's architecture; "
                         f"--backbone {args.backbone} brings its own")
    backbone, tokenizer, image_stats = load_backbone(args.backbone, args.trust_remote_code)
    image_size = input_image_size(backbone, args.image_size or 0)
    chunk_size = args.chunk_size or HFVLAConfig.chunk_size
    demos = load_demonstrations(args.data, topics, image_size, chunk_size, args.val_fraction, args.seed,
                                progress=ctx.is_main)
    config = HFVLAConfig(num_cameras=len(demos.camera_names), max_text_tokens=args.max_text_tokens or 16,
                         state_dim=len(demos.state_names) if demos.stats.state_dim else 0,
                         action_dim=len(demos.action_names), chunk_size=chunk_size, image_size=image_size,
                         trust_remote_code=args.trust_remote_code)
    model = HFVLA(backbone, tokenizer, config, image_stats)
    if not args.train_vision:
        model.freeze_vision()
    return model, demos, {}


def train_teacher(args: argparse.Namespace) -> Path:
    topics = topics_from_args(args)
    if args.family == "smolvla":
        from actdistill_ros.policies.smolvla.train_smolvla import train_smolvla_teacher

        return train_smolvla_teacher(args, topics)
    if args.family == "pi0":
        from actdistill_ros.policies.pi0.train_pi0 import train_pi0_teacher

        return train_pi0_teacher(args, topics)
    if args.size == "metaworld":
        raise ValueError("--size metaworld: a --family smolvla / pi0 size; the reference VLA's are tiny, default, "
                         "bench")
    ctx = init_distributed(args.device)
    torch.manual_seed(args.seed)
    if args.init_from and args.backbone:
        raise ValueError("--init-from and --backbone both choose the starting model; give one")
    if args.layer_choice != "first" and not args.init_from:
        raise ValueError(f"--layer-choice {args.layer_choice}: picks which of an --init-from teacher's layers "
                         "--layers keeps; give --init-from")
    build = _teacher_from if args.init_from else _backbone_teacher if args.backbone else _reference_teacher
    model, demos, origin = build(args, topics, ctx)
    config = model.config
    if getattr(config, "image_encoder", None) == "mobilenet_v2" and not args.train_encoder:
        model.image_encoder.requires_grad_(False)  # frozen ImageNet features; the projection trains
    model.set_normalization(demos.stats.to_dict())
    model.to(ctx.device)
    train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               warmup_steps=min(200, args.steps // 10))

    def loss_fn(wrapped, batch, step):
        predicted = wrapped(batch["image"], batch["instruction"], batch["state"] if config.state_dim else None)
        target = model.normalize_actions(batch["actions"])
        loss = masked_mse(predicted.float(), target, batch["chunk_valid"])
        return loss, {}

    run_log = RunLog(args.out, ctx.is_main)
    # An HF backbone may hold modules its forward never reaches (e.g. a vision tower's unused last layer).
    wrapped = wrap_parallel(model, ctx, find_unused=bool(args.backbone))
    train_stage(stage="teacher", model=wrapped, checkpoint_modules={"model": model},
                parameters=[p for p in model.parameters() if p.requires_grad], loss_fn=loss_fn,
                dataset=demos.train, config=train_config,
                ctx=ctx, out_dir=args.out, run_log=run_log, resume=args.resume, seed=args.seed,
                checkpoint_every=args.checkpoint_every, log_every=10)
    out_dir = args.out / "teacher"
    if ctx.is_main:
        metrics = {"train_steps": args.steps, "train_frames": len(demos.train)}
        if demos.val is not None:
            metrics["held_out_action_mse"] = evaluate_routing(model, None, demos.val, ctx.device)["action_mse"]
        action_space = infer_action_space(args.action_space, topics, demos.action_names, demos.stats)
        card = make_card(model, action_space, norm_stats=demos.stats.to_dict(), state_names=demos.state_names,
                         camera_names=demos.camera_names,
                         provenance={"trained_by": "actdistill train-teacher", "bags": demos.bags,
                                     "data": [str(d) for d in args.data],
                                     **origin,
                                     **({"image_encoder": f"MobileNetV2 features[:{config.encoder_blocks}], ImageNet "
                                                          f"({TORCHVISION_FILE}), "
                                                          f"{'fine-tuned' if args.train_encoder else 'frozen'}"}
                                        if getattr(config, "image_encoder", "patch") == "mobilenet_v2" else {}),
                                     **({"image_encoder": f"{config.num_keypoints} spatial soft-argmax keypoints, "
                                                          "conv encoder trained from scratch"}
                                        if getattr(config, "image_encoder", "patch") == "keypoints" else {}),
                                     "topics": topics.to_dict(), "train": vars(train_config),
                                     **({"backbone": str(args.backbone),
                                         "vision_tower": "trained" if args.train_vision else "frozen"}
                                        if args.backbone else {})},
                         metrics=metrics)
        save_model(out_dir, model, card)
        plot_losses(run_log.records(), args.out / "losses.png")
        atomic_write(args.out / "summary.json", lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))
        Checkpointer(args.out / "checkpoints", "teacher").clear()
        log.info("teacher written to %s (%s)", out_dir, metrics)
    run_log.close()
    return out_dir


def run(args: argparse.Namespace) -> int:
    train_teacher(args)
    return 0
