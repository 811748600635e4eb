"""Tiny pi0 and pi0.5 policies made, saved and run by LeRobot 0.4.4: the oracle of test/test_pi0_parity.py.

Called by lerobot_fixtures.py --family pi0 (see scripts/make_lerobot_fixtures.sh), with transformers
4.53.2 and openpi's transformers_replace first on PYTHONPATH, HF_HOME a private empty cache and
HF_HUB_OFFLINE=1. LeRobot's pi0 builds the published sizes only (a 3.5B model; a 257152-row
vocabulary in the VLM and in the expert's lm_head; a 27-layer SigLIP): the sizes are patched small
here, in LeRobot's own module namespace, and nothing else of its code is touched. The tiny variants
keep what a loader cannot read from tensor shapes: one key/value head (both Gemma variants are
multi-query), SigLIP's 16 heads and layer-norm eps.

Writes, under OUT (= test/fixtures/lerobot/pi0):
  paligemma_tokenizer/   the small tokenizer, as the hub repository google/paligemma-3b-pt-224 holds it
                         (`--vlm-processor DIR`; also installed in the private HF cache for LeRobot)
  <case>/policy/         LeRobot's save_pretrained output (config.json, model.safetensors, processors)
  <case>/batch.safetensors, noise.safetensors, expected.safetensors, case.json  as for SmolVLA
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

TOKENIZER_REPO = "google/paligemma-3b-pt-224"  # LeRobot's pi0/pi0.5 processors name it
SNAPSHOT = "fedcba9876543210fedcba9876543210fedcba98"
IMAGE_SIZE, PATCH = 56, 14  # 16 image tokens per camera
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=16, patch_size=PATCH)
# (width, depth, mlp_dim, num_heads, num_kv_heads, head_dim) by LeRobot's variant name; the depths match
# because expert layer i reads VLM layer i's keys/values.
VARIANTS = {"gemma_2b": (48, 4, 96, 2, 1, 16), "gemma_300m": (32, 4, 64, 2, 1, 16)}
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]  # Gemma's ids 0..3
CORPUS = [
    "pick up the red cube and place it in the bowl", "open the top drawer", "close the drawer",
    "push the green button", "Pick Up The Cube!", "stack the blue block on the yellow block",
    "Task: open the top drawer, State: 0 12 127 128 255 31 64 200 99 3 18 7;\nAction: ",
    "0 1 2 3 4 5 6 7 8 9 10 11 100 101 128 199 250 255", "reach_the_goal position\n",
]
CASES = {
    "pi0": dict(
        type="pi0", doc="pi0: mean/std state and action, the state token and action tokens in the expert's "
        "suffix, one empty (missing) camera, 5 steps, n_action_steps < chunk_size",
        config=dict(empty_cameras=1, num_inference_steps=5, chunk_size=8, n_action_steps=5, max_state_dim=12,
                    max_action_dim=10, tokenizer_max_length=16),
        task="pick up the red cube and place it in the bowl", batch=2, state_norm="MEAN_STD", action_norm="MEAN_STD"),
    "pi05": dict(
        type="pi05", doc="pi0.5: quantile (q01/q99) state and action, the normalised state discretised into "
        "the prompt, adaptive RMS norms in the expert conditioned on the timestep, 4 steps",
        config=dict(num_inference_steps=4, chunk_size=6, n_action_steps=6, max_state_dim=12, max_action_dim=10,
                    tokenizer_max_length=72),
        task="stack the blue block on the yellow block", batch=2, state_norm="QUANTILES", action_norm="QUANTILES"),
}


def build_tokenizer(directory: Path):
    """A small sentencepiece-style (metaspace BPE) tokenizer that prepends <bos>, as PaliGemma's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-,.;:!_"
    alphabet = sorted(set("".join(CORPUS)) | set(letters))
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, initial_alphabet=alphabet)
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")
    fast.save_pretrained(directory)
    return fast


def install_in_cache(source: Path) -> None:
    repo = Path(os.environ["HF_HOME"]) / "hub" / f"models--{TOKENIZER_REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    shutil.copytree(source, repo / "snapshots" / SNAPSHOT, dirs_exist_ok=True)


def patch_sizes(vocab: int) -> None:
    """Shrink what LeRobot's pi0/pi0.5 modules build: the Gemma variants, the vocabulary, SigLIP."""
    from lerobot.policies.pi0 import modeling_pi0
    from lerobot.policies.pi05 import modeling_pi05
    from transformers.models.gemma.modeling_gemma import GemmaForCausalLM
    from transformers.models.paligemma.modeling_paligemma import PaliGemmaForConditionalGeneration

    def gemma_config(variant: str):
        return modeling_pi0.GemmaConfig(*VARIANTS[variant])

    def tiny_paligemma(config):
        config._vocab_size = vocab  # noqa: SLF001 - what LeRobot itself sets
        config.text_config.vocab_size = vocab
        config.image_token_index = vocab - 1
        for name, value in VISION.items():
            setattr(config.vision_config, name, value)
        config.vision_config.projection_dim = config.text_config.hidden_size
        return PaliGemmaForConditionalGeneration(config)

    def tiny_expert(config):
        config.vocab_size = vocab
        return GemmaForCausalLM(config)

    for module in (modeling_pi0, modeling_pi05):
        module.get_gemma_config = gemma_config
        module.PaliGemmaForConditionalGeneration = tiny_paligemma
        module.GemmaForCausalLM = tiny_expert


def check_loaded(policy, weights: Path) -> None:
    """LeRobot's from_pretrained reports the tied embed_tokens as missing and goes on (its strict load
    raises after copying every tensor, and it catches that): make sure the oracle holds every saved
    tensor, the tied embedding included."""
    from safetensors.torch import load_file

    saved, own = load_file(str(weights)), policy.state_dict()
    for name, tensor in saved.items():
        if not torch.equal(own[name], tensor):
            raise SystemExit(f"{weights}: {name} did not load into LeRobot's policy")
    embed = own["model.paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"]
    if not torch.equal(embed, saved["model.paligemma_with_expert.paligemma.lm_head.weight"]):
        raise SystemExit(f"{weights}: LeRobot's embed_tokens is not the saved (tied) lm_head")


def make_case(name: str, spec: dict, out: Path, seed: int, randomize, stats_for, cameras: dict,
              state_dim: int, action_dim: int) -> None:
    from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.processor import PolicyProcessorPipeline
    from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action

    if spec["type"] == "pi0":
        from lerobot.policies.pi0.configuration_pi0 import PI0Config as Config
        from lerobot.policies.pi0.modeling_pi0 import PI0Policy as Policy
        from lerobot.policies.pi0.processor_pi0 import make_pi0_pre_post_processors as make_processors
    else:
        from lerobot.policies.pi05.configuration_pi05 import PI05Config as Config
        from lerobot.policies.pi05.modeling_pi05 import PI05Policy as Policy
        from lerobot.policies.pi05.processor_pi05 import make_pi05_pre_post_processors as make_processors

    generator = torch.Generator().manual_seed(100 + seed)
    torch.manual_seed(100 + seed)
    inputs = {key: PolicyFeature(type=FeatureType.VISUAL, shape=(3, h, w)) for key, (h, w) in cameras.items()}
    inputs["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(state_dim,))
    config = Config(
        input_features=inputs, output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(action_dim,))},
        normalization_mapping={"VISUAL": NormalizationMode.IDENTITY, "STATE": NormalizationMode(spec["state_norm"]),
                               "ACTION": NormalizationMode(spec["action_norm"])},
        image_resolution=(IMAGE_SIZE, IMAGE_SIZE), device="cpu", push_to_hub=False, **spec["config"])
    policy = Policy(config)
    randomize(policy, generator)
    stats = {"observation.state": stats_for(state_dim, generator), "action": stats_for(action_dim, generator)}
    for key in cameras:
        stats[key] = {"mean": torch.full((3, 1, 1), 0.5), "std": torch.full((3, 1, 1), 0.25),
                      "min": torch.zeros(3, 1, 1), "max": torch.ones(3, 1, 1)}
    preprocessor, postprocessor = make_processors(config, dataset_stats=stats)
    case_dir = out / name
    policy_dir = case_dir / "policy"
    policy.save_pretrained(policy_dir)
    preprocessor.save_pretrained(policy_dir)
    postprocessor.save_pretrained(policy_dir)

    policy = Policy.from_pretrained(policy_dir).eval()  # the oracle runs what was saved
    check_loaded(policy, policy_dir / "model.safetensors")
    preprocessor = PolicyProcessorPipeline.from_pretrained(policy_dir, config_filename="policy_preprocessor.json")
    postprocessor = PolicyProcessorPipeline.from_pretrained(
        policy_dir, config_filename="policy_postprocessor.json", to_transition=policy_action_to_transition,
        to_output=transition_to_policy_action)
    batch_size = spec["batch"]
    batch = {key: torch.rand(batch_size, 3, h, w, generator=generator) for key, (h, w) in cameras.items()}
    batch["observation.state"] = torch.randn(batch_size, state_dim, generator=generator) * 1.5
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
    (case_dir / "case.json").write_text(json.dumps(
        {"task": spec["task"], "doc": spec["doc"], "seed": 100 + seed, "vlm_processor": "paligemma_tokenizer"},
        indent=2) + "\n")
    print(f"{name}: actions {tuple(actions.shape)}, |a| max {actions.abs().max():.3f}, std {actions.std():.3f}, "
          f"tokens {processed['observation.language.tokens'].tolist()[0]}")


def make_pi0_fixtures(out: Path, **shared) -> None:
    if out.exists():
        shutil.rmtree(out)
    tokenizer = build_tokenizer(out / "paligemma_tokenizer")
    install_in_cache(out / "paligemma_tokenizer")
    patch_sizes(len(tokenizer))
    for seed, (name, spec) in enumerate(CASES.items()):
        make_case(name, spec, out, seed, **shared)
