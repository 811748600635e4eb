"""What one pi0 / pi0.5 action chunk costs, by part: the SigLIP tower per camera (LeRobot runs it on
a missing camera's placeholder too), the PaliGemma prefix once per chunk (with the suffix's
once-per-chunk state token of pi0), and every denoising step of the expert.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on what runs (matrix products:
linear layers, the patch convolution, attention scores and weighted sums; norms, softmax and
activations are left out), once per piece, so that the cost of any route under any ``kv_mode``
is a sum (:class:`PI0RouteCosts`, checked against :func:`chunk_flops`, a count of the routed run
itself, in test/test_pi0_distill.py). Every routed layer counts: a run VLM layer at its full
cost, a skipped one at its keys/values (``project``), nothing (``reuse``) or with its paired expert
layer gone from every step (``skip_expert``).
"""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch
from torch import Tensor

from actdistill_ros.policies.pi0.modeling_pi0 import PI0Model, Prefix
from actdistill_ros.policies.pi0.routing_pi0 import routed_denoise_step, routed_prefix
from actdistill_ros.policies.smolvla.compute_smolvla import keep_mask
from actdistill_ros.policies.smolvla.routing_smolvla import KV_PROJECT, KV_REUSE, KV_SKIP_EXPERT


def _counted(fn) -> tuple[float, object]:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        result = fn()
    return float(counter.get_total_flops()), result


def _zero_noise(model: PI0Model, device) -> tuple[Tensor, Tensor]:
    noise = torch.zeros(1, model.config.chunk_size, model.config.max_action_dim, device=device)
    return noise, torch.ones(1, device=device)


def chunk_flops(model: PI0Model, prefix: Prefix, images: Sequence[Tensor], plan: list[bool] | None,
                kv_mode: str = KV_PROJECT) -> dict[str, float]:
    """FLOPs of one chunk for ONE observation, counted on the routed run itself (``plan`` over the
    L - 1 routed layers, None for every layer)."""
    if prefix.embeddings.shape[0] != 1:
        raise ValueError("chunk_flops counts one observation: pass a prefix of batch 1")
    vision = [_counted(lambda image=image: model.embed_image(image))[0] for image in images]

    def prefix_and_context():
        cache, skip = routed_prefix(model, prefix, None if plan is None else [list(plan)], kv_mode)
        return cache, skip, model.suffix_context(cache)

    prefix_flops, (cache, expert_skip, context) = _counted(prefix_and_context)
    noise, t = _zero_noise(model, prefix.embeddings.device)
    step, _ = _counted(lambda: routed_denoise_step(model, noise, t, cache, context, expert_skip))
    steps = model.config.num_inference_steps
    return {"vision_per_camera": vision, "vision": sum(vision), "prefix": prefix_flops, "expert_per_step": step,
            "steps": steps, "expert": step * steps, "total": sum(vision) + prefix_flops + step * steps}


class PI0RouteCosts:
    """FLOPs of each piece of one chunk, counted once for one observation: the vision tower per
    camera; per VLM layer its full run and its keys/values alone; what is made once per chunk
    (rotary angles, pi0's state token); per denoising step the suffix embedding, final norm and
    output head plus each expert layer. ``total(plan, kv_mode)`` equals :func:`chunk_flops`."""

    def __init__(self, model: PI0Model, prefix: Prefix, images: Sequence[Tensor]):
        if prefix.embeddings.shape[0] != 1:
            raise ValueError("PI0RouteCosts counts one observation: pass a prefix of batch 1")
        self.num_vlm_layers, self.steps = model.num_vlm_layers, model.config.num_inference_steps
        self.vision = [_counted(lambda image=image: model.embed_image(image))[0] for image in images]
        prefix_context, context = _counted(lambda: prefix.context(model.sizes.vlm.head_dim))  # rotary angles
        with torch.no_grad():
            cache = model.run_prefix(prefix)
        hidden = prefix.embeddings
        self.full = [_counted(lambda i=i: model.vlm_layer(i, hidden, context))[0] for i in range(self.num_vlm_layers)]
        self.kv = [_counted(lambda i=i: model.vlm_layer(i, hidden, context, need_output=False))[0]
                   for i in range(self.num_vlm_layers)]
        suffix_flops, suffix_context = _counted(lambda: model.suffix_context(cache))
        self.context = prefix_context + suffix_flops  # once per chunk: both stacks' rotary angles, pi0's state token
        noise, t = _zero_noise(model, hidden.device)
        with torch.no_grad():
            suffix, cond = model.embed_suffix(noise, t, suffix_context)
        self.expert = [_counted(lambda i=i: model.expert_layer(i, suffix, cache, suffix_context, cond))[0]
                       for i in range(self.num_vlm_layers)]
        self.step_base = _counted(lambda: model.denoise_step(noise, t, cache, suffix_context))[0] - sum(self.expert)

    def total(self, plan: list[bool] | None, kv_mode: str = KV_PROJECT) -> dict[str, float]:
        last = self.num_vlm_layers - 1
        plan = [True] * last if plan is None else list(plan)
        if len(plan) != last:
            raise ValueError(f"route: expected {last} layer decisions, got {len(plan)}")
        prefix, expert_layers = self.kv[last] + self.context, self.expert[last]
        for index, runs in enumerate(plan):
            if runs:
                prefix += self.full[index]
            elif kv_mode == KV_PROJECT or (kv_mode == KV_REUSE and index == 0):
                prefix += self.kv[index]
            if runs or kv_mode != KV_SKIP_EXPERT:
                expert_layers += self.expert[index]
        step = self.step_base + expert_layers
        vision = sum(self.vision)
        return {"vision_per_camera": list(self.vision), "vision": vision, "prefix": prefix, "expert_per_step": step,
                "steps": self.steps, "expert": step * self.steps, "total": vision + prefix + step * self.steps}


def random_observation(model: PI0Model, device, seed: int = 0) -> tuple[Prefix, list[Tensor]]:
    """A prefix of batch 1 from random pixels (each camera at the model's image resolution, as
    LeRobot resizes them) and a full-length random prompt, and the camera images."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    size = config.image_resolution[0]
    images = [(torch.rand(1, 3, size, size, generator=generator) * 2 - 1).to(device) for _ in config.image_features]
    masks = [torch.ones(1, dtype=torch.bool, device=device) for _ in images]
    tokens = torch.randint(0, model.sizes.vocab, (1, config.tokenizer_max_length), generator=generator).to(device)
    state = None if config.is_pi05 else torch.zeros(1, config.max_state_dim, device=device)
    with torch.no_grad():
        prefix = model.embed_prefix(images, masks, tokens, torch.ones_like(tokens, dtype=torch.bool), state)
    return prefix, images


@torch.inference_mode()
def bench_keep_fractions(model: PI0Model, keep_fractions: Sequence[float] = (1.0, 0.75, 0.5, 0.25), iters: int = 2,
                         warmup: int = 1, device: str | torch.device = "cpu", kv_mode: str = KV_PROJECT) -> dict:
    """Counted FLOPs and median measured time of vision, prefix and expert for one chunk at batch 1,
    per keep fraction (the routed layers spread evenly, as compute_smolvla.keep_mask spreads them)."""
    device = torch.device(device)
    model = model.to(device).eval()
    prefix, images = random_observation(model, device)
    costs = PI0RouteCosts(model, prefix, images)
    full = costs.total(None)
    noise = torch.randn(1, model.config.chunk_size, model.config.max_action_dim,
                        generator=torch.Generator().manual_seed(1)).to(device)
    plans = [keep_mask(model.num_vlm_layers, fraction)[:-1] for fraction in keep_fractions]
    steps = model.config.num_inference_steps

    def mark() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def one_chunk(plan: list[bool], with_vision: bool) -> dict[str, float]:
        t0 = mark()
        if with_vision:
            for image in images:
                model.embed_image(image)
        t1 = mark()
        cache, expert_skip = routed_prefix(model, prefix, [plan], kv_mode)
        context = model.suffix_context(cache)
        t2 = mark()
        x_t, dt = noise, -1.0 / steps
        for step in range(steps):
            t = torch.full((1,), 1.0 + step * dt, dtype=torch.float32, device=device)
            x_t = x_t + dt * routed_denoise_step(model, x_t, t, cache, context, expert_skip)
        t3 = mark()
        return {"vision_ms": (t1 - t0) * 1e3, "prefix_ms": (t2 - t1) * 1e3, "expert_ms": (t3 - t2) * 1e3}

    def one_round() -> list[dict]:  # interleaved; the vision tower once per round (the route does not change it)
        first = one_chunk(plans[0], True)
        return [first] + [{**one_chunk(plan, False), "vision_ms": first["vision_ms"]} for plan in plans[1:]]

    for _ in range(warmup):
        one_round()
    samples = [[] for _ in plans]
    for _ in range(iters):
        for index, sample in enumerate(one_round()):
            samples[index].append(sample)
    rows = []
    for fraction, plan, taken in zip(keep_fractions, plans, samples):
        flops = costs.total(plan, kv_mode)
        ms = {k: statistics.median(s[k] for s in taken) for k in ("vision_ms", "prefix_ms", "expert_ms")}
        rows.append({
            "keep_fraction": fraction, "routed_layers_run": sum(plan),
            "kept_layers": [i for i, k in enumerate(plan) if k],
            "vision_gflops": round(flops["vision"] / 1e9, 4), "prefix_gflops": round(flops["prefix"] / 1e9, 4),
            "expert_gflops": round(flops["expert"] / 1e9, 4),
            "expert_step_gflops": round(flops["expert_per_step"] / 1e9, 4),
            "total_gflops": round(flops["total"] / 1e9, 4), "flops_fraction": round(flops["total"] / full["total"], 4),
            "prefix_flops_fraction": round(flops["prefix"] / full["prefix"], 4),
            **{k: round(v, 2) for k, v in ms.items()}, "total_ms": round(sum(ms.values()), 2),
        })
    base = rows[0]["total_ms"] if rows and keep_fractions[0] == 1.0 else None
    for row in rows:
        row["end_to_end_speedup"] = round(base / row["total_ms"], 3) if base else None
    return {
        "family": "pi0", "variant": model.config.variant, "device": str(device), "dtype": "float32",
        "torch_threads": torch.get_num_threads(), "num_cameras": len(images),
        "image_size": model.config.image_resolution[0], "prefix_length": prefix.embeddings.shape[1],
        "num_vlm_layers": model.num_vlm_layers, "routed_layers": model.num_vlm_layers - 1,
        "width": model.sizes.vlm.width, "expert_width": model.sizes.expert.width,
        "num_steps": steps, "chunk_size": model.config.chunk_size, "kv_mode": kv_mode,
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "iters": iters, "warmup": warmup, "by_keep_fraction": rows,
    }
