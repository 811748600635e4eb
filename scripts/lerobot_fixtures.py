"""Tiny SmolVLA (and, with --family pi0, pi0 and pi0.5) policies made, saved and run by LeRobot itself: the
oracle for `actdistill predict`.

Run by scripts/make_lerobot_fixtures.sh inside a throwaway environment that has lerobot 0.4.4 (never
a dependency of this package), with HF_HOME pointing at an empty private cache and HF_HUB_OFFLINE=1.

It writes, under --out:
  processor/, processor_text_bf16/   each tiny VLM's config.json and tokenizer/processor files
                         (`--vlm-processor DIR`; case.json names the one of each case)
  <name>/policy/         LeRobot's save_pretrained output: config.json, model.safetensors,
                         policy_preprocessor.json, policy_postprocessor.json and their state files
  <name>/batch.safetensors   raw inputs: observation.images.<camera> float32 [B,3,H,W] in [0,1],
                             observation.state float32 [B,S]
  <name>/noise.safetensors   `noise`: the flow-matching start noise [B, chunk_size, max_action_dim]
  <name>/expected.safetensors  `action`: postprocessor(policy.predict_action_chunk(preprocessor(batch), noise))
                               plus LeRobot's token ids and mask, for diagnosing a tokenizer mismatch
  <name>/case.json       the task text and what the case exercises
The policy is reloaded from its saved directory before it is run, so the saved files are what is tested.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

# The tiny VLMs (config's vlm_model_name -> committed directory), resolved by LeRobot from the private
# cache. The second writes a bfloat16 dtype into its text config: transformers 4.x then builds the
# text model and LeRobot's expert in bfloat16 even though the VLM weights are not loaded.
VLMS = {"processor": ("actdistill-tests/tiny-smolvlm", None),
        "processor_text_bf16": ("actdistill-tests/tiny-smolvlm-text-bf16", "bfloat16")}
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>",
                  "<global-img>", "<end_of_utterance>", "<video>"]
CORPUS = [
    "pick up the red cube and place it in the bowl", "open the top drawer", "close the drawer",
    "push the green button", "stack the blue block on the yellow block", "reach the goal position",
    "turn the faucet to the left", "press the handle down", "slide the plate into the rack",
    "Pick Up The Cube!", "grasp the mug by its handle, then lift it 10 cm",
]
# What each case exercises beyond the defaults (SmolVLA's own defaults where not named).
CASES = {
    "cross_attn": dict(
        doc="SmolVLA defaults: cross-attention expert with self-attention every 2 layers, mean/std state "
            "and action, language padded to the longest prompt, 10 steps",
        config={}, action_norm="MEAN_STD", state_norm="MEAN_STD",
        task="pick up the red cube and place it in the bowl", batch=2, vlm="processor"),
    "variants": dict(
        doc="min/max action and state, image special tokens, language padded to max_length, "
            "self-attention every 3 layers, 6 steps, n_action_steps < chunk_size",
        config=dict(add_image_special_tokens=True, pad_language_to="max_length", tokenizer_max_length=20,
                    num_vlm_layers=3, self_attn_every_n_layers=3, num_steps=6, chunk_size=6, n_action_steps=4),
        action_norm="MIN_MAX", state_norm="MIN_MAX", task="open the top drawer", batch=2, vlm="processor"),
    "self_attn": dict(
        doc="joint self-attention in every layer, an empty (missing) camera, a prefix padded to "
            "prefix_length, expert width 0.5, quantile (q01/q99) state",
        config=dict(attention_mode="self_attn", num_vlm_layers=3, empty_cameras=1, prefix_length=40,
                    expert_width_multiplier=0.5, num_steps=4),
        action_norm="MEAN_STD", state_norm="QUANTILES", task="Pick Up The Cube!", batch=2, vlm="processor"),
    "bf16_vlm": dict(
        doc="load_vlm_weights=true, as in a policy fine-tuned from smolvla_base: LeRobot then runs the VLM "
            "and the expert in bfloat16 (its pretrained-VLM load), the projections in float32",
        config=dict(load_vlm_weights=True, num_vlm_layers=2), action_norm="MEAN_STD", state_norm="MEAN_STD",
        task="push the green button", batch=2, vlm="processor"),
    "text_bf16": dict(
        doc="a VLM config whose text entry says torch_dtype bfloat16: LeRobot's text layers and expert "
            "run in bfloat16, its vision tower and projections in float32; q10/q90 quantile action",
        config=dict(num_vlm_layers=2), action_norm="QUANTILE10", state_norm="MEAN_STD",
        task="stack the blue block on the yellow block", batch=2, vlm="processor_text_bf16"),
}
# (H, W): one camera smaller and one larger than the model's input, of different aspect ratios.
CAMERAS = {"observation.images.top": (24, 40), "observation.images.wrist": (72, 50)}
STATE_DIM, ACTION_DIM = 5, 6
IMAGE_SIZE = 64


def build_tokenizer(directory: Path):
    """A small byte-level BPE tokenizer (the kind SmolVLM uses) with SmolVLM's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
        unk_token="<|endoftext|>", pad_token="<|im_end|>",
        extra_special_tokens={"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
                              "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"})
    fast.save_pretrained(directory)
    return fast


def build_vlm_files(directory: Path, text_dtype: str | None) -> None:
    """The tiny VLM's config.json and processor files, as the hub repository of vlm_model_name has them."""
    from transformers import (LlamaConfig, SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor,
                              SmolVLMVideoProcessor)
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    # Tied embeddings: safetensors then keeps only lm_head's name, as for tied real checkpoints.
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=8,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-5,
                       rope_theta=100000.0, max_position_embeddings=512, tie_word_embeddings=True,
                       pad_token_id=tokenizer.pad_token_id)
    vision = SmolVLMVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=IMAGE_SIZE, patch_size=16)
    config = SmolVLMConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), scale_factor=2,
                           image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=True)
    config.save_pretrained(directory)
    if text_dtype:
        written = json.loads((directory / "config.json").read_text())
        written["text_config"]["torch_dtype"] = text_dtype
        (directory / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    image_processor = SmolVLMImageProcessor(do_image_splitting=False, size={"longest_edge": IMAGE_SIZE},
                                            max_image_size={"longest_edge": IMAGE_SIZE})
    processor = SmolVLMProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=SmolVLMVideoProcessor(), image_seq_len=4)
    processor.save_pretrained(directory)


def install_in_cache(source: Path, name: str) -> None:
    """Copy the VLM files into the private HF cache layout, where LeRobot looks vlm_model_name up,
    with random VLM weights beside them (load_vlm_weights=true reads them; the policy's own
    model.safetensors then replaces every one, so they are not committed)."""
    from transformers import AutoConfig, SmolVLMForConditionalGeneration

    repo = Path(os.environ["HF_HOME"]) / "hub" / f"models--{name.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    snapshot = repo / "snapshots" / SNAPSHOT
    shutil.copytree(source, snapshot, dirs_exist_ok=True)
    torch.manual_seed(1234)
    SmolVLMForConditionalGeneration(AutoConfig.from_pretrained(source)).save_pretrained(snapshot)
    shutil.copy(source / "config.json", snapshot / "config.json")  # the committed config, byte for byte


def randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter redrawn at a scale that keeps activations O(1): a default init (std 0.02)
    would leave the output dominated by biases and hide wrong wiring."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.ndim >= 2:
                fan_in = parameter[0].numel()
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in ** 0.5)
            elif "norm" in name or "layernorm" in name:
                parameter.copy_(1.0 + 0.2 * torch.randn(parameter.shape, generator=generator))
            else:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))


def stats_for(dim: int, generator: torch.Generator) -> dict:
    """Every statistic a LeRobot dataset records, all different, so the mode picks its own."""
    low = -2 + torch.rand(dim, generator=generator)
    width = 0.5 + 3 * torch.rand(dim, generator=generator)
    quantiles = {f"q{q:02d}": low + width * (q / 100 + 0.02 * torch.rand(dim, generator=generator))
                 for q in (1, 10, 90, 99)}
    return {"mean": torch.randn(dim, generator=generator), "std": 0.3 + 2 * torch.rand(dim, generator=generator),
            "min": low, "max": low + width, **quantiles}


def make_case(name: str, spec: dict, out: Path, seed: int) -> None:
    from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors
    from lerobot.processor import PolicyProcessorPipeline
    from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    inputs = {key: PolicyFeature(type=FeatureType.VISUAL, shape=(3, h, w)) for key, (h, w) in CAMERAS.items()}
    inputs["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,))
    config = SmolVLAConfig(
        input_features=inputs, output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))},
        normalization_mapping={"VISUAL": NormalizationMode.IDENTITY, "STATE": NormalizationMode(spec["state_norm"]),
                               "ACTION": NormalizationMode(spec["action_norm"])},
        vlm_model_name=VLMS[spec["vlm"]][0],
        resize_imgs_with_padding=(IMAGE_SIZE, IMAGE_SIZE), device="cpu", push_to_hub=False,
        **({"chunk_size": 8, "n_action_steps": 8, "num_vlm_layers": 4, "load_vlm_weights": False} | spec["config"]))
    policy = SmolVLAPolicy(config)
    randomize(policy, generator)
    stats = {"observation.state": stats_for(STATE_DIM, generator), "action": stats_for(ACTION_DIM, generator)}
    # Image stats are present as in a real dataset; the VISUAL identity mapping leaves images alone.
    for key in CAMERAS:
        stats[key] = {"mean": torch.full((3, 1, 1), 0.5), "std": torch.full((3, 1, 1), 0.25),
                      "min": torch.zeros(3, 1, 1), "max": torch.ones(3, 1, 1)}
    preprocessor, postprocessor = make_smolvla_pre_post_processors(config, dataset_stats=stats)

    case_dir = out / name
    policy_dir = case_dir / "policy"
    policy.save_pretrained(policy_dir)
    preprocessor.save_pretrained(policy_dir)
    postprocessor.save_pretrained(policy_dir)

    # The oracle run uses what was saved.
    policy = SmolVLAPolicy.from_pretrained(policy_dir).eval()
    vlm = policy.model.vlm_with_expert.get_vlm_model()
    dtypes = {name: str(next(part.parameters()).dtype).removeprefix("torch.") for name, part in
              (("vision", vlm.vision_model), ("connector", vlm.connector), ("text", vlm.text_model),
               ("expert", policy.model.vlm_with_expert.lm_expert), ("projections", policy.model.state_proj))}
    preprocessor = PolicyProcessorPipeline.from_pretrained(policy_dir, config_filename="policy_preprocessor.json")
    postprocessor = PolicyProcessorPipeline.from_pretrained(
        policy_dir, config_filename="policy_postprocessor.json", to_transition=policy_action_to_transition,
        to_output=transition_to_policy_action)

    batch_size = spec["batch"]
    batch = {key: torch.rand(batch_size, 3, h, w, generator=generator) for key, (h, w) in CAMERAS.items()}
    batch["observation.state"] = torch.randn(batch_size, STATE_DIM, generator=generator) * 1.5
    noise = torch.randn(batch_size, policy.config.chunk_size, policy.config.max_action_dim, generator=generator)
    processed = preprocessor({**{k: v.clone() for k, v in batch.items()}, "task": [spec["task"]] * batch_size})
    with torch.no_grad():
        actions = postprocessor(policy.predict_action_chunk(processed, noise=noise.clone()))
    save_file({k: v.contiguous() for k, v in batch.items()}, case_dir / "batch.safetensors")
    save_file({"noise": noise.contiguous()}, case_dir / "noise.safetensors")
    save_file({"action": actions.float().contiguous(),
               "lang_tokens": processed["observation.language.tokens"].contiguous(),
               "lang_mask": processed["observation.language.attention_mask"].contiguous()},
              case_dir / "expected.safetensors")
    (case_dir / "case.json").write_text(json.dumps({"task": spec["task"], "doc": spec["doc"], "seed": seed, "vlm_processor": spec["vlm"],
                                                    "lerobot_dtypes": dtypes},
                                                   indent=2) + "\n")
    print(f"{name}: {dtypes}, actions {tuple(actions.shape)}, |a| max {actions.abs().max():.3f}, "
          f"tokens {processed['observation.language.tokens'].tolist()[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--family", choices=("smolvla", "pi0"), default="smolvla",
                        help="smolvla (transformers 4.57), or pi0 and pi0.5 into OUT/pi0 (transformers 4.53.2 with "
                             "openpi's transformers_replace first on PYTHONPATH)")
    args = parser.parse_args()
    if "HF_HOME" not in os.environ or os.environ.get("HF_HUB_OFFLINE") != "1":
        raise SystemExit("run through scripts/make_lerobot_fixtures.sh (a private HF_HOME, HF_HUB_OFFLINE=1)")
    if args.family == "pi0":
        from lerobot_fixtures_pi0 import make_pi0_fixtures  # needs the pi0 transformers on PYTHONPATH

        make_pi0_fixtures(args.out / "pi0", randomize=randomize, stats_for=stats_for, cameras=CAMERAS,
                          state_dim=STATE_DIM, action_dim=ACTION_DIM)
        return
    for directory in [*VLMS, *CASES]:  # SmolVLA's own directories: pi0/ is left alone
        if (args.out / directory).exists():
            shutil.rmtree(args.out / directory)
    for directory, (name, text_dtype) in VLMS.items():
        build_vlm_files(args.out / directory, text_dtype)
        install_in_cache(args.out / directory, name)
    for seed, (name, spec) in enumerate(CASES.items()):
        make_case(name, spec, args.out, seed)


if __name__ == "__main__":
    main()
