"""`actdistill train-teacher --family smolvla`: a SmolVLA-architecture policy trained from scratch on
demonstrations with LeRobot's conventions, saved as a LeRobot SmolVLA policy directory.

The architecture is SmolVLA's (a SmolVLM: SigLIP-style vision tower, pixel-shuffle connector, Llama
text layers; the action expert interleaving self- and cross-attention layers; flow matching),
built from a small SmolVLM config (``SIZES``) so that a CPU trains it. Nothing is downloaded: the
command writes the VLM's config.json, tokenizer and processor files into ``OUT/vlm/`` (random
weights are never saved there: they are the policy's) and names that directory as the policy's
``vlm_model_name``, so both this project's loader and LeRobot's read it.

LeRobot's conventions: weights initialised as LeRobot's from-config SmolVLA is (transformers' own
init of the VLM and expert, PyTorch's of the projections); MEAN_STD state and action, IDENTITY
images, statistics of the training episodes in the normalizer files; state and actions padded to
max_state_dim / max_action_dim; the chunk predicted is ``chunk_size`` long and ``n_action_steps``
of it execute; the loss is SmolVLA's flow-matching loss (distill_smolvla.flow_matching_loss, the
one the distillation trains with). The vision tower trains too (``freeze_vision_encoder: false``,
``train_expert_only: false``): from scratch it has nothing to keep.

The loop, statistics, held-out error and directory writing (``train_flow_teacher``) serve every
flow-matching family through a :class:`TeacherRecipe` (SmolVLA's here, pi0's in pi0/train_pi0.py).

OUT/teacher/ is the policy directory: config.json ("type": "smolvla"), model.safetensors under
LeRobot's names, policy_preprocessor.json / policy_postprocessor.json with their statistics,
vlm_processor/ (a copy of OUT/vlm, so the directory loads offline wherever it is moved), and a
card.json sidecar with the demonstrations' action space and state names.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import save_file

from actdistill_ros.distill.config import TrainConfig
from actdistill_ros.distill.demos import Demonstrations, infer_action_space, load_demonstrations
from actdistill_ros.distill.plots import plot_losses
from actdistill_ros.distill.runtime import Checkpointer, RunLog, init_distributed
from actdistill_ros.distill.training import to_device, train_stage
from actdistill_ros.lerobot_card import CARD_FILE, IMAGE_PREFIX
from actdistill_ros.policies.smolvla.configuration_smolvla import ACTION_KEY, STATE_KEY, SmolVLAConfig
from actdistill_ros.policies.smolvla.distill_smolvla import (DemoBatches, copy_vlm_processor, flow_matching_loss,
                                                            lerobot_state)
from actdistill_ros.policies.smolvla.modeling_smolvla import LM_HEAD, SmolVLAModel
from actdistill_ros.policies.smolvla.policy_smolvla import CONFIG_FILE, WEIGHTS_FILE, SmolVLAPolicy
from actdistill_ros.policies.smolvla.processor_smolvla import (POSTPROCESSOR_FILE, PREPROCESSOR_FILE,
                                                               load_vlm_config_and_tokenizer)
from actdistill_ros.policies.smolvla.serving_smolvla import VLM_PROCESSOR_DIR
from actdistill_ros.weights import atomic_write, write_directory

log = logging.getLogger(__name__)

VLM_DIR = "vlm"
TEACHER_DIR = "teacher"
# LeRobot's processor tokens, which SmolVLMProcessor looks up in the tokenizer.
SMOLVLM_TOKENS = {"fake_image_token": "<fake_token_around_image>", "global_image_token": "<global-img>",
                  "end_of_utterance_token": "<end_of_utterance>"}
PREPROCESSOR_STATE = "policy_preprocessor_step_5_normalizer_processor.safetensors"
POSTPROCESSOR_STATE = "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
NORM_MAP = {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}  # SmolVLA's defaults
MAX_HELD_OUT = 64  # held-out samples the card's action error averages over (each is a full sample)

# The SmolVLM sizes: "tiny" for tests, "metaworld" for the CPU benchmark (docs/BENCHMARKS.md).
# Pixel shuffle by 2 turns the tower's (image / patch)^2 patches into a quarter as many image tokens.
SIZES = {
    "tiny": {"vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
             "text": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=12),
             "image_size": 32, "patch_size": 8, "chunk_size": 4},
    "metaworld": {"vision": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
                  "text": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=48),
                  "image_size": 128, "patch_size": 16, "chunk_size": 8},
}
SCALE_FACTOR = 2


def write_vlm_dir(directory: Path, size: str, layers: int | None = None, image_size: int | None = None) -> Path:
    """The SmolVLM config.json, word-level tokenizer (Meta-World and robot words) and processor files
    of ``size``, as a hub repository of ``vlm_model_name`` has them (without weights)."""
    from transformers import LlamaConfig, SmolVLMConfig, SmolVLMImageProcessor
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

    from actdistill_ros.policies.hf_vla.tiny_backbone import build_tokenizer

    preset = SIZES[size]
    image_size = image_size or preset["image_size"]
    patches = image_size // preset["patch_size"]
    if image_size % preset["patch_size"] or patches % SCALE_FACTOR:
        raise ValueError(f"--image-size {image_size}: expected a multiple of {preset['patch_size'] * SCALE_FACTOR} "
                         f"(patch {preset['patch_size']} px, pixel shuffle {SCALE_FACTOR})")
    tokenizer = build_tokenizer(SMOLVLM_TOKENS)
    text = LlamaConfig(vocab_size=len(tokenizer), **{**preset["text"], **({"num_hidden_layers": layers} if layers else {})},
                       rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=512, tie_word_embeddings=True,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    vision = SmolVLMVisionConfig(**preset["vision"], image_size=image_size, patch_size=preset["patch_size"])
    config = SmolVLMConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), scale_factor=SCALE_FACTOR,
                           image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=True,
                           pad_token_id=tokenizer.pad_token_id)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    image_processor = SmolVLMImageProcessor(do_image_splitting=False, size={"longest_edge": image_size},
                                            max_image_size={"longest_edge": image_size})
    save_tokenizer(tokenizer, directory, processor_class="SmolVLMProcessor",
                   extra_special_tokens={"image_token": "<image>", **SMOLVLM_TOKENS})
    image_processor.save_pretrained(directory)
    # SmolVLMProcessor's own file, written directly: building the processor object needs torchvision
    # (its video processor), which nothing here uses.
    (directory / "processor_config.json").write_text(json.dumps(
        {"image_seq_len": (patches // SCALE_FACTOR) ** 2, "processor_class": "SmolVLMProcessor"}, indent=2) + "\n")
    return directory


def save_tokenizer(tokenizer, directory: Path, **settings) -> None:
    """The tokenizer's files, its settings in the layout transformers 4.x reads too (LeRobot 0.4.x
    runs on 4.x): the fast-tokenizer class, plus ``settings`` (e.g. special tokens by attribute)."""
    tokenizer.save_pretrained(directory)
    settings_file = directory / "tokenizer_config.json"
    saved = json.loads(settings_file.read_text())
    saved.pop("backend", None)
    saved.update(tokenizer_class="PreTrainedTokenizerFast", **settings)
    settings_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def camera_key(topic: str) -> str:
    """A camera topic's LeRobot feature key: /<name>/image_raw -> observation.images.<name>
    (the inverse of lerobot_card.camera_topic), any other topic by its words."""
    parts = [p for p in topic.strip("/").split("/") if p]
    name = parts[0] if len(parts) == 2 and parts[1] == "image_raw" else "_".join(parts) or "camera"
    return IMAGE_PREFIX + name


def policy_config(demos: Demonstrations, vlm_dir: Path, image_size: int, chunk_size: int, num_vlm_layers: int,
                  train: TrainConfig) -> dict:
    """config.json of the policy, as LeRobot 0.4.x writes it (its training fields included)."""
    episode = demos.train.episodes[0]
    height, width = episode.images.shape[2:4]
    inputs = {camera_key(t): {"type": "VISUAL", "shape": [3, int(height), int(width)]} for t in demos.camera_names}
    inputs[STATE_KEY] = {"type": "STATE", "shape": [len(demos.state_names)]}
    config = SmolVLAConfig.from_dict({
        "type": "smolvla", "input_features": inputs,
        "output_features": {ACTION_KEY: {"type": "ACTION", "shape": [len(demos.action_names)]}},
        "chunk_size": chunk_size, "n_action_steps": chunk_size, "normalization_mapping": NORM_MAP,
        "resize_imgs_with_padding": [image_size, image_size], "vlm_model_name": str(vlm_dir.resolve()),
        "num_vlm_layers": num_vlm_layers}).to_dict()
    return {**config, "device": "cpu", "use_amp": False, "use_peft": False, "push_to_hub": False, "repo_id": None,
            "private": None, "tags": None, "license": None, "pretrained_path": None,
            "freeze_vision_encoder": False, "train_expert_only": False, "train_state_proj": True,
            "optimizer_lr": train.lr, "optimizer_betas": [0.9, 0.999], "optimizer_eps": 1e-8,
            "optimizer_weight_decay": train.weight_decay, "optimizer_grad_clip_norm": train.grad_clip,
            "scheduler_warmup_steps": train.warmup_steps, "scheduler_decay_steps": train.steps,
            "scheduler_decay_lr": 0.0, "compile_model": False, "compile_mode": "max-autotune"}


def demo_statistics(demos: Demonstrations) -> dict[str, torch.Tensor]:
    """LeRobot's normalizer state (``<feature>.<stat>``): mean / std / min / max of the state and the
    action over the training frames (population std, as LeRobot's compute_stats)."""
    tensors = {}
    for key, arrays in ((STATE_KEY, [e.states for e in demos.train.episodes]),
                        (ACTION_KEY, [e.actions for e in demos.train.episodes])):
        values = np.concatenate(arrays).astype(np.float64)
        for name, stat in (("mean", values.mean(0)), ("std", values.std(0)), ("min", values.min(0)),
                           ("max", values.max(0))):
            tensors[f"{key}.{name}"] = torch.tensor(stat, dtype=torch.float32)
    return tensors


def write_processors(directory: Path, config: dict, stats: dict[str, torch.Tensor],
                     new_line_step: str = "smolvla_new_line_processor", tokenizer_name: str | None = None,
                     padding: str | None = None) -> None:
    """policy_preprocessor.json / policy_postprocessor.json and their normalizer state files, the
    steps LeRobot's SmolVLA (and, with pi0's new-line step and tokenizer, pi0's) factory writes."""
    features = {**config["input_features"], **config["output_features"]}
    pre = {"name": "policy_preprocessor", "steps": [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "to_batch_processor", "config": {}},
        {"registry_name": new_line_step, "config": {}},
        {"registry_name": "tokenizer_processor", "config": {
            "max_length": config["tokenizer_max_length"], "task_key": "task", "padding_side": "right",
            "padding": padding or config["pad_language_to"], "truncation": True,
            "tokenizer_name": tokenizer_name or config["vlm_model_name"]}},
        {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}},
        {"registry_name": "normalizer_processor", "config": {"eps": 1e-8, "features": features, "norm_map": NORM_MAP},
         "state_file": PREPROCESSOR_STATE}]}
    post = {"name": "policy_postprocessor", "steps": [
        {"registry_name": "unnormalizer_processor",
         "config": {"eps": 1e-8, "features": {ACTION_KEY: features[ACTION_KEY]}, "norm_map": NORM_MAP},
         "state_file": POSTPROCESSOR_STATE},
        {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}}]}
    (directory / PREPROCESSOR_FILE).write_text(json.dumps(pre, indent=2) + "\n")
    (directory / POSTPROCESSOR_FILE).write_text(json.dumps(post, indent=2) + "\n")
    save_file(stats, str(directory / PREPROCESSOR_STATE))
    save_file({k: v for k, v in stats.items() if k.startswith(ACTION_KEY + ".")}, str(directory / POSTPROCESSOR_STATE))


def initialize_like_lerobot(model: SmolVLAModel, seed: int) -> None:
    """Fresh weights as LeRobot's SmolVLA built from a config has them: the VLM and the expert from
    transformers' own initialisation (SmolVLAModel builds them uninitialised, to be loaded), the
    projections and cross-attention k/v maps from PyTorch's (already so)."""
    from transformers import AutoModel

    torch.manual_seed(seed)
    model.vlm.load_state_dict(AutoModel.from_config(model.vlm.config).state_dict())
    own = model.expert.state_dict()
    fresh = {k: v for k, v in AutoModel.from_config(model.expert.config).state_dict().items()
             if k in own and v.shape == own[k].shape}  # not the cross-attention k/v maps, nor embed_tokens
    model.expert.load_state_dict({**own, **fresh})


def lerobot_weights(model: SmolVLAModel) -> dict[str, torch.Tensor]:
    """The model's tensors under LeRobot's names, the tied embedding stored as lm_head (as LeRobot
    saves a tied SmolVLM)."""
    state = lerobot_state(model, None)
    state[LM_HEAD] = state.pop("model.vlm_with_expert.vlm.model.text_model.embed_tokens.weight")
    return state


@torch.no_grad()
def held_out_action_mse(policy: SmolVLAPolicy, batches: DemoBatches, dataset, seed: int = 0) -> float:
    """MSE of the sampled normalised chunk (seeded start noise) against the demonstrated one, on up to
    MAX_HELD_OUT held-out samples."""
    from actdistill_ros.data.dataset import collate_samples
    from actdistill_ros.distill.losses import masked_mse

    policy.model.eval()
    indices = np.random.default_rng(seed).permutation(len(dataset))[:MAX_HELD_OUT]
    total, count = 0.0, 0
    for start in range(0, len(indices), 16):
        batch = to_device(collate_samples([dataset[int(i)] for i in indices[start:start + 16]]), policy.device)
        prefix = batches.prefix(batch)
        noise = policy.start_noise(len(batch["key"]), torch.Generator().manual_seed(seed + start))
        actions = policy.model.sample_actions(prefix, noise)[..., :policy.config.action_dim]
        total += float(masked_mse(actions, batches.target(batch), batch["chunk_valid"])) * len(batch["key"])
        count += len(batch["key"])
    return total / max(count, 1)


@dataclass(frozen=True)
class TeacherRecipe:
    """What train-teacher needs of a flow-matching family to train one from scratch (the loop, the
    statistics, the held-out error and the directory writing are shared)."""

    label: str  # "SmolVLA", "pi0": for messages
    flag: str  # "--family smolvla"
    sizes: dict  # size name -> preset (its "layers" / "image_size" / "chunk_size" the defaults)
    default_size: str
    policy: type  # .load(directory, vlm_dir, float32=True)
    write_vlm_dir: Callable  # (directory, size, layers, image_size) -> the VLM's config / tokenizer files
    policy_config: Callable  # (demos, vlm_dir, size, layers, image_size, chunk_size, train) -> config.json dict
    write_processors: Callable  # (directory, config, stats, vlm_dir) -> the pipelines and their statistics
    build_model: Callable  # (config file, vlm_dir, size, layers, seed) -> the model with LeRobot's initialisation
    lerobot_weights: Callable  # (model) -> tensors under LeRobot's names
    preset_layers: Callable  # (preset) -> its number of VLM layers


def _smolvla_model(config_file: Path, vlm_dir: Path, size: str, layers: int, seed: int) -> SmolVLAModel:
    vlm_config, _ = load_vlm_config_and_tokenizer(vlm_dir)
    model = SmolVLAModel(SmolVLAConfig.from_file(config_file), vlm_config)
    initialize_like_lerobot(model, seed)
    return model


def _smolvla_config(demos, vlm_dir, size, layers, image_size, chunk_size, train) -> dict:
    return policy_config(demos, vlm_dir, image_size, chunk_size, layers, train)


SMOLVLA_RECIPE = TeacherRecipe(
    label="SmolVLA", flag="--family smolvla", sizes=SIZES, default_size="metaworld", policy=SmolVLAPolicy,
    write_vlm_dir=write_vlm_dir, policy_config=_smolvla_config,
    write_processors=lambda directory, config, stats, vlm_dir: write_processors(directory, config, stats),
    build_model=_smolvla_model, lerobot_weights=lerobot_weights,
    preset_layers=lambda preset: preset["text"]["num_hidden_layers"])


def train_smolvla_teacher(args: argparse.Namespace, topics) -> Path:
    return train_flow_teacher(args, topics, SMOLVLA_RECIPE)


def train_flow_teacher(args: argparse.Namespace, topics, recipe: TeacherRecipe) -> Path:
    """Train and write OUT/teacher/ (see the module docstring); resumable with --resume."""
    not_here = [flag for flag, value in (("--backbone", args.backbone), ("--init-from", args.init_from),
                                         ("--patch-size", args.patch_size), ("--width", args.width),
                                         ("--heads", args.heads), ("--train-vision", args.train_vision),
                                         ("--max-text-tokens", args.max_text_tokens)) if value]
    if not_here:
        raise ValueError(f"{', '.join(not_here)}: not taken by {recipe.flag} (its sizes are --size "
                         f"{'/'.join(recipe.sizes)}, --layers, --image-size, --chunk-size; the vision tower always "
                         "trains)")
    size = args.size or recipe.default_size
    if size not in recipe.sizes:
        raise ValueError(f"--size {size}: {recipe.flag} has the sizes {', '.join(recipe.sizes)}")
    preset = recipe.sizes[size]
    layers = args.layers or recipe.preset_layers(preset)
    if layers < 2:
        raise ValueError(f"--layers {layers}: a {recipe.label} needs at least 2 VLM layers (the last one only gives "
                         "keys/values to the expert)")
    image_size = args.image_size or preset["image_size"]
    chunk_size = args.chunk_size or preset["chunk_size"]
    ctx = init_distributed(args.device)
    if ctx.distributed:
        raise ValueError(f"{recipe.flag} trains in one process")
    torch.manual_seed(args.seed)
    out = Path(args.out)
    vlm_dir = recipe.write_vlm_dir(out / VLM_DIR, size, layers, image_size)
    demos = load_demonstrations(args.data, topics, None, chunk_size, args.val_fraction, args.seed, progress=True)
    if not demos.state_names:
        raise ValueError(f"--data {args.data[0]}: the demonstrations carry no robot state; {recipe.label} takes "
                         "observation.state")
    train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               warmup_steps=min(200, args.steps // 10))
    config = recipe.policy_config(demos, vlm_dir, size, layers, image_size, chunk_size, train_config)
    stats = demo_statistics(demos)
    staging = out / "policy_init"  # the untrained policy directory the training loads, as a user's loads
    staging.mkdir(parents=True, exist_ok=True)
    (staging / CONFIG_FILE).write_text(json.dumps(config, indent=4) + "\n")
    recipe.write_processors(staging, config, stats, vlm_dir)
    model = recipe.build_model(staging / CONFIG_FILE, vlm_dir, size, layers, args.seed)
    save_file(recipe.lerobot_weights(model), str(staging / WEIGHTS_FILE))
    policy = recipe.policy.load(staging, vlm_dir, float32=True).to(ctx.device)
    batches = DemoBatches(policy, demos.camera_names)
    count = sum(p.numel() for p in policy.model.parameters())
    log.info("%s %s: %d VLM layers, %d px, chunk %d, %.2fM parameters; %d training frames", recipe.label, size,
             layers, image_size, chunk_size, count / 1e6, len(demos.train))

    def loss_fn(model, batch, step):
        raw, tasks = batches.raw(batch)
        prefix, _ = policy.preprocess(raw, tasks)  # with gradients: the vision tower trains
        loss = flow_matching_loss(model, prefix, batches.target(batch), batch["chunk_valid"], args.seed, step)
        return loss, {"task": loss.detach()}

    run_log = RunLog(out, True)
    train_stage(stage="teacher", model=policy.model, checkpoint_modules={"model": policy.model},
                parameters=[p for p in policy.model.parameters() if p.requires_grad], loss_fn=loss_fn,
                dataset=demos.train, config=train_config, ctx=ctx, out_dir=out, run_log=run_log, resume=args.resume,
                seed=args.seed, checkpoint_every=args.checkpoint_every, log_every=10, amp_bf16=False)
    metrics = {"train_steps": args.steps, "train_frames": len(demos.train), "parameters": count}
    if demos.val is not None:
        metrics["held_out_action_mse"] = held_out_action_mse(policy, batches, demos.val, args.seed)
    space = infer_action_space(args.action_space, topics, demos.action_names, demos.stats).to_dict()
    sidecar = {"action_space": {k: space[k] for k in ("kind", "names", "units", "low", "high", "gripper_index")},
               "state_names": list(demos.state_names)}

    def write(directory: Path) -> None:
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=4) + "\n")
        recipe.write_processors(directory, config, stats, vlm_dir)
        save_file(recipe.lerobot_weights(policy.model), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        copy_vlm_processor(vlm_dir, directory / VLM_PROCESSOR_DIR)
        (directory / CARD_FILE).write_text(json.dumps(sidecar, indent=2) + "\n")
        (directory / "train_summary.json").write_text(json.dumps(
            {**metrics, "trained_by": f"actdistill train-teacher {recipe.flag}", "size": size,
             "data": [str(d) for d in args.data], "episodes": demos.bags, "train": vars(train_config)},
            indent=2) + "\n")

    teacher_dir = write_directory(out / TEACHER_DIR, write)
    plot_losses(run_log.records(), out / "losses.png")
    atomic_write(out / "summary.json", lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))
    Checkpointer(out / "checkpoints", "teacher").clear()
    run_log.close()
    log.info("%s teacher written to %s (%s)", recipe.label, teacher_dir, metrics)
    return teacher_dir
