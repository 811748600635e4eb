"""What one SmolVLA action chunk costs, by part: the vision tower per camera, the VLM prefix (once
per chunk, its keys/values cached) and every denoising step of the action expert.

FLOPs count the matrix products (2 x M x N x K each: linear layers, the patch convolution, the
attention scores and the weighted sums); norms, rotary angles, softmax and activations are left
out, as ``torch.utils.flop_counter.FlopCounterMode`` leaves them out, so the formulas here can be
checked against a counted forward (test/test_smolvla_compute.py). Attention is counted over the
padded lengths the code computes, masked keys included.

Routing skips VLM text layers of the prefix (a keep mask over ``num_vlm_layers``). A skipped
layer passes its input through unchanged, and the expert layer paired with it still reads keys and
values, which ``SmolVLAModel.vlm_layer(..., need_output=False)`` projects from the hidden state the
skipped layer receives: one norm and two projections. The last VLM layer's output feeds nothing
(the expert reads only keys/values), so it costs those two projections whether kept or not.

``published_smolvla_model`` builds SmolVLA at its published size from the numbers of
SmolVLM2-500M-Video-Instruct (nothing is downloaded; random weights, for timing).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from actdistill_ros.policies.smolvla.configuration_smolvla import Feature, SmolVLAConfig
from actdistill_ros.policies.smolvla.modeling_smolvla import (Prefix, PrefixCache, SmolVLAModel,
                                                              expert_intermediate_size)

# SmolVLM2-500M-Video-Instruct, the VLM of LeRobot's smolvla_base (its config.json). SmolVLA keeps
# the first num_vlm_layers (16) of the 32 text layers.
PUBLISHED_VLM_NAME = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"
PUBLISHED_TEXT = dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                      num_key_value_heads=5, head_dim=64, vocab_size=49280, rms_norm_eps=1e-5,
                      max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=False)
PUBLISHED_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        patch_size=16, image_size=512)
PUBLISHED_SCALE_FACTOR = 4  # pixel shuffle: 1024 patches of a 512 x 512 image -> 64 image tokens
# smolvla_base's policy settings (LeRobot's SmolVLAConfig defaults).
PUBLISHED_POLICY = dict(num_vlm_layers=16, expert_width_multiplier=0.75, num_steps=10, chunk_size=50,
                        n_action_steps=50, self_attn_every_n_layers=2, attention_mode="cross_attn",
                        resize_imgs_with_padding=(512, 512))


def smolvlm_config(text: dict, vision: dict, scale_factor: int):
    """A transformers SmolVLM config from text and vision sizes (eager vision attention, so that a
    FLOP counter sees its products; timing builds set ``vision_attention="sdpa"``)."""
    from transformers import SmolVLMConfig

    text = {"model_type": "llama", "attention_bias": False, "mlp_bias": False, "hidden_act": "silu", **text}
    vision = {"model_type": "smolvlm_vision", "hidden_act": "gelu_pytorch_tanh", "num_channels": 3, **vision}
    return SmolVLMConfig(text_config=text, vision_config=vision, scale_factor=scale_factor)


def smolvla_config(cameras: Sequence[str], image_hw: tuple[int, int], state_dim: int, action_dim: int,
                   **policy) -> SmolVLAConfig:
    features = {f"observation.images.{name}": Feature("VISUAL", (3, *image_hw)) for name in cameras}
    features["observation.state"] = Feature("STATE", (state_dim,))
    return SmolVLAConfig(input_features=features, output_features={"action": Feature("ACTION", (action_dim,))},
                         source="built in code", **policy)


def build_model(config: SmolVLAConfig, vlm_config, vision_attention: str = "eager", seed: int = 0) -> SmolVLAModel:
    """A randomly initialised SmolVLAModel (float32) of these configs."""
    torch.manual_seed(seed)
    model = SmolVLAModel(config, vlm_config)
    for module in model.modules():  # no_init_weights left them empty: any finite values time the same
        for name, parameter in module.named_parameters(recurse=False):
            with torch.no_grad():
                if name == "weight" and parameter.ndim >= 2:
                    parameter.normal_(0.0, 0.02)
                elif "norm" in type(module).__name__.lower() and name == "weight":
                    parameter.fill_(1.0)
                else:
                    parameter.zero_()
    model.vlm.vision_model.config._attn_implementation = vision_attention
    return model.eval()


def published_smolvla_model(num_cameras: int = 2, image_hw: tuple[int, int] = (512, 512), state_dim: int = 6,
                            action_dim: int = 6, vision_attention: str = "sdpa") -> SmolVLAModel:
    """SmolVLA at its published size (SmolVLM2-500M, 16 kept text layers, expert width 0.75, 10 steps,
    chunk 50), random weights."""
    vlm = smolvlm_config(PUBLISHED_TEXT, PUBLISHED_VISION, PUBLISHED_SCALE_FACTOR)
    config = smolvla_config([f"camera{i + 1}" for i in range(num_cameras)], image_hw, state_dim, action_dim,
                            vlm_model_name=PUBLISHED_VLM_NAME, **PUBLISHED_POLICY)
    return build_model(config, vlm, vision_attention)


# A few-layer SmolVLA of the same layout, for tests and smoke runs of `actdistill bench --smolvla tiny`.
TINY_TEXT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=12, vocab_size=64)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8,
                   image_size=32)
TINY_POLICY = dict(num_vlm_layers=8, chunk_size=5, n_action_steps=5, num_steps=3, resize_imgs_with_padding=(32, 32),
                   max_state_dim=8, max_action_dim=8)


def tiny_smolvla_model(vision_attention: str = "sdpa", **policy) -> SmolVLAModel:
    config = smolvla_config(["top", "wrist"], (24, 40), 4, 3, vlm_model_name="tiny", **{**TINY_POLICY, **policy})
    return build_model(config, smolvlm_config(TINY_TEXT, TINY_VISION, 2), vision_attention)


# ---------------------------------------------------------------- the FLOPs model
@dataclass(frozen=True)
class SmolVLASizes:
    """The sizes the FLOPs depend on, read from a built model (or its configs)."""

    vision_width: int
    vision_intermediate: int
    vision_layers: int
    patch: int
    scale_factor: int
    resized_hw: tuple[int, int] | None  # resize_imgs_with_padding as (height, width); None: native size
    width: int  # VLM text
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    expert_width: int
    expert_intermediate: int
    expert_kv_heads: int
    expert_index: tuple[int | None, ...]  # VLM layer -> its expert layer
    self_attention: tuple[bool, ...]  # per VLM layer index: is its expert layer self-attention
    max_state_dim: int
    max_action_dim: int
    chunk_size: int
    num_steps: int

    @classmethod
    def of(cls, model: SmolVLAModel) -> "SmolVLASizes":
        vision = model.vlm.config.vision_config
        text = model.vlm.config.text_config
        config = model.config
        resize = config.resize_imgs_with_padding
        expert_config = model.expert.config
        return cls(vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.patch_size,
                   model.vlm.config.scale_factor, None if resize is None else (resize[1], resize[0]),
                   model.width, text.intermediate_size, model.num_heads, model.num_kv_heads, model.head_dim,
                   model.expert_width, expert_intermediate_size(model.expert_width),
                   expert_config.num_key_value_heads, tuple(model.expert_index),
                   tuple(config.is_self_attention_layer(i) for i in range(model.num_vlm_layers)),
                   config.max_state_dim, config.max_action_dim, config.chunk_size, config.num_steps)

    @property
    def num_vlm_layers(self) -> int:
        return len(self.expert_index)

    def patches(self, image_hw: tuple[int, int]) -> int:
        height, width = self.resized_hw or image_hw
        return (height // self.patch) * (width // self.patch)

    def image_tokens(self, image_hw: tuple[int, int]) -> int:
        return self.patches(image_hw) // self.scale_factor ** 2

    # ---- one camera ----
    def vision_flops(self, image_hw: tuple[int, int]) -> int:
        """Vision tower + connector on one camera image (after the resize with padding)."""
        n, d, i = self.patches(image_hw), self.vision_width, self.vision_intermediate
        patch_embedding = 2 * n * 3 * self.patch ** 2 * d
        layer = 4 * 2 * n * d * d + 2 * 2 * n * n * d + 2 * 2 * n * d * i
        connector = 2 * (n // self.scale_factor ** 2) * (d * self.scale_factor ** 2) * self.width
        return patch_embedding + self.vision_layers * layer + connector

    # ---- the prefix, once per chunk ----
    def text_layer_flops(self, length: int, need_output: bool) -> int:
        """One VLM text layer on ``length`` prefix tokens; without output only its keys/values."""
        w, q, kv = self.width, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        keys_values = 2 * 2 * length * w * kv
        if not need_output:
            return keys_values
        return (keys_values + 2 * 2 * length * w * q + 2 * 2 * length * length * q
                + 3 * 2 * length * w * self.intermediate)

    def prefix_flops(self, length: int, keep: Sequence[bool] | None = None) -> int:
        """The prefix after the vision tower: the state projection, the text layers (kept ones in
        full, skipped ones and the last one keys/values only) and the cross-attention expert
        layers' own projections of the cached keys/values (once per chunk)."""
        keep = [True] * self.num_vlm_layers if keep is None else list(keep)
        if len(keep) != self.num_vlm_layers:
            raise ValueError(f"keep mask has {len(keep)} entries, the model has {self.num_vlm_layers} VLM layers")
        last = self.num_vlm_layers - 1
        total = 2 * self.max_state_dim * self.width
        total += sum(self.text_layer_flops(length, bool(kept) and i < last) for i, kept in enumerate(keep))
        kv, expert_kv = self.num_kv_heads * self.head_dim, self.expert_kv_heads * self.head_dim
        cross = sum(1 for i, e in enumerate(self.expert_index) if e is not None and not self.self_attention[i])
        return total + cross * 2 * 2 * length * kv * expert_kv

    # ---- one denoising step ----
    def expert_step_flops(self, prefix_length: int) -> int:
        """One velocity evaluation: the action/time embedding, every expert layer over the chunk's
        tokens (self-attention layers over prefix + chunk, cross-attention ones over the prefix),
        the output projection."""
        s, w, a = self.chunk_size, self.expert_width, self.max_action_dim
        q, expert_kv = self.num_heads * self.head_dim, self.expert_kv_heads * self.head_dim
        total = 2 * s * a * w + 2 * s * 2 * w * w + 2 * s * w * w + 2 * s * w * a
        for index, expert in enumerate(self.expert_index):
            if expert is None:
                continue
            total += 2 * 2 * s * w * q + 3 * 2 * s * w * self.expert_intermediate
            if self.self_attention[index]:
                total += 2 * 2 * s * w * expert_kv + 2 * 2 * s * (prefix_length + s) * q
            else:
                total += 2 * 2 * s * prefix_length * q
        return total


@dataclass(frozen=True)
class ChunkFlops:
    """FLOPs of one action chunk, by part."""

    vision_per_camera: tuple[int, ...]
    prefix: int
    expert_step: int
    num_steps: int

    @property
    def vision(self) -> int:
        return sum(self.vision_per_camera)

    @property
    def expert(self) -> int:
        return self.expert_step * self.num_steps

    @property
    def total(self) -> int:
        return self.vision + self.prefix + self.expert


def prefix_length(sizes: SmolVLASizes, image_hws: Sequence[tuple[int, int]], task_tokens: int,
                  special_tokens_per_camera: int = 0, padded_to: int = -1) -> int:
    """Tokens in the prefix: image tokens (+ special tokens) per camera, the task, the state."""
    length = sum(sizes.image_tokens(hw) + special_tokens_per_camera for hw in image_hws) + task_tokens + 1
    return max(length, padded_to)


def chunk_flops(sizes: SmolVLASizes, image_hws: Sequence[tuple[int, int]], task_tokens: int,
                keep: Sequence[bool] | None = None, special_tokens_per_camera: int = 0,
                padded_to: int = -1) -> ChunkFlops:
    length = prefix_length(sizes, image_hws, task_tokens, special_tokens_per_camera, padded_to)
    return ChunkFlops(tuple(sizes.vision_flops(hw) for hw in image_hws), sizes.prefix_flops(length, keep),
                      sizes.expert_step_flops(length), sizes.num_steps)


def keep_mask(num_vlm_layers: int, keep_fraction: float) -> list[bool]:
    """A route over the ``num_vlm_layers`` VLM layers as the SmolVLA student routes them: the last
    layer only gives keys/values (its output feeds nothing), so the first L - 1 layers are routed
    and ``k = max(1, round(kappa x (L - 1)))`` of them run (Python's round, as everywhere in the
    project). They are spread evenly from the first: with random weights there is no trained
    router, and the cost depends only on how many run. The last entry is True (keys/values only)."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep fraction must be in (0, 1], got {keep_fraction!r}")
    routed = num_vlm_layers - 1
    if routed < 1:
        return [True] * num_vlm_layers
    kept = max(1, round(keep_fraction * routed))
    chosen = {math.floor(i * routed / kept) for i in range(kept)}
    return [i in chosen for i in range(routed)] + [True]


# ---------------------------------------------------------------- running it, a part at a time
def run_prefix_routed(model: SmolVLAModel, prefix: Prefix, keep: Sequence[bool] | None = None) -> PrefixCache:
    """``SmolVLAModel.run_prefix`` with VLM layers skipped where ``keep`` is False: a skipped layer's
    input passes through, and its keys/values (which the paired expert layer reads) are projected
    from that input. All kept: exactly ``run_prefix``."""
    keep = [True] * model.num_vlm_layers if keep is None else list(keep)
    if len(keep) != model.num_vlm_layers:
        raise ValueError(f"keep mask has {len(keep)} entries, the model has {model.num_vlm_layers} VLM layers")
    context = prefix.context(model.head_dim)
    hidden, layers = prefix.embeddings, []
    last = model.num_vlm_layers - 1
    for index, kept in enumerate(keep):
        output, kv = model.vlm_layer(index, hidden, context, need_output=bool(kept) and index < last)
        if output is not None:
            hidden = output
        layers.append(kv)
    return PrefixCache(layers, [model.project_cross_kv(i, kv) for i, kv in enumerate(layers)], prefix.pad_masks)


@torch.inference_mode()
def timed_chunk(model: SmolVLAModel, pixels: Sequence[Tensor], lang_tokens: Tensor, state: Tensor,
                keep: Sequence[bool] | None, noise: Tensor, image_tokens: Sequence[Tensor] | None = None
                ) -> dict[str, float]:
    """One chunk, batch 1, each part behind a clock read (a device sync on a GPU). Returns
    milliseconds of vision (all cameras), prefix (embedding, text layers, cross k/v), expert (all
    denoising steps), the image tokens and the actions. ``image_tokens`` given: the vision tower
    is not run again (its cost does not depend on the route) and vision_ms is None."""
    device = state.device

    def mark() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    t0 = mark()
    tokens = list(image_tokens) if image_tokens is not None else [model.embed_image(p) for p in pixels]
    t1 = mark()
    # embed_prefix runs the vision tower itself; hand it the tokens just timed instead (an instance
    # attribute shadows the method for this call only), so the prefix time holds no vision work.
    queue = iter(tokens)
    model.embed_image = lambda _pixels: next(queue)
    try:
        masks = [torch.ones(state.shape[0], dtype=torch.bool, device=device) for _ in pixels]
        prefix = model.embed_prefix(list(pixels), masks, lang_tokens, torch.ones_like(lang_tokens, dtype=torch.bool),
                                    state)
    finally:
        del model.embed_image
    cache = run_prefix_routed(model, prefix, keep)
    t2 = mark()
    steps = model.config.num_steps
    dt = -1.0 / steps
    context = model.suffix_context(cache, model.config.chunk_size)
    x_t = noise
    for step in range(steps):
        time_value = torch.full((noise.shape[0],), 1.0 + step * dt, dtype=torch.float32, device=device)
        x_t = x_t + dt * model.denoise_step(x_t, time_value, cache, context)
    t3 = mark()
    return {"vision_ms": None if image_tokens is not None else (t1 - t0) * 1e3, "prefix_ms": (t2 - t1) * 1e3,
            "expert_ms": (t3 - t2) * 1e3, "image_tokens": tokens, "actions": x_t}


def bench_keep_fractions(model: SmolVLAModel, keep_fractions: Sequence[float] = (1.0, 0.75, 0.5, 0.25),
                         task_tokens: int = 16, iters: int = 2, warmup: int = 1, seed: int = 0,
                         device: str | torch.device = "cpu") -> dict:
    """FLOPs (from ``SmolVLASizes``) and median measured time of vision, prefix and expert for one
    chunk at batch 1, per keep fraction, the keep masks applied through the per-layer API."""
    device = torch.device(device)
    model = model.to(device)
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    image_hws = [tuple(f.shape[1:]) for f in config.image_features.values()]
    pixels = [(torch.rand(1, 3, *hw, generator=generator) * 2 - 1).to(device) for hw in image_hws]
    if config.resize_imgs_with_padding is not None:
        width, height = config.resize_imgs_with_padding
        pixels = [torch.nn.functional.interpolate(p, size=(height, width), mode="bilinear") for p in pixels]
    vocab = model.vlm.config.text_config.vocab_size
    lang_tokens = torch.randint(0, vocab, (1, task_tokens), generator=generator).to(device)
    state = torch.zeros(1, config.max_state_dim, device=device)
    noise = torch.randn(1, config.chunk_size, config.max_action_dim, generator=generator).to(device)
    sizes = SmolVLASizes.of(model)
    length = prefix_length(sizes, image_hws, task_tokens, padded_to=config.prefix_length)
    if config.add_image_special_tokens:
        length = prefix_length(sizes, image_hws, task_tokens, 3, config.prefix_length)
    full = chunk_flops(sizes, image_hws, task_tokens, None, 3 if config.add_image_special_tokens else 0,
                       config.prefix_length)
    masks = [keep_mask(model.num_vlm_layers, fraction) for fraction in keep_fractions]

    def one_round() -> list[dict]:
        """Every keep fraction once (interleaved, so that drifts in machine load hit all alike); the
        vision tower once per round, its tokens shared: its cost does not depend on the route."""
        first = timed_chunk(model, pixels, lang_tokens, state, masks[0], noise)
        rest = [timed_chunk(model, pixels, lang_tokens, state, keep, noise, first["image_tokens"])
                for keep in masks[1:]]
        return [first] + [{**r, "vision_ms": first["vision_ms"]} for r in rest]

    for _ in range(warmup):
        one_round()
    samples = [[] for _ in masks]
    for _ in range(iters):
        for index, sample in enumerate(one_round()):
            samples[index].append(sample)
    rows = []
    for fraction, keep, taken in zip(keep_fractions, masks, samples):
        flops = chunk_flops(sizes, image_hws, task_tokens, keep, 3 if config.add_image_special_tokens else 0,
                            config.prefix_length)
        parts = ("vision_ms", "prefix_ms", "expert_ms")
        ms = {k: statistics.median(s[k] for s in taken) for k in parts}
        # The fastest of the rounds too: on a shared machine the least disturbed one.
        fastest = {f"{k[:-3]}_min_ms": min(s[k] for s in taken) for k in parts}
        total_ms = ms["vision_ms"] + ms["prefix_ms"] + ms["expert_ms"]
        rows.append({
            "keep_fraction": fraction, "routed_layers_run": sum(keep[:-1]),
            "kept_layers": [i for i, k in enumerate(keep[:-1]) if k],
            "vision_gflops": round(flops.vision / 1e9, 3), "prefix_gflops": round(flops.prefix / 1e9, 3),
            "expert_gflops": round(flops.expert / 1e9, 3),
            "expert_step_gflops": round(flops.expert_step / 1e9, 3), "total_gflops": round(flops.total / 1e9, 3),
            "flops_fraction": round(flops.total / full.total, 4),
            "prefix_flops_fraction": round(flops.prefix / full.prefix, 4),
            **{k: round(v, 1) for k, v in ms.items()}, "total_ms": round(total_ms, 1),
            **{k: round(v, 1) for k, v in fastest.items()}, "total_min_ms": round(sum(fastest.values()), 1),
            "expert_step_ms": round(ms["expert_ms"] / config.num_steps, 1),
        })
    base = rows[0]["total_ms"] if rows and keep_fractions[0] == 1.0 else None
    for row in rows:
        row["end_to_end_speedup"] = round(base / row["total_ms"], 3) if base else None
    return {
        "family": "smolvla", "device": str(device), "dtype": "float32", "torch_threads": torch.get_num_threads(),
        "num_cameras": len(image_hws), "image_hw": [list(hw) for hw in image_hws],
        "resized_to": list(reversed(config.resize_imgs_with_padding)) if config.resize_imgs_with_padding else None,
        "image_tokens_per_camera": [sizes.image_tokens(hw) for hw in image_hws], "task_tokens": task_tokens,
        "prefix_length": length, "num_vlm_layers": model.num_vlm_layers,
        "routed_layers": model.num_vlm_layers - 1,  # the last one only gives keys/values
        "expert_layers": sum(e is not None for e in sizes.expert_index), "width": sizes.width,
        "expert_width": sizes.expert_width, "num_steps": config.num_steps, "chunk_size": config.chunk_size,
        "parameters_m": round(sum(p.numel() for n, p in model.named_parameters()) / 1e6, 1),
        "skipped_layer_kv": "projected from the skipped layer's input (one norm, two projections)",
        "iters": iters, "warmup": warmup, "vision": "measured once per round (the route does not change it)",
        "by_keep_fraction": rows,
    }
