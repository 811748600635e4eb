"""pi0 and pi0.5 (LeRobot's ports of openpi's flow-matching VLAs), without lerobot.

Layout, as LeRobot 0.4.4 computes it with openpi's patched transformers (every detail is theirs, so
that the actions match):

    prefix (PaliGemma) = per camera: SigLIP tokens -> linear projector (no 1/sqrt(width) scaling),
                         then the task tokens * sqrt(width); all bidirectional among valid tokens
    suffix (expert)    = pi0:   one state token (state_proj) then chunk_size action tokens
                                MLP(action_in_proj(x_t) ++ sinusoid(t))
                         pi0.5: chunk_size action tokens action_in_proj(x_t); the timestep enters
                                every expert norm through adaptive RMS norms, and the state is
                                written into the prompt (processor_pi0)

- Gemma layers (both stacks): RMSNorm scaled by (1 + weight), grouped-query attention with
  rotary positions (wavelength 10000, rotate-half), a tanh-GELU gated MLP. No sqrt(width) on the
  embeddings inside the stack (openpi removed it). pi0.5's expert norms have no weight: a dense
  layer of the condition gives scale, shift and a gate that multiplies the residual branch.
- The prefix runs once per chunk; each VLM layer's keys (rotated) and values are cached. Expert
  layer i attends jointly over VLM layer i's cached keys/values and its own (positions continue
  after the prefix's valid tokens). The state token (pi0) sees the prefix and itself; action tokens
  see the prefix, the state and each other (not causal). Nothing in the prefix sees the suffix.
- Sampling: x_1 = noise, num_inference_steps Euler steps, dt = -1/N from t = 1; x <- x + dt * v(x, t).

The Gemma layers are this module's own (transformers' Gemma has neither the adaptive norms nor the
embedding scale removed); SigLIP is transformers' own SiglipVisionModel. Per-layer execution is
public (``vlm_layer``, ``expert_layer``) so that a router can skip VLM layers: ``run_prefix`` and
``denoise_step`` are nothing but those calls in order, and a skipped VLM layer can still hand the
expert its keys/values (``vlm_layer(..., need_output=False)``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from actdistill_ros.policies.observation import LANGUAGE, VISUAL
from actdistill_ros.policies.pi0.configuration_pi0 import PI0Config, PI0ConfigError
from actdistill_ros.policies.smolvla.modeling_smolvla import (LayerKV, WeightsMismatch, attend, make_att_2d_masks,
                                                              sinusoidal_time_embedding)

ROPE_BASE = 10_000.0
RMS_EPS = 1e-6  # Gemma's rms_norm_eps, the same in both stacks
# LeRobot's PaliGemma config: SigLIP So400m's heads and layer-norm eps (not visible in tensor shapes).
SIGLIP_HEADS = 16
SIGLIP_EPS = 1e-6
# The Gemma variants LeRobot offers are multi-query (one key/value head); head_dim and the head
# count then follow from the k/q projection shapes, for published and shrunk checkpoints alike.
NUM_KV_HEADS = 1
ROOT = "model.paligemma_with_expert."
# model.safetensors names (LeRobot's module tree) -> this module's names, first match wins.
LEROBOT_PREFIXES = ((ROOT + "paligemma.model.vision_tower.", "vision_tower."),
                    (ROOT + "paligemma.model.multi_modal_projector.linear.", "projector."),
                    (ROOT + "paligemma.model.language_model.", "vlm."),
                    (ROOT + "gemma_expert.model.", "expert."), ("model.", ""))
TIED_EMBEDDING = ROOT + "paligemma.lm_head.weight"  # = the VLM's embed_tokens (tied; only this name is saved)
UNUSED = (ROOT + "gemma_expert.lm_head.weight",  # the expert never decodes tokens
          ROOT + "paligemma.model.language_model.norm.weight")  # the prefix's final norm: its output is unused


@dataclass(frozen=True)
class GemmaSizes:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class PI0Sizes:
    vocab: int
    vlm: GemmaSizes
    expert: GemmaSizes
    vision_width: int
    vision_depth: int
    vision_mlp_dim: int
    patch_size: int
    image_size: int


def _count_layers(names: set[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for n in names if (m := pattern.match(n))}
    return max(found) + 1 if found else 0


def _gemma_sizes(tensors: dict[str, Tensor], prefix: str, what: str, source: str) -> GemmaSizes:
    names = set(tensors)
    depth = _count_layers(names, prefix + "layers.")
    try:
        q = tensors[f"{prefix}layers.0.self_attn.q_proj.weight"]
        k = tensors[f"{prefix}layers.0.self_attn.k_proj.weight"]
        mlp = tensors[f"{prefix}layers.0.mlp.gate_proj.weight"]
    except KeyError as err:
        raise WeightsMismatch(f"{source}: no tensor {err.args[0]!r} (the {what} of a LeRobot pi0 checkpoint)") from None
    head_dim = k.shape[0] // NUM_KV_HEADS
    if q.shape[0] % head_dim:
        raise WeightsMismatch(f"{source}: {what} q_proj has {q.shape[0]} rows, not a multiple of head_dim {head_dim}")
    return GemmaSizes(width=q.shape[1], depth=depth, mlp_dim=mlp.shape[0], num_heads=q.shape[0] // head_dim,
                      num_kv_heads=NUM_KV_HEADS, head_dim=head_dim)


def infer_sizes(tensors: dict[str, Tensor], config: PI0Config, source: str) -> PI0Sizes:
    """Every size from the tensor shapes: config.json names a Gemma variant, and a checkpoint whose
    variants were shrunk still carries the published names."""
    if TIED_EMBEDDING not in tensors:
        raise WeightsMismatch(f"{source}: no tensor {TIED_EMBEDDING!r} (PaliGemma's tied token embedding)")
    vocab, width = tensors[TIED_EMBEDDING].shape
    vlm = _gemma_sizes(tensors, ROOT + "paligemma.model.language_model.", "PaliGemma language model", source)
    expert = _gemma_sizes(tensors, ROOT + "gemma_expert.model.", "action expert", source)
    if (vlm.head_dim, vlm.depth) != (expert.head_dim, expert.depth) or vlm.width != width:
        raise WeightsMismatch(f"{source}: the expert (head_dim {expert.head_dim}, {expert.depth} layers) must match "
                              f"the VLM (head_dim {vlm.head_dim}, {vlm.depth} layers) it attends jointly with")
    vision = ROOT + "paligemma.model.vision_tower.vision_model."
    try:
        patch = tensors[vision + "embeddings.patch_embedding.weight"]
        positions = tensors[vision + "embeddings.position_embedding.weight"].shape[0]
        fc1 = tensors[vision + "encoder.layers.0.mlp.fc1.weight"]
    except KeyError as err:
        raise WeightsMismatch(f"{source}: no tensor {err.args[0]!r} (the SigLIP vision tower)") from None
    per_side = math.isqrt(positions)
    image_size = per_side * patch.shape[2]
    if per_side * per_side != positions or image_size != config.image_resolution[0]:
        raise PI0ConfigError(f"{config.source}: image_resolution {list(config.image_resolution)} does not match the "
                             f"vision tower in {source} ({positions} positions of {patch.shape[2]}-pixel patches)")
    if patch.shape[0] % SIGLIP_HEADS:
        raise WeightsMismatch(f"{source}: SigLIP width {patch.shape[0]} is not a multiple of its {SIGLIP_HEADS} heads")
    return PI0Sizes(vocab=vocab, vlm=vlm, expert=expert, vision_width=patch.shape[0],
                    vision_depth=_count_layers(set(tensors), vision + "encoder.layers."), vision_mlp_dim=fc1.shape[0],
                    patch_size=patch.shape[2], image_size=image_size)


# ---- Gemma ---------------------------------------------------------------------------------------
class GemmaNorm(nn.Module):
    """RMSNorm scaled by (1 + weight); or, given ``cond_dim`` (pi0.5's expert), adaptive: a dense
    layer of the condition gives scale, shift and the gate of the following residual."""

    def __init__(self, width: int, cond_dim: int | None = None):
        super().__init__()
        if cond_dim is None:
            self.weight = nn.Parameter(torch.zeros(width))
            self.dense = None
        else:
            self.dense = nn.Linear(cond_dim, 3 * width)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        variance = torch.mean(torch.square(x.float()), dim=-1, keepdim=True)
        normed = x * torch.rsqrt(variance + RMS_EPS)
        if self.dense is None:
            return (normed * (1.0 + self.weight.float())).to(x.dtype), None
        if cond is None:
            raise ValueError("an adaptive norm needs its condition (the timestep embedding)")
        scale, shift, gate = torch.chunk(self.dense(cond)[:, None, :], 3, dim=-1)
        return (normed * (1 + scale.float()) + shift.float()).to(x.dtype), gate.to(x.dtype)


def gated_residual(residual: Tensor, branch: Tensor, gate: Tensor | None) -> Tensor:
    return residual + branch if gate is None else residual + branch * gate


class GemmaAttention(nn.Module):
    def __init__(self, sizes: GemmaSizes):
        super().__init__()
        self.sizes = sizes
        self.q_proj = nn.Linear(sizes.width, sizes.num_heads * sizes.head_dim, bias=False)
        self.k_proj = nn.Linear(sizes.width, sizes.num_kv_heads * sizes.head_dim, bias=False)
        self.v_proj = nn.Linear(sizes.width, sizes.num_kv_heads * sizes.head_dim, bias=False)
        self.o_proj = nn.Linear(sizes.num_heads * sizes.head_dim, sizes.width, bias=False)


class GemmaMLP(nn.Module):
    def __init__(self, sizes: GemmaSizes):
        super().__init__()
        self.gate_proj = nn.Linear(sizes.width, sizes.mlp_dim, bias=False)
        self.up_proj = nn.Linear(sizes.width, sizes.mlp_dim, bias=False)
        self.down_proj = nn.Linear(sizes.mlp_dim, sizes.width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaLayer(nn.Module):
    def __init__(self, sizes: GemmaSizes, cond_dim: int | None = None):
        super().__init__()
        self.input_layernorm = GemmaNorm(sizes.width, cond_dim)
        self.self_attn = GemmaAttention(sizes)
        self.post_attention_layernorm = GemmaNorm(sizes.width, cond_dim)
        self.mlp = GemmaMLP(sizes)

    def project(self, hidden: Tensor, rotary: "Rotary", cond: Tensor | None = None,
                need_query: bool = True) -> tuple[Tensor | None, LayerKV, Tensor | None]:
        """Input norm, then queries and keys (rotated) and values, (B, L, heads, head_dim)."""
        attn, head_dim = self.self_attn, self.self_attn.sizes.head_dim
        normed, gate = self.input_layernorm(hidden, cond)
        split = (*normed.shape[:-1], -1, head_dim)
        query = rotary.apply(attn.q_proj(normed).view(split)) if need_query else None
        key = rotary.apply(attn.k_proj(normed).view(split))
        return query, LayerKV(key, attn.v_proj(normed).view(split)), gate

    def finish(self, attention: Tensor, residual: Tensor, gate: Tensor | None, cond: Tensor | None = None) -> Tensor:
        """Output projection + (gated) residual, then the MLP + (gated) residual."""
        hidden = gated_residual(residual, self.self_attn.o_proj(attention), gate)
        normed, gate = self.post_attention_layernorm(hidden, cond)
        return gated_residual(hidden, self.mlp(normed), gate)


class GemmaStack(nn.Module):
    """The layers and final norm of one Gemma (names as in transformers, so the weights load by name)."""

    def __init__(self, sizes: GemmaSizes, cond_dim: int | None = None, vocab: int | None = None,
                 final_norm: bool = True):
        super().__init__()
        self.sizes = sizes
        self.embed_tokens = nn.Embedding(vocab, sizes.width) if vocab else None
        self.layers = nn.ModuleList(GemmaLayer(sizes, cond_dim) for _ in range(sizes.depth))
        self.norm = GemmaNorm(sizes.width, cond_dim) if final_norm else None


@dataclass
class Rotary:
    """cos/sin of Gemma's rotary embedding (transformers' rotate-half form) at positions (B, L)."""

    cos: Tensor  # (B, L, 1, head_dim)
    sin: Tensor

    @classmethod
    def at(cls, positions: Tensor, head_dim: int) -> "Rotary":
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
        inv_freq = 1.0 / (ROPE_BASE ** exponents)
        inv_freq = inv_freq[None, :, None].expand(positions.shape[0], -1, 1)
        freqs = (inv_freq @ positions[:, None, :].float()).transpose(1, 2)
        angles = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return cls(angles.cos(), angles.sin())

    def apply(self, x: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * self.cos.to(x.dtype) + rotated * self.sin.to(x.dtype)


# ---- the prefix and its cache --------------------------------------------------------------------
@dataclass
class Prefix:
    embeddings: Tensor  # (B, P, W)
    pad_masks: Tensor  # (B, P) bool: real tokens
    num_image_tokens: int  # the first positions are image tokens, the rest the prompt
    state: Tensor | None = None  # pi0: the normalised state padded to max_state_dim (the expert's first token)

    @property
    def segments(self) -> tuple[int, ...]:
        """Host-side modality of each position (observation.py's), as a router reads the prefix."""
        length = self.embeddings.shape[1]
        return (VISUAL,) * self.num_image_tokens + (LANGUAGE,) * (length - self.num_image_tokens)

    def context(self, head_dim: int) -> "PrefixContext":
        # Every prefix token starts the same block: bidirectional among valid tokens.
        mask = make_att_2d_masks(self.pad_masks, torch.zeros_like(self.pad_masks))
        return PrefixContext(mask, Rotary.at(torch.cumsum(self.pad_masks, dim=1) - 1, head_dim))


@dataclass
class PrefixContext:
    mask: Tensor  # (B, P, P) bool
    rotary: Rotary


@dataclass
class PrefixCache:
    """What the denoising steps read: each VLM layer's keys/values and the prefix's validity."""

    layers: list[LayerKV]
    pad_masks: Tensor  # (B, P)
    state: Tensor | None = None  # pi0's padded state (B, max_state_dim); None for pi0.5


@dataclass
class SuffixContext:
    """What every denoising step of one chunk shares: the suffix's attention mask over prefix and
    suffix, its rotary positions, and pi0's state token."""

    mask: Tensor  # (B, S, P + S) bool
    rotary: Rotary
    state_token: Tensor | None  # (B, 1, expert width)


def resize_with_pad(images: Tensor, size: int) -> Tensor:
    """(B, 3, h, w) in [0, 1] -> (B, 3, size, size): bilinear resize keeping the aspect ratio (no
    antialiasing), clamped to [-1, 1], then centred with -1 padding (openpi's resize_with_pad_torch;
    pi0 maps [0, 1] to [-1, 1] only afterwards, so the padding ends up at -3, as in LeRobot)."""
    height, width = images.shape[2:]
    ratio = max(width / size, height / size)
    new_height, new_width = int(height / ratio), int(width / ratio)
    resized = F.interpolate(images, size=(new_height, new_width), mode="bilinear", align_corners=False)
    resized = resized.clamp(-1.0, 1.0)
    top, left = (size - new_height) // 2, (size - new_width) // 2
    return F.pad(resized, (left, size - new_width - left, top, size - new_height - top), value=-1.0)


class PI0Model(nn.Module):
    """PaliGemma (SigLIP + Gemma) with a Gemma action expert; pi0 or pi0.5 by ``config.variant``."""

    def __init__(self, config: PI0Config, sizes: PI0Sizes):
        super().__init__()
        from transformers import SiglipVisionConfig, SiglipVisionModel

        self.config, self.sizes = config, sizes
        vision = SiglipVisionConfig(hidden_size=sizes.vision_width, intermediate_size=sizes.vision_mlp_dim,
                                    num_hidden_layers=sizes.vision_depth, num_attention_heads=SIGLIP_HEADS,
                                    image_size=sizes.image_size, patch_size=sizes.patch_size,
                                    layer_norm_eps=SIGLIP_EPS, hidden_act="gelu_pytorch_tanh", vision_use_head=False,
                                    attn_implementation="eager")
        self.vision_tower = SiglipVisionModel(vision)
        self.projector = nn.Linear(sizes.vision_width, sizes.vlm.width)
        self.vlm = GemmaStack(sizes.vlm, vocab=sizes.vocab, final_norm=False)  # the prefix's output is unused
        width = sizes.expert.width
        self.expert = GemmaStack(sizes.expert, cond_dim=width if config.is_pi05 else None)
        self.action_in_proj = nn.Linear(config.max_action_dim, width)
        self.action_out_proj = nn.Linear(width, config.max_action_dim)
        if config.is_pi05:
            self.time_mlp_in, self.time_mlp_out = nn.Linear(width, width), nn.Linear(width, width)
        else:
            self.state_proj = nn.Linear(config.max_state_dim, width)
            self.action_time_mlp_in, self.action_time_mlp_out = nn.Linear(2 * width, width), nn.Linear(width, width)

    @property
    def num_vlm_layers(self) -> int:
        return self.sizes.vlm.depth

    @property
    def width(self) -> int:
        """The VLM's width (what a router over its layers reads)."""
        return self.sizes.vlm.width

    # ---- weights ---------------------------------------------------------------------------------
    def load_lerobot_state(self, tensors: dict[str, Tensor], source: str) -> None:
        """LeRobot's model.safetensors into this module; every tensor must be used and every
        parameter given, with its shape (one line naming the first that is not)."""
        state = {}
        for name, tensor in tensors.items():
            if name in UNUSED:
                continue
            if name == TIED_EMBEDDING:
                state["vlm.embed_tokens.weight"] = tensor
                continue
            target = next((new + name[len(old):] for old, new in LEROBOT_PREFIXES if name.startswith(old)), None)
            state[target or name] = tensor
        own = self.state_dict()
        if not any(k.startswith("vision_tower.vision_model.") for k in own):  # transformers 5 drops that level
            state = {k.replace("vision_tower.vision_model.", "vision_tower.", 1): v for k, v in state.items()}
        unexpected = sorted(set(state) - set(own))
        if unexpected:
            raise WeightsMismatch(f"{source}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all) for a "
                                  f"{self.config.variant} policy")
        missing = sorted(set(own) - set(state))
        if missing:
            raise WeightsMismatch(f"{source}: missing tensor {missing[0]!r} ({len(missing)} in all)")
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise WeightsMismatch(f"{source}: {name} has shape {list(tensor.shape)}, expected "
                                      f"{list(own[name].shape)} (from config.json and the other tensors)")
        self.load_state_dict(state, strict=True)

    # ---- the prefix ------------------------------------------------------------------------------
    def embed_image(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, tokens, VLM width): SigLIP's last hidden state, projected."""
        return self.projector(self.vision_tower(pixel_values=images).last_hidden_state)

    def embed_prefix(self, images: list[Tensor], image_masks: list[Tensor], tokens: Tensor, token_masks: Tensor,
                     state: Tensor | None = None) -> Prefix:
        embeddings, pads = [], []
        for image, mask in zip(images, image_masks):
            embedded = self.embed_image(image)
            embeddings.append(embedded)
            pads.append(mask[:, None].expand(embedded.shape[0], embedded.shape[1]))
        num_image_tokens = sum(e.shape[1] for e in embeddings)
        language = self.vlm.embed_tokens(tokens)
        embeddings.append(language * math.sqrt(language.shape[-1]))
        pads.append(token_masks)
        return Prefix(torch.cat(embeddings, dim=1), torch.cat(pads, dim=1), num_image_tokens, state)

    def vlm_layer(self, index: int, hidden: Tensor, context: PrefixContext,
                  need_output: bool = True) -> tuple[Tensor | None, LayerKV]:
        """VLM layer ``index`` over the prefix: its output (None without ``need_output``: a skipped
        layer only hands the expert its keys/values) and its cached keys/values."""
        layer = self.vlm.layers[index]
        query, kv, _ = layer.project(hidden, context.rotary, need_query=need_output)
        if not need_output:
            return None, kv
        sizes = self.sizes.vlm
        attention = attend(query, kv.key, kv.value, context.mask, sizes.num_heads, sizes.num_kv_heads)
        return layer.finish(attention, hidden, None), kv

    def run_prefix(self, prefix: Prefix, skip: frozenset[int] = frozenset()) -> PrefixCache:
        """All VLM layers in order (a layer in ``skip`` passes its input through and still gives its
        keys/values); the last layer's output is never needed, only its keys/values."""
        context = prefix.context(self.sizes.vlm.head_dim)
        hidden, layers = prefix.embeddings, []
        for index in range(self.num_vlm_layers):
            need = index not in skip and index < self.num_vlm_layers - 1
            output, kv = self.vlm_layer(index, hidden, context, need_output=need)
            layers.append(kv)
            hidden = output if output is not None else hidden
        return PrefixCache(layers, prefix.pad_masks, prefix.state)

    # ---- the suffix ------------------------------------------------------------------------------
    def suffix_context(self, cache: PrefixCache) -> SuffixContext:
        """pi0's suffix is [state, actions]: the state token starts a block (it sees the prefix and
        itself), the actions start the next (they see everything before and each other). pi0.5's is
        the action block alone. Positions continue after the prefix's valid tokens."""
        chunk, pads = self.config.chunk_size, cache.pad_masks
        starts = [True] + [False] * (chunk - 1)
        state_token = None
        if not self.config.is_pi05:
            if cache.state is None:
                raise ValueError("pi0 needs the state (embed_prefix(..., state=...))")
            state_token = self.state_proj(cache.state.to(torch.float32))[:, None, :]
            starts = [True, *starts]
        size, length = pads.shape[0], len(starts)
        suffix_pads = torch.ones(size, length, dtype=torch.bool, device=pads.device)
        blocks = torch.tensor(starts, device=pads.device).expand(size, -1)
        mask = torch.cat([pads[:, None, :].expand(size, length, -1), make_att_2d_masks(suffix_pads, blocks)], dim=2)
        positions = pads.sum(dim=-1)[:, None] + torch.cumsum(suffix_pads, dim=1) - 1
        return SuffixContext(mask, Rotary.at(positions, self.sizes.expert.head_dim), state_token)

    def embed_suffix(self, noisy_actions: Tensor, time: Tensor, context: SuffixContext) -> tuple[Tensor, Tensor | None]:
        """The expert's input (B, S, W) and pi0.5's norm condition (None for pi0)."""
        config, width = self.config, self.sizes.expert.width
        time_embedding = sinusoidal_time_embedding(time, width, config.min_period, config.max_period).to(time.dtype)
        actions = self.action_in_proj(noisy_actions)
        if config.is_pi05:
            return actions, F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(time_embedding))))
        fused = torch.cat([actions, time_embedding[:, None, :].expand_as(actions)], dim=2)
        fused = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(fused)))
        return torch.cat([context.state_token, fused], dim=1), None

    def expert_layer(self, index: int, hidden: Tensor, cache: PrefixCache, context: SuffixContext,
                     cond: Tensor | None = None) -> Tensor:
        """Expert layer ``index``: attends over VLM layer ``index``'s prefix keys/values and its own."""
        layer, sizes, prefix_kv = self.expert.layers[index], self.sizes.expert, cache.layers[index]
        query, kv, gate = layer.project(hidden, context.rotary, cond)
        key = torch.cat([prefix_kv.key, kv.key], dim=1)
        value = torch.cat([prefix_kv.value, kv.value], dim=1)
        attention = attend(query, key, value, context.mask, sizes.num_heads, sizes.num_kv_heads)
        return layer.finish(attention, hidden, gate, cond)

    def denoise_step(self, noisy_actions: Tensor, time: Tensor, cache: PrefixCache,
                     context: SuffixContext | None = None) -> Tensor:
        """The velocity v(x_t, t), (B, chunk_size, max_action_dim); ``context`` is made from the cache
        when not given (sampling makes it once per chunk)."""
        context = self.suffix_context(cache) if context is None else context
        hidden, cond = self.embed_suffix(noisy_actions, time, context)
        for index in range(self.sizes.expert.depth):
            hidden = self.expert_layer(index, hidden, cache, context, cond)
        hidden, _ = self.expert.norm(hidden, cond)
        return self.action_out_proj(hidden[:, -self.config.chunk_size:].to(torch.float32))

    def sample_actions(self, prefix: Prefix, noise: Tensor, cache: PrefixCache | None = None) -> Tensor:
        """Euler integration from the noise (t = 1) to the normalised chunk (B, chunk, max_action_dim);
        ``cache`` (e.g. a routed run_prefix) replaces the full prefix pass."""
        cache = self.run_prefix(prefix) if cache is None else cache
        context = self.suffix_context(cache)
        steps = self.config.num_inference_steps
        dt = -1.0 / steps
        x_t = noise
        for step in range(steps):
            time = torch.tensor(1.0 + step * dt, dtype=torch.float32, device=noise.device).expand(noise.shape[0])
            x_t = x_t + dt * self.denoise_step(x_t, time, cache, context)
        return x_t
