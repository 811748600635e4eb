"""ActDistill on a LeRobot pi0 / pi0.5: the project's router over the PaliGemma decoder's layers.

The student is the pi0 itself (a copy of the teacher's weights) plus a
:class:`~actdistill_ros.policies.actdistill.LayerRouter` reading the embedded prefix (image and
prompt tokens) once per chunk; the class, the student directory, its loader and the distillation
driver are SmolVLA's (``RoutedFlowStudent``, routing_smolvla / distill_smolvla), with this module's
per-layer functions (docs/METHOD.md, "pi0 and pi0.5 students").

What is routed. The last VLM layer never computes its output (the expert reads only its
keys/values), so the router gates the first L - 1 layers. Every expert layer i attends jointly over
VLM layer i's keys/values and its own, in every denoising step, so a skipped VLM layer still owes
expert layer i keys/values; the three ways (``kv_mode``) are SmolVLA's:

- ``project`` (chosen, measured in METHOD.md): the skipped layer's input norm and k/v projections
  of the hidden state it would have received (which passes through unchanged);
- ``reuse``: the previous layer's keys/values (projected when layer 0 is skipped);
- ``skip_expert``: expert layer i is skipped too (identity on the suffix) in every step.

Training runs every layer with the gates applied residually (``gated_prefix``); inference runs a
layer only for the rows whose route includes it.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from actdistill_ros.policies.flow_family import FamilyHooks
from actdistill_ros.policies.pi0.modeling_pi0 import (LEROBOT_PREFIXES, TIED_EMBEDDING, UNUSED, PI0Model, Prefix,
                                                      PrefixCache, PrefixContext, Rotary, SuffixContext)
from actdistill_ros.policies.pi0.policy_pi0 import PI0Policy
from actdistill_ros.policies.smolvla.routing_smolvla import (KV_PROJECT, RoutedFlowStudent, RoutedPolicyMixin, _rows,
                                                            route_layers)


class RoutedPI0(RoutedFlowStudent):
    """A PI0Model (pi0 or pi0.5) plus a router over its first L - 1 VLM layers."""


class RoutedPI0Policy(RoutedPolicyMixin, PI0Policy):
    """A pi0 / pi0.5 student: LeRobot's pre/post-processing around a :class:`RoutedPI0`."""


def _context_rows(context: PrefixContext, rows: Tensor) -> PrefixContext:
    """The batch rows ``rows`` of a prefix context (its mask and rotary angles)."""
    rotary = Rotary(_rows(context.rotary.cos, rows), _rows(context.rotary.sin, rows))
    return PrefixContext(_rows(context.mask, rows), rotary)


# ---- the functions, usable on a teacher's PI0Model too -----------------------------------------
def gated_prefix(model: PI0Model, prefix: Prefix, masks: Tensor | None) -> tuple[PrefixCache, list[Tensor]]:
    """Every VLM layer computed, routed layer i gated residually h <- h + m_i (F_i(h) - h); keys/values
    of every layer from its input (project mode). Returns the cache and the hidden state after each
    routed layer; ``masks`` None is the teacher's prefix."""
    context = prefix.context(model.sizes.vlm.head_dim)
    hidden, layers, hiddens = prefix.embeddings, [], []
    last = model.num_vlm_layers - 1
    for index in range(model.num_vlm_layers):
        output, kv = model.vlm_layer(index, hidden, context, need_output=index < last)
        layers.append(kv)
        if index < last:
            gate = None if masks is None else masks[:, index, None, None].to(hidden.dtype)
            hidden = output if gate is None else hidden + gate * (output - hidden)
            hiddens.append(hidden)
    return PrefixCache(layers, prefix.pad_masks, prefix.state), hiddens


def routed_prefix(model: PI0Model, prefix: Prefix, plan: list[list[bool]] | None, kv_mode: str = KV_PROJECT
                  ) -> tuple[PrefixCache, list[list[bool]] | None]:
    """The prefix cache with routed layer i run only for the rows whose ``plan[row][i]`` is True
    (None: every layer, ``PI0Model.run_prefix``); and, for ``skip_expert``, which rows skip which
    expert layer (None otherwise)."""
    if plan is None:
        return model.run_prefix(prefix), None
    layers, expert_skip = route_layers(model, prefix.embeddings, prefix.context(model.sizes.vlm.head_dim), plan,
                                       kv_mode, _context_rows)
    return PrefixCache(layers, prefix.pad_masks, prefix.state), expert_skip


def routed_denoise_step(model: PI0Model, noisy_actions: Tensor, time: Tensor, cache: PrefixCache,
                        context: SuffixContext, expert_skip: list[list[bool]] | None) -> Tensor:
    """``PI0Model.denoise_step`` with expert layer i the identity for the rows in
    ``expert_skip[row][i]`` (``skip_expert``); None is exactly the teacher's step. ``context`` None
    is made from the cache."""
    if expert_skip is None:
        return model.denoise_step(noisy_actions, time, cache, context)
    if context is None:
        context = model.suffix_context(cache)
    hidden, cond = model.embed_suffix(noisy_actions, time, context)
    batch = hidden.shape[0]
    for index in range(model.sizes.expert.depth):
        skipping = [b for b in range(batch) if expert_skip[b][index]]
        if len(skipping) == batch:
            continue
        output = model.expert_layer(index, hidden, cache, context, cond)
        if skipping:
            keep = torch.tensor([not expert_skip[b][index] for b in range(batch)], device=hidden.device)
            output = torch.where(keep[:, None, None], output, hidden)
        hidden = output
    hidden, _ = model.expert.norm(hidden, cond)
    return model.action_out_proj(hidden[:, -model.config.chunk_size:].to(torch.float32))


def sample_routed(model: PI0Model, prefix: Prefix, noise: Tensor, plan: list[list[bool]] | None,
                  kv_mode: str = KV_PROJECT) -> Tensor:
    cache, expert_skip = routed_prefix(model, prefix, plan, kv_mode)
    return integrate(model, cache, noise, expert_skip)


def integrate(model: PI0Model, cache: PrefixCache, noise: Tensor, expert_skip: list[list[bool]] | None) -> Tensor:
    """The expert's Euler steps from the start noise over a (routed) prefix cache (PI0Model.sample_actions')."""
    if expert_skip is None:
        return model.sample_actions(None, noise, cache=cache)
    context = model.suffix_context(cache)
    steps = model.config.num_inference_steps
    dt = -1.0 / steps
    x_t = noise
    for step in range(steps):
        time = torch.tensor(1.0 + step * dt, dtype=torch.float32, device=noise.device).expand(noise.shape[0])
        x_t = x_t + dt * routed_denoise_step(model, x_t, time, cache, context, expert_skip)
    return x_t


# ---- distillation: what stays frozen, what is written --------------------------------------------
def freeze_prefix_embedding(model: PI0Model) -> None:
    """The parts that embed the prefix stay the teacher's (SigLIP, the projector, the token
    embedding), so teacher and student share one prefix embedding per step. pi0's state token is
    the expert's (suffix_context) and trains with it."""
    for module in (model.vision_tower, model.projector, model.vlm.embed_tokens):
        module.requires_grad_(False)


def lerobot_state(model: PI0Model, teacher_file=None) -> dict[str, Tensor]:
    """The model's weights under LeRobot's PI0Policy / PI05Policy names, in the dtypes the teacher's
    file stores them in; the token embedding as its tied lm_head (the one name LeRobot saves), and
    the tensors LeRobot saves that are never used here carried over from the teacher's file."""
    from safetensors.torch import load_file

    stored = load_file(str(teacher_file)) if teacher_file is not None else {}
    own = model.state_dict()
    if not any(k.startswith("vision_tower.vision_model.") for k in own):  # transformers 5 drops that level
        own = {(k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k): v
               for k, v in own.items()}
    inverse = [(new, old) for old, new in LEROBOT_PREFIXES]
    out: dict[str, Tensor] = {}
    for name, tensor in own.items():
        lerobot = TIED_EMBEDDING if name == "vlm.embed_tokens.weight" else next(
            old + name[len(new):] for new, old in inverse if name.startswith(new))
        dtype = stored[lerobot].dtype if lerobot in stored else tensor.dtype
        out[lerobot] = tensor.detach().to("cpu", dtype).contiguous().clone()
    for name in UNUSED:
        if name in stored:
            out[name] = stored[name].contiguous()
    return out


def _vlm_dir(policy: PI0Policy, vlm_processor):
    """The PaliGemma tokenizer's directory (pi0 needs no VLM config: sizes come from the tensors)."""
    from actdistill_ros.policies.lerobot_processor import resolve_vlm_dir

    name = policy.preprocessor.tokenizer.tokenizer_name or "google/paligemma-3b-pt-224"
    return resolve_vlm_dir(name, vlm_processor, need_config=False)


def _route_costs(model, prefix, images):
    from actdistill_ros.policies.pi0.compute_pi0 import PI0RouteCosts
    return PI0RouteCosts(model, prefix, images)


def _bench(model, keep_fractions, iters, warmup, device):
    from actdistill_ros.policies.pi0.compute_pi0 import bench_keep_fractions
    return bench_keep_fractions(model, keep_fractions, iters=iters, warmup=warmup, device=device)


RoutedPI0.ops = SimpleNamespace(gated_prefix=gated_prefix, routed_prefix=routed_prefix,
                                routed_denoise_step=routed_denoise_step, sample_routed=sample_routed,
                                integrate=integrate)
HOOKS = FamilyHooks(policy=PI0Policy, routed=RoutedPI0, routed_policy=RoutedPI0Policy, gated_prefix=gated_prefix,
                    freeze_prefix_embedding=freeze_prefix_embedding, lerobot_state=lerobot_state, vlm_dir=_vlm_dir,
                    image_size=lambda config: int(config.image_resolution[0]), route_costs=_route_costs,
                    bench_keep_fractions=_bench)
