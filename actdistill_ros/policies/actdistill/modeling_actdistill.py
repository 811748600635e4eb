"""The routed student of ActDistill.

Gating is residual-consistent (METHOD.md, "we fix"): a layer's update is
``h <- h + m * (F(h) - h)``. In training ``m`` is the soft gate ``g`` or a straight-through hard
mask ``1[g >= tau]`` (forward) with the gradient of ``g`` (backward); at inference ``m`` is the
hard mask and a layer with ``m = 0`` is simply not run. With hard masks both compute the same
function, so what was trained is what runs on the robot.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from actdistill_ros.policies.actdistill.configuration_actdistill import RouterConfig
from actdistill_ros.policies.vla.modeling_vla import LANGUAGE, VISUAL, EncodedObservation, ReferenceVLA


def _masked_mean_max(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean and max over the tokens where ``mask`` is True: (B, N, r), (B, N) -> (B, 2r).

    A sample with no such token (an empty instruction) pools to zeros.
    """
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    count = weights.sum(1).clamp_min(1.0)
    mean = (tokens * weights).sum(1) / count
    maximum = tokens.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
    maximum = torch.where(mask.any(1, keepdim=True), maximum, torch.zeros_like(maximum))
    return torch.cat([mean, maximum], dim=-1)


class LayerRouter(nn.Module):
    """Per-sample gates g_1..g_L in (0, 1), decided once from the layer-0 tokens."""

    def __init__(self, model_width: int, num_layers: int, config: RouterConfig):
        super().__init__()
        r = config.width
        self.visual_proj = nn.Sequential(nn.Linear(model_width, r), nn.LayerNorm(r))
        self.language_proj = nn.Sequential(nn.Linear(model_width, r), nn.LayerNorm(r))
        self.dropout = nn.Dropout(config.dropout)
        # Row l of this Linear(4r -> L) is the per-layer Linear(4r -> 1) of the method.
        self.gate = nn.Linear(4 * r, num_layers)
        nn.init.normal_(self.gate.weight, std=0.01)
        nn.init.constant_(self.gate.bias, config.init_gate_logit)

    def forward(self, encoded: EncodedObservation) -> Tensor:
        tokens = encoded.tokens
        visual = _masked_mean_max(self.visual_proj(tokens), encoded.modality_mask(VISUAL))
        language = _masked_mean_max(self.language_proj(tokens), encoded.modality_mask(LANGUAGE))
        pooled = self.dropout(torch.cat([visual, language], dim=-1))
        return torch.sigmoid(self.gate(pooled).float())

    @torch.no_grad()
    def bias_to_keep(self, keep: float) -> None:
        """Make an untrained router keep about ``keep`` of the layers at threshold 0.5.

        Used by benchmarks and tests before any distillation: kept layers are spread evenly
        over depth, and every gate gets a distinct value so the executed count is monotone in tau.
        """
        num_layers = self.gate.out_features
        num_kept = round(keep * num_layers)
        kept = set(torch.linspace(num_layers - 1, 0, num_kept).round().long().tolist()) if num_kept else set()
        # Distinct logits: kept layers in [0.5, 2.5], skipped layers in [-2.5, -0.5].
        logits = torch.empty(num_layers)
        kept_rank = skipped_rank = 0
        for layer in range(num_layers):
            if layer in kept:
                logits[layer] = 0.5 + 2.0 * kept_rank / max(1, num_kept - 1)
                kept_rank += 1
            else:
                logits[layer] = -0.5 - 2.0 * skipped_rank / max(1, num_layers - num_kept - 1)
                skipped_rank += 1
        self.gate.bias.copy_(logits)


def straight_through_mask(gates: Tensor, threshold: float) -> Tensor:
    """Forward: 1[g >= tau]. Backward: the gradient of g."""
    hard = (gates >= threshold).to(gates.dtype)
    return hard + gates - gates.detach()


def run_backbone(vla: ReferenceVLA, encoded: EncodedObservation, execute: Tensor | None) -> Tensor:
    """Inference through the backbone, running layer l only for the samples with execute[:, l].

    Samples that skip a layer keep their hidden state untouched and cost nothing; a batch whose
    samples take different routes gives each sample what it would get alone.
    """
    hidden, mask = encoded.tokens, encoded.attention_mask()
    for layer in range(vla.num_layers):
        if execute is None:
            hidden = vla.run_layer(layer, hidden, mask)
            continue
        runs = execute[:, layer]
        if bool(runs.all()):
            hidden = vla.run_layer(layer, hidden, mask)
        elif bool(runs.any()):
            rows = runs.nonzero().squeeze(1)
            hidden = hidden.index_copy(0, rows, vla.run_layer(layer, hidden[rows], mask[rows]))
    return hidden


class RoutedStudent(nn.Module):
    """A copy of the teacher's weights plus a :class:`LayerRouter`."""

    def __init__(self, vla: ReferenceVLA, router_config: RouterConfig):
        super().__init__()
        self.vla = vla
        self.router_config = router_config
        self.router = LayerRouter(vla.config.width, vla.num_layers, router_config)
        self.threshold = router_config.default_threshold

    @classmethod
    def derive_from(cls, teacher: ReferenceVLA, router_config: RouterConfig) -> "RoutedStudent":
        """Self-derived student: same architecture, same initial weights as the teacher."""
        vla = copy.deepcopy(teacher)
        vla.train(teacher.training)
        for param in vla.parameters():
            param.requires_grad_(True)
        return cls(vla, router_config).to(next(teacher.parameters()).device)

    def execute_mask(self, encoded: EncodedObservation, threshold: float | None = None) -> tuple[Tensor, Tensor]:
        """Gates (B, L) and the layers to run, gates >= tau (B, L) bool."""
        gates = self.router(encoded)
        return gates, gates >= (self.threshold if threshold is None else threshold)

    def forward_train(self, encoded: EncodedObservation, gate_mode: str) -> tuple[list[Tensor], Tensor, Tensor]:
        """Every layer computed (for gradients), then gated residually.

        Returns the hidden state after each layer, the gates g (B, L) and the masks m (B, L) that
        were applied. ``gate_mode`` is "soft" (m = g) or "hard" (straight-through 1[g >= tau]).
        """
        if gate_mode not in ("soft", "hard"):
            raise ValueError(f"gate_mode must be 'soft' or 'hard', got {gate_mode!r}")
        gates = self.router(encoded)
        masks = gates if gate_mode == "soft" else straight_through_mask(gates, self.threshold)
        hidden, attn_mask, hiddens = encoded.tokens, encoded.attention_mask(), []
        for layer in range(self.vla.num_layers):
            update = self.vla.run_layer(layer, hidden, attn_mask) - hidden
            hidden = hidden + masks[:, layer, None, None].to(hidden.dtype) * update
            hiddens.append(hidden)
        return hiddens, gates, masks

    def forward(self, images: Tensor, instructions: list[str], states: Tensor | None = None) -> Tensor:
        """Routed inference with hard skips: normalised action chunk (B, H, D)."""
        encoded = self.vla.encode(images, instructions, states)
        _, execute = self.execute_mask(encoded)
        return self.vla.predict_chunk(run_backbone(self.vla, encoded, execute), encoded)
