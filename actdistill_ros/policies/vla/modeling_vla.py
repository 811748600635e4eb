"""Reference VLA: patch-embedded camera images + hashed-word instruction + robot state + an action
query token, an L-layer pre-norm transformer backbone, and a regression head that reads the action
query's final hidden state as an H x D action chunk.

The image tokens come from a linear patch embedding trained with the model, or, with
``image_encoder: mobilenet_v2``, from ImageNet MobileNetV2 features[:k] (one token per output cell,
projected to the width): its convolutions run once per image, before and outside the routed
backbone, and :meth:`ReferenceVLA.vision_flops` counts them apart from the backbone's FLOPs. With
``image_encoder: keypoints`` they are K spatial soft-argmax keypoints of a conv encoder trained with the
model (keypoints.py): one token per keypoint, its (x, y) through a small MLP plus which keypoint it is.

With several cameras, each image is cut into patches by the same patch embedding and gets the same
position embeddings, plus a learned embedding of its camera; the tokens of camera 0 come first.
With one camera there is no camera embedding, so single-camera weights are unchanged.

It implements the :class:`~actdistill_ros.policies.teacher.DistillableVLA` protocol, which is all
that distillation and routed inference need from a teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from actdistill_ros.policies.common import NormalizationMixin, camera_batch, full_depth_forward
from actdistill_ros.policies.observation import (ACTION_QUERY, LANGUAGE, STATE, VISUAL, EncodedObservation,
                                                segment_spans)
from actdistill_ros.policies.vla.configuration_vla import VLAConfig
from actdistill_ros.policies.vla.keypoints import SpatialKeypointEncoder
from actdistill_ros.policies.vla.mobilenet_v2 import IMAGENET_MEAN, IMAGENET_STD, MobileNetV2Features
from actdistill_ros.policies.vla.tokenizer import PAD_ID, tokenize_batch


def resample_visual_positions(visual_pos: Tensor, grid: int) -> Tensor:
    """(1, g * g, W) patch position embeddings -> (1, grid * grid, W), resampled bicubically over the
    patch grid: the same weights at another input resolution (same patch size)."""
    _, patches, width = visual_pos.shape
    old = round(patches ** 0.5)
    if old * old != patches:
        raise ValueError(f"visual_pos: expected a square patch grid, got {patches} positions")
    if old == grid:
        return visual_pos
    square = visual_pos.reshape(1, old, old, width).permute(0, 3, 1, 2).float()
    resized = F.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(1, grid * grid, width).to(visual_pos.dtype)


class TransformerBlock(nn.Module):
    """Pre-norm block: h + Attn(LN(h)), then h + MLP(LN(h))."""

    def __init__(self, config: VLAConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.norm1 = nn.LayerNorm(config.width)
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.proj = nn.Linear(config.width, config.width)
        self.norm2 = nn.LayerNorm(config.width)
        self.fc1 = nn.Linear(config.width, config.mlp_width)
        self.fc2 = nn.Linear(config.mlp_width, config.width)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden: Tensor, attn_mask: Tensor, readout: slice | None = None) -> Tensor:
        """(B, N, W) -> (B, N, W); with ``readout``, only those positions (B, R, W). Keys and values
        still come from every position, so the readout rows are exactly those of the full block."""
        b, n, w = hidden.shape
        heads, head_dim = self.num_heads, w // self.num_heads
        normed = self.norm1(hidden)
        if readout is None:
            q, k, v = self.qkv(normed).view(b, n, 3, heads, head_dim).unbind(2)
        else:  # queries for the readout rows only; qkv's weight rows are [q; k; v]
            k, v = F.linear(normed, self.qkv.weight[w:], self.qkv.bias[w:]).view(b, n, 2, heads, head_dim).unbind(2)
            q = F.linear(normed[:, readout], self.qkv.weight[:w], self.qkv.bias[:w]).view(b, -1, heads, head_dim)
            hidden = hidden[:, readout]
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
            dropout_p=self.dropout.p if self.training else 0.0)
        hidden = hidden + self.dropout(self.proj(attended.transpose(1, 2).reshape(b, -1, w)))
        return hidden + self.dropout(self.fc2(F.gelu(self.fc1(self.norm2(hidden)))))


class ReferenceVLA(NormalizationMixin, nn.Module):
    def __init__(self, config: VLAConfig):
        super().__init__()
        self.config = config
        c = config
        if c.image_encoder == "mobilenet_v2":
            self.patch_embed = None
            self.image_encoder = MobileNetV2Features(c.encoder_blocks)
            self.encoder_proj = nn.Linear(self.image_encoder.out_channels, c.width)
            self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        elif c.image_encoder == "keypoints":
            self.patch_embed = None
            self.image_encoder = SpatialKeypointEncoder(c.num_keypoints, c.encoder_channels)
            self.encoder_proj = nn.Sequential(nn.Linear(2, c.width), nn.GELU(), nn.Linear(c.width, c.width))
        else:
            self.patch_embed = nn.Conv2d(3, c.width, kernel_size=c.patch_size, stride=c.patch_size)
            self.image_encoder = self.encoder_proj = None
        self.visual_pos = nn.Parameter(torch.zeros(1, c.num_patches, c.width))
        self.word_embed = nn.Embedding(c.text_vocab_size, c.width, padding_idx=PAD_ID)
        self.text_pos = nn.Parameter(torch.zeros(1, c.max_text_tokens, c.width))
        self.state_embed = nn.Linear(c.state_dim, c.width) if c.state_dim else None
        self.action_query = nn.Parameter(torch.zeros(1, 1, c.width))
        # Which camera a patch came from; absent with one camera (the single-camera layout).
        self.camera_embed = nn.Parameter(torch.zeros(c.num_cameras, c.width)) if c.num_cameras > 1 else None
        self.layers = nn.ModuleList(TransformerBlock(c) for _ in range(c.num_layers))
        self.final_norm = nn.LayerNorm(c.width)
        self.action_head = nn.Sequential(
            nn.Linear(c.width, c.head_hidden), nn.GELU(), nn.Linear(c.head_hidden, c.chunk_size * c.action_dim))
        segments = [VISUAL] * c.num_visual_tokens + [LANGUAGE] * c.max_text_tokens
        segments += ([STATE] if c.state_dim else []) + [ACTION_QUERY]
        self.register_buffer("segment", torch.tensor(segments), persistent=False)
        self.segment_spans = segment_spans(segments)
        self.register_normalization(c.action_dim, c.state_dim)
        self.apply(self._init_weights)
        if c.image_encoder == "keypoints":
            self.image_encoder.reset_parameters()
        for param in (self.visual_pos, self.text_pos, self.action_query):
            nn.init.normal_(param, std=0.02)
        if self.camera_embed is not None:
            nn.init.normal_(self.camera_embed, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    # ---- DistillableVLA protocol ---------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def freeze_vision(self) -> None:
        """Freeze the image encoder (patch embedding, or MobileNetV2 and its projection) and its position
        embeddings."""
        for module in (self.patch_embed, self.image_encoder, self.encoder_proj):
            if module is not None:
                module.requires_grad_(False)
        self.visual_pos.requires_grad_(False)

    def vision_flops(self) -> float:
        """Matmul/convolution FLOPs of the image encoder for one sample (every camera): computed once per
        observation whatever the route, so counted apart from :meth:`layer_flops`."""
        c = self.config
        if self.image_encoder is None:
            per_camera = 2 * c.num_patches * (3 * c.patch_size ** 2) * c.width
        elif c.image_encoder == "keypoints":
            per_camera = self.image_encoder.flops(c.image_size) + 2 * c.num_patches * (2 + c.width) * c.width
        else:
            per_camera = self.image_encoder.flops(c.image_size) + 2 * c.num_patches * self.image_encoder.out_channels * c.width
        return float(c.num_cameras * per_camera)

    def image_tokens(self, images: Tensor) -> Tensor:
        """uint8 RGB (B, C, S, S, 3) -> (B * C, P, W) image tokens, before position embeddings."""
        if self.image_encoder is None:
            weight = self.patch_embed.weight.flatten(1)  # (W, 3 * p * p), a view
            return F.linear(self.patch_pixels(images), weight, self.patch_embed.bias)
        frames = camera_batch(images, self.config.num_cameras, self.config.image_size).flatten(0, 1)
        pixels = frames.permute(0, 3, 1, 2).to(self.action_query.dtype)
        if self.config.image_encoder == "keypoints":
            return self.encoder_proj(self.image_encoder(pixels.mul_(2.0 / 255.0).sub_(1.0)))
        pixels = pixels.div_(255.0)
        features = self.image_encoder(pixels.sub_(self.pixel_mean).div_(self.pixel_std))  # ImageNet normalisation
        return self.encoder_proj(features.flatten(2).transpose(1, 2))

    def patch_pixels(self, images: Tensor) -> Tensor:
        """uint8 RGB (B, C, S, S, 3) on any device -> (B * C, P, 3 * p * p) float in [-1, 1]: each
        patch's pixels in the order of the patch embedding's (W, 3, p, p) weight, camera-major within
        each sample. (B, S, S, 3) is accepted with one camera.

        The patch embedding is then one matmul: at batch 1 that costs about half of a strided conv
        on a CPU, and it is the same function. See :func:`~actdistill_ros.policies.common.camera_batch`
        for the accepted shapes.
        """
        images = camera_batch(images, self.config.num_cameras, self.config.image_size).flatten(0, 1)
        frames, grid, patch = images.shape[0], self.config.image_size // self.config.patch_size, self.config.patch_size
        # (N, gy, py, gx, px, 3) -> (N, gy, gx, 3, py, px): reordered while still uint8 (a quarter
        # of the bytes), then converted.
        patches = images.reshape(frames, grid, patch, grid, patch, 3).permute(0, 1, 3, 5, 2, 4)
        pixels = patches.reshape(frames, grid * grid, 3 * patch * patch).to(self.action_query.dtype)
        # In place: a 128 px frame is ~200 KB of floats, and each fresh buffer that size is new memory
        # to fault in, which costs more than the arithmetic.
        return pixels.mul_(2.0 / 255.0).sub_(1.0)

    def encode(self, images: Tensor, instructions: list[str], states: Tensor | None = None) -> EncodedObservation:
        c = self.config
        batch, device, dtype = images.shape[0], self.action_query.device, self.action_query.dtype
        if len(instructions) != batch:
            raise ValueError(f"got {len(instructions)} instructions for {batch} images")
        # (B * C, P, W): every camera through the same image encoder and positions.
        visual = self.image_tokens(images.to(device)) + self.visual_pos
        if self.camera_embed is not None:
            visual = visual.reshape(batch, c.num_cameras, c.num_patches, c.width) + self.camera_embed[None, :, None]
        visual = visual.reshape(batch, c.num_visual_tokens, c.width)
        # Made on the host; a blocking copy would make the host wait for the device.
        text_ids = tokenize_batch(instructions, c.text_vocab_size, c.max_text_tokens).to(device, non_blocking=True)
        language = self.word_embed(text_ids) + self.text_pos
        parts = [visual, language]
        valid = [torch.ones(batch, c.num_visual_tokens, dtype=torch.bool, device=device), text_ids != PAD_ID]
        if self.state_embed is not None:
            if states is None or states.shape != (batch, c.state_dim):
                got = None if states is None else tuple(states.shape)
                raise ValueError(f"states must have shape ({batch}, {c.state_dim}), got {got}")
            normalized = self.normalize_states(states)
            parts.append(self.state_embed(normalized.to(dtype))[:, None])
            valid.append(torch.ones(batch, 1, dtype=torch.bool, device=device))
        parts.append(self.action_query.expand(batch, -1, -1))
        valid.append(torch.ones(batch, 1, dtype=torch.bool, device=device))
        return EncodedObservation(torch.cat(parts, 1), torch.cat(valid, 1), self.segment, self.segment_spans,
                                  frozenset({LANGUAGE}))

    def run_layer(self, index: int, hidden: Tensor, attn_mask: Tensor, readout: slice | None = None) -> Tensor:
        return self.layers[index](hidden, attn_mask, readout)

    def predict_chunk(self, readout: Tensor) -> Tensor:
        """Final hidden state of the action query (B, 1, W) -> normalised action chunk (B, H, D)."""
        query = self.final_norm(readout[:, 0])
        return self.action_head(query).view(-1, self.config.chunk_size, self.config.action_dim)

    def layer_flops(self, num_tokens: int, readout_tokens: int | None = None) -> float:
        """Matmul FLOPs of one backbone layer for one sample (multiply-add = 2 FLOPs), computing
        every position, or only ``readout_tokens`` of them (keys and values from all)."""
        n, w, m = num_tokens, self.config.width, self.config.mlp_width
        r = n if readout_tokens is None else readout_tokens
        projections = 2 * n * w * (2 * w) + 2 * r * w * w + 2 * r * w * w + 2 * (2 * r * w * m)  # kv, q, out, mlp
        attention = 2 * (2 * r * n * w)  # scores and weighted sum
        return float(projections + attention)

    # ---- plain full-depth use (teacher training) -----------------------------------------
    def forward(self, images: Tensor, instructions: list[str], states: Tensor | None = None) -> Tensor:
        return full_depth_forward(self, images, instructions, states)
