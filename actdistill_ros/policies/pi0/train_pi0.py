"""`actdistill train-teacher --family pi0`: a pi0-architecture policy (SigLIP vision tower, Gemma
VLM, Gemma action expert attending jointly over each VLM layer's keys/values, flow matching)
trained from scratch on demonstrations, saved as a LeRobot pi0 policy directory.

The training loop, statistics, held-out error and directory writing are SmolVLA's
(smolvla/train_smolvla.train_flow_teacher); this module gives pi0's recipe: the sizes (``SIZES``,
Gemma variants far smaller than LeRobot offers, so that a CPU trains them; every size is read back
from the tensor shapes, as for a LeRobot checkpoint), config.json as LeRobot 0.4.x writes it,
pi0's processor pipelines, a word-level tokenizer written to ``OUT/vlm/`` (the tokenizer step names
that directory; the policy directory carries a copy in vlm_processor/) and LeRobot's initialisation
(transformers' N(0, 0.02) for the Gemma stacks, SigLIP's own, PyTorch's for the projections).
"""

from __future__ import annotations

from pathlib import Path

import torch

from actdistill_ros.policies.pi0.configuration_pi0 import PI0Config
from actdistill_ros.policies.pi0.modeling_pi0 import NUM_KV_HEADS, GemmaSizes, PI0Model, PI0Sizes
from actdistill_ros.policies.pi0.policy_pi0 import PI0Policy
from actdistill_ros.policies.pi0.processor_pi0 import NEW_LINE
from actdistill_ros.policies.pi0.routing_pi0 import lerobot_state
from actdistill_ros.policies.smolvla.configuration_smolvla import ACTION_KEY, STATE_KEY
from actdistill_ros.policies.smolvla.train_smolvla import TeacherRecipe, camera_key, save_tokenizer, write_processors

NORM_MAP = {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}  # pi0's defaults
INIT_STD = 0.02  # transformers' Gemma initializer_range

# "tiny" for tests, "metaworld" for the CPU benchmark (docs/BENCHMARKS.md). The expert shares the
# VLM's depth and head_dim (it attends jointly over each VLM layer's keys/values).
SIZES = {
    "tiny": {"vision": dict(vision_width=32, vision_depth=1, vision_mlp_dim=64),
             "vlm": dict(width=32, mlp_dim=64, num_heads=2), "expert": dict(width=24, mlp_dim=48, num_heads=2),
             "head_dim": 16, "layers": 4, "image_size": 32, "patch_size": 8, "chunk_size": 4, "prompt_tokens": 8},
    "metaworld": {"vision": dict(vision_width=128, vision_depth=4, vision_mlp_dim=512),
                  "vlm": dict(width=192, mlp_dim=512, num_heads=4), "expert": dict(width=128, mlp_dim=384, num_heads=4),
                  "head_dim": 48, "layers": 8, "image_size": 96, "patch_size": 16, "chunk_size": 8,
                  "prompt_tokens": 16},
}


def write_tokenizer_dir(directory: Path, size: str, layers: int | None = None, image_size: int | None = None) -> Path:
    """A word-level tokenizer (Meta-World and robot words, BOS prepended) in the layout transformers
    4.x reads too (LeRobot 0.4.x runs on 4.x). pi0 needs no VLM config: its sizes are the tensors'."""
    from actdistill_ros.policies.hf_vla.tiny_backbone import build_tokenizer

    preset = SIZES[size]
    image_size = image_size or preset["image_size"]
    if image_size % preset["patch_size"]:
        raise ValueError(f"--image-size {image_size}: expected a multiple of {preset['patch_size']} (the patch size)")
    directory.mkdir(parents=True, exist_ok=True)
    save_tokenizer(build_tokenizer(), directory)
    return directory


def policy_config(demos, vlm_dir: Path, size: str, layers: int, image_size: int, chunk_size: int, train) -> dict:
    """config.json of the policy, as LeRobot 0.4.x writes a pi0's (its training fields included).
    The Gemma variant names are LeRobot's smallest; the sizes actually built are the tensors'."""
    episode = demos.train.episodes[0]
    height, width = episode.images.shape[2:4]
    inputs = {camera_key(t): {"type": "VISUAL", "shape": [3, int(height), int(width)]} for t in demos.camera_names}
    inputs[STATE_KEY] = {"type": "STATE", "shape": [len(demos.state_names)]}
    config = {
        "type": "pi0", "n_obs_steps": 1, "input_features": inputs,
        "output_features": {ACTION_KEY: {"type": "ACTION", "shape": [len(demos.action_names)]}},
        "device": "cpu", "use_amp": False, "use_peft": False, "push_to_hub": False, "repo_id": None, "private": None,
        "tags": None, "license": None, "pretrained_path": None, "paligemma_variant": "gemma_2b",
        "action_expert_variant": "gemma_300m", "dtype": "float32", "chunk_size": chunk_size,
        "n_action_steps": chunk_size, "max_state_dim": 32, "max_action_dim": 32, "num_inference_steps": 10,
        "time_sampling_beta_alpha": 1.5, "time_sampling_beta_beta": 1.0, "time_sampling_scale": 0.999,
        "time_sampling_offset": 0.001, "min_period": 0.004, "max_period": 4.0, "rtc_config": None,
        "image_resolution": [image_size, image_size], "empty_cameras": 0, "normalization_mapping": NORM_MAP,
        "gradient_checkpointing": False, "compile_model": False, "compile_mode": "max-autotune",
        "freeze_vision_encoder": False, "train_expert_only": False, "optimizer_lr": train.lr,
        "optimizer_betas": [0.9, 0.95], "optimizer_eps": 1e-8, "optimizer_weight_decay": train.weight_decay,
        "optimizer_grad_clip_norm": train.grad_clip, "scheduler_warmup_steps": train.warmup_steps,
        "scheduler_decay_steps": train.steps, "scheduler_decay_lr": 0.0,
        "tokenizer_max_length": SIZES[size]["prompt_tokens"]}
    PI0Config.from_dict(config, "the pi0 teacher's config.json")  # what the loader will check, checked now
    return config


def model_sizes(size: str, layers: int, image_size: int, vocab: int) -> PI0Sizes:
    preset = SIZES[size]
    gemma = dict(depth=layers, num_kv_heads=NUM_KV_HEADS, head_dim=preset["head_dim"])
    return PI0Sizes(vocab=vocab, vlm=GemmaSizes(**preset["vlm"], **gemma),
                    expert=GemmaSizes(**preset["expert"], **gemma), **preset["vision"],
                    patch_size=preset["patch_size"], image_size=image_size)


def build_model(config_file: Path, vlm_dir: Path, size: str, layers: int, seed: int) -> PI0Model:
    """The pi0 of ``size`` with ``layers`` VLM and expert layers and LeRobot's from-config initialisation."""
    from actdistill_ros.policies.lerobot_processor import load_tokenizer

    config = PI0Config.from_file(config_file)
    torch.manual_seed(seed)
    vocab = len(load_tokenizer(vlm_dir))
    model = PI0Model(config, model_sizes(size, layers, config.image_resolution[0], vocab))
    for stack in (model.vlm, model.expert):
        for module in stack.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(module.weight, std=INIT_STD)
                if getattr(module, "bias", None) is not None:
                    torch.nn.init.zeros_(module.bias)
    return model


PI0_RECIPE = TeacherRecipe(
    label="pi0", flag="--family pi0", sizes=SIZES, default_size="metaworld", policy=PI0Policy,
    write_vlm_dir=write_tokenizer_dir, policy_config=policy_config,
    write_processors=lambda directory, config, stats, vlm_dir: write_processors(
        directory, config, stats, NEW_LINE, tokenizer_name=str(vlm_dir.resolve()), padding="max_length"),
    build_model=build_model, lerobot_weights=lambda model: lerobot_state(model, None),
    preset_layers=lambda preset: preset["layers"])


def train_pi0_teacher(args, topics) -> Path:
    from actdistill_ros.policies.smolvla.train_smolvla import train_flow_teacher

    return train_flow_teacher(args, topics, PI0_RECIPE)
