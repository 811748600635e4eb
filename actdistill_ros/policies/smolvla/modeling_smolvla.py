"""SmolVLA (LeRobot's flow-matching VLA) on transformers' own SmolVLM/Idefics3 classes, without lerobot.

Layout, as LeRobot 0.4.x computes it (the numbers must match its outputs, so every detail is its):

    prefix = per camera: [<fake_image>, <global-img>]? image tokens * sqrt(width) [<fake_image>]?
             then the task tokens * sqrt(width), then one projected state token
    suffix = chunk_size action tokens: MLP(action_in_proj(x_t), sinusoid(t))

- The VLM keeps the first ``num_vlm_layers`` text layers. The prefix runs once per chunk and each
  layer's keys (rotated) and values are cached. Image and task tokens attend bidirectionally among
  themselves (padding masked out); the state token also sees them; nothing in the prefix sees the
  suffix. Positions are the cumulative count of valid tokens; rotary angles use wavelength 10000
  whatever the text config's rope_theta says (LeRobot's own ``apply_rope``).
- The action expert is a narrower Llama stack (width ``expert_width_multiplier`` x VLM width, same
  heads and head_dim). Its layer i is paired with VLM layer i. A *self-attention* layer attends
  over the cached prefix keys/values plus its own (positions continue after the prefix); a
  *cross-attention* layer projects the VLM layer's cached keys/values with its own k/v maps and
  attends to them only (its queries rotated from position 0). Action tokens attend causally among
  themselves.
- Sampling: x_1 = noise, ``num_steps`` Euler steps with dt = -1/N at t = 1, 1 + dt, ...;
  x <- x + dt * v(x, t). The result is the normalised chunk (max_action_dim wide).

Per-layer execution is public (``vlm_layer``, ``expert_layer``, ``project_cross_kv``) so that a
router can skip VLM text layers: a skipped layer's input passes through unchanged, and the expert
still needs that layer's keys/values, which ``vlm_layer(..., need_output=False)`` provides at the
cost of one norm and two projections.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from actdistill_ros.policies.observation import LANGUAGE, STATE, VISUAL
from actdistill_ros.policies.smolvla.configuration_smolvla import SmolVLAConfig, SmolVLAConfigError

ROPE_WAVELENGTH = 10_000  # LeRobot's apply_rope constant (not the text config's rope_theta)
# model.safetensors names (LeRobot's module tree) -> this module's names, first match wins.
LEROBOT_PREFIXES = (("model.vlm_with_expert.vlm.model.", "vlm."), ("model.vlm_with_expert.lm_expert.", "expert."),
                    ("model.", ""))
LM_HEAD = "model.vlm_with_expert.vlm.lm_head.weight"  # saved by LeRobot, never used to predict actions
EMBED_TOKENS = "vlm.text_model.embed_tokens.weight"
PADDING = 4  # Prefix.segments of a fixed-length prefix's filler (after the observation.py modalities)


class WeightsMismatch(ValueError):
    """One line naming the weights file, the tensor and what was expected."""


def expert_intermediate_size(hidden: int, ffn_multiplier: int = 4, multiple_of: int = 256) -> int:
    """The expert MLP width LeRobot derives from the expert width (Llama's 2/3 * 4 rule, rounded up)."""
    size = int(ffn_multiplier * int(2 * hidden / 3))
    return multiple_of * ((size + multiple_of - 1) // multiple_of)


def make_att_2d_masks(pad_masks: Tensor, att_masks: Tensor) -> Tensor:
    """(B, N) validity and (B, N) "starts a new block" flags -> (B, N, N) query x key: a token sees
    the valid tokens whose cumulative block count is at most its own (big_vision's prefix-LM rule)."""
    blocks = torch.cumsum(att_masks, dim=1)
    allowed = blocks[:, None, :] <= blocks[:, :, None]
    return allowed & (pad_masks[:, None, :] & pad_masks[:, :, None])


def sinusoidal_time_embedding(time: Tensor, dimension: int, min_period: float, max_period: float) -> Tensor:
    """(B,) times -> (B, dimension) [sin, cos] features, computed in float64 as LeRobot does."""
    if dimension % 2:
        raise ValueError(f"time embedding width {dimension} must be even")
    fraction = torch.linspace(0.0, 1.0, dimension // 2, dtype=torch.float64, device=time.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (1.0 / period * 2 * math.pi)[None, :] * time[:, None]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)


def resize_with_pad(images: Tensor, width: int, height: int, pad_value: float = 0.0) -> Tensor:
    """(B, 3, h, w) -> (B, 3, height, width): bilinear resize keeping the aspect ratio (no
    antialiasing), then padding on the left and top."""
    cur_height, cur_width = images.shape[2:]
    ratio = max(cur_width / width, cur_height / height)
    resized_height, resized_width = int(cur_height / ratio), int(cur_width / ratio)
    resized = F.interpolate(images, size=(resized_height, resized_width), mode="bilinear", align_corners=False)
    pad_height, pad_width = max(0, int(height - resized_height)), max(0, int(width - resized_width))
    return F.pad(resized, (pad_width, 0, pad_height, 0), value=pad_value)


def vision_position_ids(patches_high: int, patches_wide: int, per_side: int, dtype: torch.dtype,
                        device: torch.device) -> Tensor:
    """Position-embedding index of each patch (row-major) of an unpadded image, as transformers 4.x
    SmolVLM/Idefics3 vision embeddings compute it: fractional coordinates i / n * (1 - 1e-6)
    bucketed against the tower's num_patches_per_side grid."""
    boundaries = torch.arange(1 / per_side, 1.0, 1 / per_side, device=device)
    rows = torch.arange(patches_high, device=device, dtype=dtype) / patches_high * (1 - 1e-6)
    cols = torch.arange(patches_wide, device=device, dtype=dtype) / patches_wide * (1 - 1e-6)
    rows = torch.bucketize(rows, boundaries, right=True)
    cols = torch.bucketize(cols, boundaries, right=True)
    return (rows[:, None] * per_side + cols).flatten()


@dataclass
class Rotary:
    """cos/sin of LeRobot's rotary embedding for one set of positions (B, L) -> (B, L, 1, D/2)."""

    cos: Tensor
    sin: Tensor

    @classmethod
    def at(cls, positions: Tensor, head_dim: int) -> "Rotary":
        half = head_dim // 2
        exponents = (2.0 / head_dim) * torch.arange(half, dtype=torch.float32, device=positions.device)
        timescale = ROPE_WAVELENGTH ** exponents
        radians = (positions[..., None].to(torch.float32) / timescale[None, None, :])[..., None, :]
        return cls(torch.cos(radians), torch.sin(radians))

    def apply(self, x: Tensor) -> Tensor:
        """x (B, L, H, D) rotated in float32, returned in its dtype."""
        dtype, half = x.dtype, x.shape[-1] // 2
        x = x.to(torch.float32)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * self.cos - x2 * self.sin, x2 * self.cos + x1 * self.sin], dim=-1).to(dtype)


@dataclass
class Prefix:
    """The embedded prefix and its layout."""

    embeddings: Tensor  # (B, P, W)
    pad_masks: Tensor  # (B, P) bool: real tokens
    att_masks: Tensor  # (B, P) bool: True where a new attention block starts (the state token)
    # Host-side modality of each position (observation.py's VISUAL / LANGUAGE / STATE, PADDING for a
    # fixed-length prefix's filler), so that a router pools each modality without reading the device.
    segments: tuple[int, ...] = ()

    def context(self, head_dim: int) -> "PrefixContext":
        positions = torch.cumsum(self.pad_masks, dim=1) - 1
        return PrefixContext(make_att_2d_masks(self.pad_masks, self.att_masks), Rotary.at(positions, head_dim))


@dataclass
class PrefixContext:
    mask: Tensor  # (B, P, P) bool
    rotary: Rotary


@dataclass
class LayerKV:
    """One VLM layer's prefix keys (rotated) and values, (B, P, kv_heads, head_dim)."""

    key: Tensor
    value: Tensor


@dataclass
class PrefixCache:
    """What the denoising steps read: per VLM layer its keys/values (and, for cross-attention
    expert layers, the expert's projections of them, computed once per chunk) plus the masks."""

    layers: list[LayerKV]
    cross: list[LayerKV | None]  # expert-projected keys/values of cross-attention layers
    pad_masks: Tensor  # (B, P)


def attend(query: Tensor, key: Tensor, value: Tensor, mask: Tensor, num_heads: int, num_kv_heads: int) -> Tensor:
    """LeRobot's eager attention: (B, Lq, H, D) x (B, Lk, KV, D) with a (B, Lq, Lk) bool mask ->
    (B, Lq, H * D). Scores in float32; masked scores are the float32 minimum (a row with no valid
    key becomes uniform, as there)."""
    batch, length, _, head_dim = key.shape
    groups = num_heads // num_kv_heads
    key = key[:, :, :, None, :].expand(batch, length, num_kv_heads, groups, head_dim).reshape(
        batch, length, num_heads, head_dim)
    value = value[:, :, :, None, :].expand(batch, length, num_kv_heads, groups, head_dim).reshape(
        batch, length, num_heads, head_dim)
    scores = torch.matmul(query.to(torch.float32).transpose(1, 2), key.to(torch.float32).permute(0, 2, 3, 1))
    scores = scores * head_dim ** -0.5
    scores = torch.where(mask[:, None], scores, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
    return out.reshape(batch, -1, num_heads * head_dim)


def _split_heads(projection: nn.Linear, x: Tensor, head_dim: int) -> Tensor:
    return projection(x).view(*x.shape[:-1], -1, head_dim)


def _input_norm(layer: nn.Module, hidden: Tensor) -> Tensor:
    """The layer's input RMSNorm, cast to its projections' dtype (where LeRobot casts)."""
    return layer.input_layernorm(hidden).to(layer.self_attn.q_proj.weight.dtype)


def _finish_layer(layer: nn.Module, attention: Tensor, residual: Tensor) -> Tensor:
    """Output projection + residual, then the gated MLP + residual (a Llama decoder layer's tail).
    The residual sum keeps the layer's dtype (LeRobot adds in place)."""
    projection = layer.self_attn.o_proj
    hidden = projection(attention.to(projection.weight.dtype))
    hidden = (hidden + residual).to(hidden.dtype)
    return layer.mlp(layer.post_attention_layernorm(hidden)) + hidden


class SmolVLAModel(nn.Module):
    """The SmolVLA network. ``vlm_config`` is the transformers config of ``vlm_model_name`` (SmolVLM or
    Idefics3); only its first ``num_vlm_layers`` text layers are built. ``special_token_ids`` are the
    tokenizer's (<fake_token_around_image>, <global-img>), needed when add_image_special_tokens.

    ``dtypes`` maps "vision", "connector", "text" and "expert" to the dtype each part runs in
    (``lerobot_dtypes`` gives LeRobot's); the projections around them, and the cross-attention k/v
    maps, are float32 as there. By default everything is float32."""

    def __init__(self, config: SmolVLAConfig, vlm_config, special_token_ids: tuple[int, int] | None = None,
                 dtypes: dict[str, torch.dtype] | None = None):
        super().__init__()
        from transformers import AutoModel

        try:
            from transformers.initialization import no_init_weights  # transformers 5.x
        except ImportError:  # pragma: no cover - 4.x
            from transformers.modeling_utils import no_init_weights

        self.config = config
        vlm_config = copy.deepcopy(vlm_config)
        text = vlm_config.text_config
        if config.num_vlm_layers > 0:
            text.num_hidden_layers = min(config.num_vlm_layers, text.num_hidden_layers)
        self.num_vlm_layers = text.num_hidden_layers
        self.width = text.hidden_size
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.num_heads, self.num_kv_heads = text.num_attention_heads, text.num_key_value_heads

        expert_config = copy.deepcopy(text)
        expert_config.hidden_size = int(text.hidden_size * config.expert_width_multiplier)
        expert_config.intermediate_size = expert_intermediate_size(expert_config.hidden_size)
        expert_config.head_dim = self.head_dim
        num_expert = config.num_expert_layers if config.num_expert_layers > 0 else self.num_vlm_layers
        if self.num_vlm_layers % num_expert:
            raise SmolVLAConfigError(f"{config.source}: num_expert_layers {num_expert} does not divide the "
                                     f"{self.num_vlm_layers} VLM layers")
        expert_config.num_hidden_layers = num_expert
        self.expert_width = expert_config.hidden_size
        # VLM layer i -> its expert layer (None: the expert skips it), as LeRobot pairs them.
        step = self.num_vlm_layers // num_expert
        self.expert_index: list[int | None] = [None if step > 1 and i % step else i // step
                                               for i in range(self.num_vlm_layers)]
        for vlm_index, expert_index in enumerate(self.expert_index):
            if expert_index is not None and (config.is_self_attention_layer(vlm_index)
                                             != config.is_self_attention_layer(expert_index)):
                raise SmolVLAConfigError(
                    f"{config.source}: num_expert_layers={config.num_expert_layers} with self_attn_every_n_layers="
                    f"{config.self_attn_every_n_layers} pairs expert layer {expert_index} with VLM layer {vlm_index} "
                    f"of the other attention kind; LeRobot's SmolVLA cannot run this combination either")

        with no_init_weights():
            self.vlm = AutoModel.from_config(vlm_config)
            self.expert = AutoModel.from_config(expert_config)
        for part in ("vision_model", "connector", "text_model"):
            if not hasattr(self.vlm, part):
                raise SmolVLAConfigError(f"VLM config model_type {vlm_config.model_type!r}: its model has no "
                                         f"`{part}`; SmolVLA needs a SmolVLM/Idefics3 VLM")
        self.expert.embed_tokens = None  # the expert reads embeddings, never token ids
        kv_width = self.num_kv_heads * self.head_dim
        for index, layer in enumerate(self.expert.layers):
            if not config.is_self_attention_layer(index):
                bias = bool(getattr(expert_config, "attention_bias", False))
                expert_kv = expert_config.num_key_value_heads * self.head_dim
                layer.self_attn.k_proj = nn.Linear(kv_width, expert_kv, bias=bias)
                layer.self_attn.v_proj = nn.Linear(kv_width, expert_kv, bias=bias)

        self.state_proj = nn.Linear(config.max_state_dim, self.width)
        self.action_in_proj = nn.Linear(config.max_action_dim, self.expert_width)
        self.action_out_proj = nn.Linear(self.expert_width, config.max_action_dim)
        self.action_time_mlp_in = nn.Linear(2 * self.expert_width, self.expert_width)
        self.action_time_mlp_out = nn.Linear(self.expert_width, self.expert_width)
        if config.add_image_special_tokens and special_token_ids is None:
            raise SmolVLAConfigError(f"{config.source}: add_image_special_tokens needs the tokenizer's "
                                     f"<fake_token_around_image> and <global-img> ids")
        dtypes = dtypes or {}
        for part, module in (("vision", self.vlm.vision_model), ("connector", self.vlm.connector),
                             ("text", self.vlm.text_model), ("expert", self.expert)):
            module.to(dtypes.get(part, torch.float32))
        # LeRobot swaps in the cross-attention k/v maps after building the expert: plain nn.Linear
        # layers, so float32 whatever the expert's dtype.
        for index, layer in enumerate(self.expert.layers):
            if not config.is_self_attention_layer(index):
                layer.self_attn.k_proj.float()
                layer.self_attn.v_proj.float()
        ids = special_token_ids or (0, 0)
        self.register_buffer("image_start_ids", torch.tensor([ids[0], ids[1]]), persistent=False)
        self.register_buffer("image_end_ids", torch.tensor([ids[0]]), persistent=False)

    # ---- parts -----------------------------------------------------------------------------------
    @property
    def text_layers(self) -> nn.ModuleList:
        return self.vlm.text_model.layers

    def embed_tokens(self, ids: Tensor) -> Tensor:
        return self.vlm.text_model.get_input_embeddings()(ids)

    def embed_image(self, pixels: Tensor) -> Tensor:
        """Pixels in [-1, 1] (B, 3, H, W) -> image tokens (B, T, W): vision tower + pixel-shuffle connector.

        The patch embeddings are added here rather than by the tower's own forward: transformers 5
        changed how patch positions are bucketed (4.x maps patch i of n to i/n * (1 - 1e-6), which
        falls one bucket lower on every exact boundary), and SmolVLA policies were trained and run
        with transformers 4.x, so their image tokens are the 4.x ones."""
        vision = self.vlm.vision_model
        embeddings = vision.embeddings
        pixels = pixels.to(dtype=embeddings.patch_embedding.weight.dtype)
        patches = embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
        size = embeddings.patch_embedding.stride[0]
        positions = vision_position_ids(pixels.shape[2] // size, pixels.shape[3] // size,
                                        embeddings.num_patches_per_side, pixels.dtype, pixels.device)
        hidden = patches + embeddings.position_embedding(positions)[None]
        hidden = vision.encoder(inputs_embeds=hidden, attention_mask=None).last_hidden_state
        return self.vlm.connector(vision.post_layernorm(hidden))

    # ---- prefix ----------------------------------------------------------------------------------
    def embed_prefix(self, images: list[Tensor], image_masks: list[Tensor], lang_tokens: Tensor,
                     lang_masks: Tensor, state: Tensor) -> Prefix:
        embeddings, pad_masks, att_masks, segments = [], [], [], []
        batch = state.shape[0]

        def special(ids: Tensor) -> None:
            tokens = self.embed_tokens(ids)[None].expand(batch, -1, -1)
            embeddings.append(tokens)
            pad_masks.append(torch.ones(batch, len(ids), dtype=torch.bool, device=tokens.device))
            att_masks.extend([0] * len(ids))
            segments.extend([VISUAL] * len(ids))

        for pixels, valid in zip(images, image_masks):
            if self.config.add_image_special_tokens:
                special(self.image_start_ids)
            tokens = self.embed_image(pixels)
            tokens = tokens * torch.tensor(tokens.shape[-1] ** 0.5, dtype=tokens.dtype, device=tokens.device)
            embeddings.append(tokens)
            pad_masks.append(valid[:, None].expand(batch, tokens.shape[1]))
            att_masks.extend([0] * tokens.shape[1])
            segments.extend([VISUAL] * tokens.shape[1])
            if self.config.add_image_special_tokens:
                special(self.image_end_ids)
        language = self.embed_tokens(lang_tokens)
        embeddings.append(language * math.sqrt(language.shape[-1]))
        pad_masks.append(lang_masks)
        att_masks.extend([0] * language.shape[1])
        segments.extend([LANGUAGE] * language.shape[1])
        embeddings.append(self.state_proj(state)[:, None, :])
        pad_masks.append(torch.ones(batch, 1, dtype=torch.bool, device=state.device))
        att_masks.append(1)  # image and language tokens do not see the state
        segments.append(STATE)

        embeddings, pad_masks = torch.cat(embeddings, dim=1), torch.cat(pad_masks, dim=1)
        att = torch.tensor(att_masks, dtype=torch.bool, device=pad_masks.device)[None]
        length = pad_masks.shape[1]
        if length < self.config.prefix_length:  # a fixed-length prefix, padded with invalid zeros
            extra = self.config.prefix_length - length
            embeddings = F.pad(embeddings, (0, 0, 0, extra))
            pad_masks = F.pad(pad_masks, (0, extra), value=False)
            att = F.pad(att, (0, extra), value=False)
            segments.extend([PADDING] * extra)
        return Prefix(embeddings, pad_masks, att.expand(batch, -1), tuple(segments))

    def vlm_layer(self, index: int, hidden: Tensor, context: PrefixContext,
                  need_output: bool = True) -> tuple[Tensor | None, LayerKV]:
        """VLM text layer ``index`` on the prefix: (its output or None, its keys/values for the cache).
        ``need_output=False`` computes only the keys/values (the last layer, or a skipped one)."""
        layer = self.text_layers[index]
        normed = _input_norm(layer, hidden)
        key = context.rotary.apply(_split_heads(layer.self_attn.k_proj, normed, self.head_dim))
        kv = LayerKV(key, _split_heads(layer.self_attn.v_proj, normed, self.head_dim))
        if not need_output:
            return None, kv
        query = context.rotary.apply(_split_heads(layer.self_attn.q_proj, normed, self.head_dim))
        attention = attend(query, kv.key, kv.value, context.mask, self.num_heads, self.num_kv_heads)
        return _finish_layer(layer, attention, hidden), kv

    def project_cross_kv(self, index: int, kv: LayerKV) -> LayerKV | None:
        """A cross-attention expert layer's own keys/values from VLM layer ``index``'s cache (None
        for self-attention layers and layers without an expert layer)."""
        expert_index = self.expert_index[index]
        if expert_index is None or self.config.is_self_attention_layer(index):
            return None
        attn = self.expert.layers[expert_index].self_attn
        batch, length = kv.key.shape[:2]
        dtype = attn.k_proj.weight.dtype
        key = attn.k_proj(kv.key.to(dtype).reshape(batch, length, -1)).view(batch, length, -1, self.head_dim)
        value = attn.v_proj(kv.value.to(dtype).reshape(batch, length, -1)).view(batch, length, -1, self.head_dim)
        return LayerKV(key, value)

    def run_prefix(self, prefix: Prefix) -> PrefixCache:
        """Every VLM layer once over the prefix; the cache the denoising steps read."""
        context = prefix.context(self.head_dim)
        hidden, layers = prefix.embeddings, []
        for index in range(self.num_vlm_layers):
            hidden, kv = self.vlm_layer(index, hidden, context, need_output=index < self.num_vlm_layers - 1)
            layers.append(kv)
        return PrefixCache(layers, [self.project_cross_kv(i, kv) for i, kv in enumerate(layers)], prefix.pad_masks)

    # ---- suffix (the action expert) --------------------------------------------------------------
    def embed_suffix(self, noisy_actions: Tensor, time: Tensor) -> Tensor:
        actions = self.action_in_proj(noisy_actions)
        time_emb = sinusoidal_time_embedding(time, self.expert_width, self.config.min_period, self.config.max_period)
        time_emb = time_emb.to(actions.dtype)[:, None, :].expand_as(actions)
        fused = self.action_time_mlp_in(torch.cat([actions, time_emb], dim=2))
        return self.action_time_mlp_out(F.silu(fused))

    def suffix_context(self, cache: PrefixCache, suffix_length: int) -> "SuffixContext":
        pad = cache.pad_masks
        batch, prefix_length = pad.shape
        offsets = pad.sum(dim=-1)[:, None]
        steps = torch.arange(suffix_length, device=pad.device)[None]
        causal = steps.T >= steps  # (S, S): action tokens see themselves and the earlier ones
        prefix_visible = pad[:, None, :].expand(batch, suffix_length, prefix_length)
        joint = torch.cat([prefix_visible, causal[None].expand(batch, -1, -1)], dim=2)
        return SuffixContext(joint, prefix_visible, Rotary.at(offsets + steps, self.head_dim),
                             Rotary.at(steps.expand(batch, -1), self.head_dim))

    def expert_layer(self, index: int, hidden: Tensor, cache: PrefixCache, context: "SuffixContext") -> Tensor:
        """The expert layer paired with VLM layer ``index`` on the suffix (identity where there is none)."""
        expert_index = self.expert_index[index]
        if expert_index is None:
            return hidden
        layer = self.expert.layers[expert_index]
        attn = layer.self_attn
        normed = _input_norm(layer, hidden)
        query = _split_heads(attn.q_proj, normed, self.head_dim)
        if self.config.is_self_attention_layer(index):
            rotary = context.joint_rotary
            key = torch.cat([cache.layers[index].key, rotary.apply(_split_heads(attn.k_proj, normed, self.head_dim))], 1)
            value = torch.cat([cache.layers[index].value, _split_heads(attn.v_proj, normed, self.head_dim)], 1)
            attention = attend(rotary.apply(query), key, value, context.joint_mask, self.num_heads, self.num_kv_heads)
        else:
            cross = cache.cross[index]
            attention = attend(context.cross_rotary.apply(query), cross.key, cross.value, context.prefix_mask,
                               self.num_heads, self.num_kv_heads)
        return _finish_layer(layer, attention, hidden)

    def denoise_step(self, noisy_actions: Tensor, time: Tensor, cache: PrefixCache,
                     context: "SuffixContext | None" = None) -> Tensor:
        """Velocity v(x_t, t) (B, chunk, max_action_dim) in float32."""
        hidden = self.embed_suffix(noisy_actions, time)
        context = context or self.suffix_context(cache, hidden.shape[1])
        for index in range(self.num_vlm_layers):
            hidden = self.expert_layer(index, hidden, cache, context)
        hidden = self.expert.norm(hidden)[:, -self.config.chunk_size:]
        return self.action_out_proj(hidden.to(torch.float32))

    def sample_actions(self, prefix: Prefix, noise: Tensor) -> Tensor:
        """Normalised action chunk (B, chunk, max_action_dim) from start noise of that shape."""
        cache = self.run_prefix(prefix)
        batch, steps = noise.shape[0], self.config.num_steps
        dt = -1.0 / steps
        context = self.suffix_context(cache, self.config.chunk_size)
        x_t = noise
        for step in range(steps):
            time = torch.tensor(1.0 + step * dt, dtype=torch.float32, device=noise.device).expand(batch)
            x_t = x_t + dt * self.denoise_step(x_t, time, cache, context)
        return x_t

    # ---- weights ---------------------------------------------------------------------------------
    def load_lerobot_state(self, tensors: dict[str, Tensor], source: str) -> None:
        """LeRobot's model.safetensors (SmolVLAPolicy names) into this module, strictly: a missing,
        extra or mis-shaped tensor fails with one line naming it."""
        renamed: dict[str, Tensor] = {}
        for name, tensor in tensors.items():
            if name == LM_HEAD:
                continue
            target = next((new + name[len(old):] for old, new in LEROBOT_PREFIXES if name.startswith(old)), None)
            if target is None:
                raise WeightsMismatch(f"{source}: unexpected tensor {name!r} (not a SmolVLA policy's)")
            renamed[target] = tensor
        if EMBED_TOKENS not in renamed and LM_HEAD in tensors:
            renamed[EMBED_TOKENS] = tensors[LM_HEAD]  # tied embeddings: safetensors kept only the head's name
        own = self.state_dict()
        unexpected = sorted(set(renamed) - set(own))
        if unexpected:
            raise WeightsMismatch(f"{source}: {len(unexpected)} tensor(s) this config does not have, e.g. "
                                  f"{unexpected[0]!r} (num_vlm_layers / attention_mode / VLM config mismatch?)")
        missing = sorted(set(own) - set(renamed))
        if missing:
            raise WeightsMismatch(f"{source}: {len(missing)} tensor(s) missing, e.g. {missing[0]!r}")
        for name, tensor in renamed.items():
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise WeightsMismatch(f"{source}: tensor {name!r} has shape {list(tensor.shape)}, the config gives "
                                      f"{list(own[name].shape)} (is the VLM config the policy's vlm_model_name?)")
        self.load_state_dict(renamed, strict=True)


def lerobot_dtypes(config: SmolVLAConfig, vlm_config_json: dict) -> dict[str, torch.dtype]:
    """The dtype of each part as LeRobot 0.4.x (transformers 4.x) builds the policy: {"vision",
    "connector", "text", "expert"}.

    With ``load_vlm_weights`` the whole VLM is loaded in bfloat16, and the expert, built from a copy
    of its text config, follows it. Otherwise the VLM is constructed from its config: the vision
    tower and text model take the ``torch_dtype`` / ``dtype`` of their own entries in config.json
    (transformers 4.x builds sub-models in their sub-config's dtype), the connector is float32, and
    the expert takes the text entry's dtype. float32 where nothing is written."""
    if config.load_vlm_weights:
        return {"vision": torch.bfloat16, "connector": torch.bfloat16, "text": torch.bfloat16,
                "expert": torch.bfloat16}

    def written(entry: str) -> torch.dtype:
        sub = vlm_config_json.get(entry) or {}
        value = sub.get("dtype") or sub.get("torch_dtype")
        dtype = getattr(torch, value, None) if isinstance(value, str) else None
        return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32

    text = written("text_config")
    return {"vision": written("vision_config"), "connector": torch.float32, "text": text, "expert": text}


@dataclass
class SuffixContext:
    joint_mask: Tensor  # (B, S, P + S): self-attention layers
    prefix_mask: Tensor  # (B, S, P): cross-attention layers
    joint_rotary: Rotary  # positions continuing after the valid prefix tokens
    cross_rotary: Rotary  # positions 0..S-1
