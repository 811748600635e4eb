"""Reference VLA: patch-embedded camera images + hashed-word instruction + robot state + an action
query token, an L-layer pre-norm transformer backbone, and a regression head that reads the action
query's final hidden state as an H x D action chunk.

With several cameras, each image is cut into patches by the same patch embedding and gets the same
position embeddings, plus a learned embedding of its camera; the tokens of camera 0 come first.
With one camera there is no camera embedding, so single-camera weights are unchanged.

It implements the :class:`~actdistill_ros.policies.teacher.DistillableVLA` protocol, which is all
that distillation and routed inference need from a teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from actdistill_ros.policies.common import NormalizationMixin, camera_batch, full_depth_forward
from actdistill_ros.policies.vla.configuration_vla import VLAConfig
from actdistill_ros.policies.vla.tokenizer import PAD_ID, tokenize_batch

VISUAL, LANGUAGE, STATE, ACTION_QUERY = 0, 1, 2, 3


@dataclass
class EncodedObservation:
    """Layer-0 input of the backbone for a batch."""

    tokens: Tensor  # (B, N, W)
    valid: Tensor  # (B, N) bool: False for padding tokens
    segment: Tensor  # (N,) long: VISUAL / LANGUAGE / STATE / ACTION_QUERY per position
    action_index: int  # position of the action-query token

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    def attention_mask(self) -> Tensor:
        """(B, 1, 1, N) bool: True where a key may be attended to."""
        return self.valid[:, None, None, :]

    def modality_mask(self, segment: int) -> Tensor:
        """(B, N) bool: valid tokens of one modality."""
        return self.valid & (self.segment == segment)[None, :]


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

    def forward(self, hidden: Tensor, attn_mask: Tensor) -> Tensor:
        b, n, w = hidden.shape
        q, k, v = self.qkv(self.norm1(hidden)).view(b, n, 3, self.num_heads, w // self.num_heads).unbind(2)
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
            dropout_p=self.dropout.p if self.training else 0.0)
        hidden = hidden + self.dropout(self.proj(attended.transpose(1, 2).reshape(b, n, w)))
        return hidden + self.dropout(self.fc2(F.gelu(self.fc1(self.norm2(hidden)))))


class ReferenceVLA(NormalizationMixin, nn.Module):
    def __init__(self, config: VLAConfig):
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = nn.Conv2d(3, c.width, kernel_size=c.patch_size, stride=c.patch_size)
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
        self.register_normalization(c.action_dim, c.state_dim)
        self.apply(self._init_weights)
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
        """Freeze the patch embedding and its position embeddings."""
        self.patch_embed.requires_grad_(False)
        self.visual_pos.requires_grad_(False)

    def preprocess_images(self, images: Tensor) -> Tensor:
        """uint8 RGB (B, C, S, S, 3) on any device -> float (B * C, 3, S, S) in [-1, 1], camera-major
        within each sample. (B, S, S, 3) is accepted with one camera.

        See :func:`~actdistill_ros.policies.common.camera_batch` for the accepted shapes.
        """
        images = camera_batch(images, self.config.num_cameras, self.config.image_size)
        pixels = images.flatten(0, 1).permute(0, 3, 1, 2).to(self.action_query.dtype) / 255.0
        return pixels * 2.0 - 1.0

    def encode(self, images: Tensor, instructions: list[str], states: Tensor | None = None) -> EncodedObservation:
        c = self.config
        batch, device, dtype = images.shape[0], self.action_query.device, self.action_query.dtype
        if len(instructions) != batch:
            raise ValueError(f"got {len(instructions)} instructions for {batch} images")
        # (B * C, P, W): every camera through the same patch embedding and positions.
        visual = self.patch_embed(self.preprocess_images(images.to(device))).flatten(2).transpose(1, 2)
        visual = visual + self.visual_pos
        if self.camera_embed is not None:
            visual = visual.reshape(batch, c.num_cameras, c.num_patches, c.width) + self.camera_embed[None, :, None]
        visual = visual.reshape(batch, c.num_visual_tokens, c.width)
        text_ids = tokenize_batch(instructions, c.text_vocab_size, c.max_text_tokens).to(device)
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
        return EncodedObservation(torch.cat(parts, 1), torch.cat(valid, 1), self.segment, c.num_tokens - 1)

    def run_layer(self, index: int, hidden: Tensor, attn_mask: Tensor) -> Tensor:
        return self.layers[index](hidden, attn_mask)

    def predict_chunk(self, hidden: Tensor, encoded: EncodedObservation) -> Tensor:
        """Final hidden states -> normalised action chunk (B, H, D)."""
        query = self.final_norm(hidden[:, encoded.action_index])
        return self.action_head(query).view(-1, self.config.chunk_size, self.config.action_dim)

    def layer_flops(self, num_tokens: int) -> float:
        """Matmul FLOPs of one backbone layer for one sample (multiply-add = 2 FLOPs)."""
        n, w, m = num_tokens, self.config.width, self.config.mlp_width
        projections = 2 * n * w * (3 * w) + 2 * n * w * w + 2 * (2 * n * w * m)
        attention = 2 * (2 * n * n * w)  # scores and weighted sum
        return float(projections + attention)

    # ---- plain full-depth use (teacher training) -----------------------------------------
    def forward(self, images: Tensor, instructions: list[str], states: Tensor | None = None) -> Tensor:
        return full_depth_forward(self, images, instructions, states)
