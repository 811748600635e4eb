"""The routed student of ActDistill.

Gating is residual-consistent (METHOD.md, "we fix"): a layer's update is
``h <- h + m * (F(h) - h)``. In training ``m`` is the soft gate ``g`` or a straight-through hard
mask ``1[g >= tau]`` (forward) with the gradient of ``g`` (backward); at inference ``m`` is the
hard mask and a layer with ``m = 0`` is simply not run. With hard masks both compute the same
function, so what was trained is what runs on the robot.

Two routings read the same gates: threshold routing runs the layers with ``g >= tau``; keep
routing runs, for each observation, the ``k = max(1, round(keep * L))`` layers with the highest gates, so
its compute is exact. The router only reads ``vla.config.width``, ``vla.num_layers`` and the
modality masks of the encoded observation, and the backbone is driven through ``vla.run_layer``,
so any :class:`~actdistill_ros.policies.teacher.DistillableVLA` can be routed.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from actdistill_ros.policies.actdistill.configuration_actdistill import RouterConfig
from actdistill_ros.policies.observation import ACTION_QUERY, LANGUAGE, VISUAL, EncodedObservation

if TYPE_CHECKING:
    from actdistill_ros.policies.teacher import DistillableVLA

# A budget-conditioned router sees the keep fraction as cos(pi * j * keep), j = 1..8: a smooth
# basis in which each layer's gate logit can learn its own dependence on the budget. Adam moves
# each weight by about the learning rate per step, so the basis is scaled x4: at the router's
# learning rate the budget path can then shift a logit by the few units between keep 0.25 and 1
# within about a hundred steps, instead of several hundred.
BUDGET_FEATURES = 8
BUDGET_FEATURE_SCALE = 4.0


def _masked_mean_max(tokens: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Mean and max over the tokens where ``mask`` is True (all of them if it is None):
    (B, n, r), (B, n) -> two (B, r). A sample with no such token (an empty instruction) pools to zeros.
    """
    if tokens.shape[1] == 0:
        zeros = tokens.new_zeros(tokens.shape[0], tokens.shape[2])
        return zeros, zeros
    if mask is None:
        return tokens.mean(1), tokens.amax(1)
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    mean = (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    maximum = (tokens + weights.log()).amax(1)  # log 0 = -inf: masked tokens never win
    return mean, maximum.nan_to_num(neginf=0.0)  # -inf only where no token was valid


def budget_features(keep: float | Tensor) -> Tensor:
    """scale * cos(pi * j * keep), j = 1..BUDGET_FEATURES: (F,) for a float (on the CPU), (B, F)
    for a (B,) tensor (on its device)."""
    if not isinstance(keep, Tensor):
        return _budget_features_of(float(keep))
    frequencies = torch.arange(1, BUDGET_FEATURES + 1, dtype=torch.float32, device=keep.device)
    return BUDGET_FEATURE_SCALE * torch.cos(math.pi * keep.float()[..., None] * frequencies)


@functools.lru_cache(maxsize=64)
def _budget_features_of(keep: float) -> Tensor:
    """A dial position's features, made once: at inference the keep fraction takes a few values.
    Made outside inference mode, so that a training step may use them after a prediction did."""
    with torch.inference_mode(False):
        return budget_features(torch.tensor(keep))


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
        # Budget conditioning adds a learned function of the keep fraction to each layer's logit.
        # It starts at zero, so the conditioned router starts as the unconditioned one.
        self.budget_gate = nn.Linear(BUDGET_FEATURES, num_layers, bias=False) if config.budget_conditioned else None
        if self.budget_gate is not None:
            nn.init.zeros_(self.budget_gate.weight)

    def forward(self, encoded: EncodedObservation, keep: float | Tensor | None = None, dropout: bool = True) -> Tensor:
        """Gates (B, L). ``keep``: the budget, required by a budget-conditioned router (ignored
        otherwise). ``dropout=False`` gives, in train mode, exactly the gates of eval mode."""
        # Each branch projects only its own modality's tokens (views, no masks over all tokens):
        # the router runs on every observation, so its fixed cost counts against the skipped layers.
        visual_tokens, visual_valid = encoded.modality_tokens(VISUAL)
        language_tokens, language_valid = encoded.modality_tokens(LANGUAGE)
        pooled = torch.cat([*_masked_mean_max(self.visual_proj(visual_tokens), visual_valid),
                            *_masked_mean_max(self.language_proj(language_tokens), language_valid)], dim=-1)
        logits = self.gate(self.dropout(pooled) if dropout and self.training else pooled)
        if self.budget_gate is not None:
            if keep is None:
                raise ValueError("this router is budget-conditioned: pass the keep fraction it should plan for")
            # Built on the host and copied without blocking: a blocking copy would sync the GPU.
            features = budget_features(keep).to(logits.device, self.budget_gate.weight.dtype, non_blocking=True)
            logits = logits + self.budget_gate(features)
        return torch.sigmoid(logits.float())

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


def straight_through(hard: Tensor, gates: Tensor) -> Tensor:
    """Forward: the 0/1 decisions ``hard``. Backward: the gradient of the gates."""
    return hard.to(gates.dtype) + gates - gates.detach()


def num_kept_layers(keep_fraction: float, num_layers: int) -> int:
    """k = max(1, round(keep * L)): the layers keep routing runs per observation (Python's round: a
    half goes to the even integer)."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep fraction must be in (0, 1], got {keep_fraction!r}")
    return max(1, min(num_layers, round(keep_fraction * num_layers)))


def top_k_mask(gates: Tensor, k: int) -> Tensor:
    """(B, L) bool: each row's k highest gates; equal gates go to the lower layer index."""
    order = torch.sort(gates, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(gates, dtype=torch.bool).scatter_(-1, order, True)


def run_backbone(vla: DistillableVLA, encoded: EncodedObservation, execute: Tensor | None) -> Tensor:
    """Inference through the backbone, running layer l only for the samples with execute[:, l]:
    the final hidden states at the readout positions (B, R, W), for ``vla.predict_chunk``.

    Samples that skip a layer keep their hidden state untouched and cost nothing, and the last
    layer a sample runs computes only its readout positions, all the head reads. A batch whose
    samples take different routes gives each sample what it would get alone. The route is read
    on the host once, so on a GPU routing costs one host sync per call, not one per layer, and
    none when ``execute`` is already on the host (``Policy`` copies it there with the gates).
    """
    hidden, mask, span = encoded.tokens, encoded.attention_mask(), encoded.readout_span
    num_layers = vla.num_layers
    if execute is None:
        for layer in range(num_layers - 1):
            hidden = vla.run_layer(layer, hidden, mask)
        return vla.run_layer(num_layers - 1, hidden, mask, span)
    plan = execute.to("cpu").tolist()  # the one device -> host sync; the rest is host bookkeeping
    batch = len(plan)
    last = [max((layer for layer, runs in enumerate(row) if runs), default=-1) for row in plan]
    # Per layer, the samples that run it at every position, and those for which it is the last.
    through = [[i for i in range(batch) if plan[i][layer] and layer < last[i]] for layer in range(num_layers)]
    ending = [[i for i in range(batch) if last[i] == layer] for layer in range(num_layers)]
    runs_through, runs_ending = [len(rows) for rows in through], [len(rows) for rows in ending]
    # Those rows, layer-major, sent to the device in one copy that does not block; needed only when
    # a layer runs for part of the batch.
    mixed = any(0 < runs < batch for runs in runs_through + runs_ending)
    rows = torch.tensor([i for group in (through, ending) for rows in group for i in rows],
                        dtype=torch.long).to(hidden.device, non_blocking=True) if mixed else None
    readout = hidden[:, span]  # a sample that runs no layer reads its layer-0 tokens
    start_through, start_ending = 0, sum(runs_through)
    for layer in range(num_layers):
        ends, goes_on = runs_ending[layer], runs_through[layer]
        if ends == batch:
            readout = vla.run_layer(layer, hidden, mask, span)
        elif ends:
            part = rows[start_ending:start_ending + ends]
            readout = readout.index_copy(0, part, vla.run_layer(layer, hidden[part], mask[part], span))
        if goes_on == batch:
            hidden = vla.run_layer(layer, hidden, mask)
        elif goes_on:
            part = rows[start_through:start_through + goes_on]
            hidden = hidden.index_copy(0, part, vla.run_layer(layer, hidden[part], mask[part]))
        start_through, start_ending = start_through + goes_on, start_ending + ends
    return readout


def backbone_flops(vla: DistillableVLA, executed_layers: int) -> float:
    """FLOPs of :func:`run_backbone` for one sample that runs ``executed_layers`` layers: full layers
    but the last, which computes the readout positions only."""
    if executed_layers == 0:
        return 0.0
    num_tokens, span = vla.config.num_tokens, vla.segment_spans[ACTION_QUERY]
    return (executed_layers - 1) * vla.layer_flops(num_tokens) + vla.layer_flops(num_tokens, span.stop - span.start)


class TrainRoutes(NamedTuple):
    """The routing of a training step (all (B, L))."""

    gates: Tensor  # train-mode gates (router dropout on): the gradient path
    masks: Tensor  # applied to the layer updates: soft gates, or the eval-mode routes, straight-through
    threshold_masks: Tensor  # 1[eval-mode gate >= tau], straight-through: what threshold routing runs


class RoutedStudent(nn.Module):
    """A copy of the teacher's weights plus a :class:`LayerRouter`.

    ``keep_fraction`` > 0 selects keep routing (top-k layers by gate per observation); 0 selects
    threshold routing at ``threshold``.
    """

    def __init__(self, vla: DistillableVLA, router_config: RouterConfig):
        super().__init__()
        self.vla = vla
        self.router_config = router_config
        self.router = LayerRouter(vla.config.width, vla.num_layers, router_config)
        self.threshold = router_config.default_threshold
        self.keep_fraction = 0.0

    @classmethod
    def derive_from(cls, teacher: DistillableVLA, router_config: RouterConfig) -> "RoutedStudent":
        """Self-derived student: same architecture, same initial weights as the teacher."""
        vla = copy.deepcopy(teacher)
        vla.train(teacher.training)
        for param in vla.parameters():
            param.requires_grad_(True)
        return cls(vla, router_config).to(next(teacher.parameters()).device)

    def _budget(self, keep_fraction: float) -> float:
        """What a budget-conditioned router is told: the keep fraction asked for, or in threshold
        routing the budget its threshold was calibrated for."""
        return keep_fraction if keep_fraction > 0 else self.router_config.threshold_keep

    def execute_mask(self, encoded: EncodedObservation, threshold: float | None = None,
                     keep_fraction: float | None = None) -> tuple[Tensor, Tensor]:
        """Gates (B, L) and the layers to run (B, L) bool, under the student's routing unless
        ``threshold`` / ``keep_fraction`` override it (a keep fraction > 0 selects keep routing)."""
        keep = self.keep_fraction if keep_fraction is None else keep_fraction
        gates = self.router(encoded, self._budget(keep))
        if keep > 0:
            return gates, top_k_mask(gates, num_kept_layers(keep, self.vla.num_layers))
        return gates, gates >= (self.threshold if threshold is None else threshold)

    def train_routes(self, encoded: EncodedObservation, gate_mode: str, keep_fraction: float = 0.0) -> TrainRoutes:
        """Routing for a training step. ``gate_mode`` "soft": m = g; "hard": the routes the eval-mode
        router picks (top-k at ``keep_fraction`` > 0, else threshold), straight-through.

        The hard decisions come from a dropout-free pass of the router, so the routes trained on
        are the routes that run; the gradient still flows through the train-mode gates.
        """
        if gate_mode not in ("soft", "hard"):
            raise ValueError(f"gate_mode must be 'soft' or 'hard', got {gate_mode!r}")
        budget = self._budget(keep_fraction)
        gates = self.router(encoded, budget)
        if self.router.training:
            with torch.no_grad():
                decision = self.router(encoded, budget, dropout=False)
        else:
            decision = gates.detach()
        threshold_masks = straight_through(decision >= self.threshold, gates)
        if gate_mode == "soft":
            masks = gates
        elif keep_fraction > 0:
            masks = straight_through(top_k_mask(decision, num_kept_layers(keep_fraction, self.vla.num_layers)), gates)
        else:
            masks = threshold_masks
        return TrainRoutes(gates, masks, threshold_masks)

    def gated_layers(self, encoded: EncodedObservation, masks: Tensor) -> list[Tensor]:
        """Every layer computed (for gradients), then gated residually: h <- h + m (F(h) - h).
        Returns the hidden state after each layer."""
        hidden, attn_mask, hiddens = encoded.tokens, encoded.attention_mask(), []
        for layer in range(self.vla.num_layers):
            update = self.vla.run_layer(layer, hidden, attn_mask) - hidden
            hidden = hidden + masks[:, layer, None, None].to(hidden.dtype) * update
            hiddens.append(hidden)
        return hiddens

    def forward(self, images: Tensor, instructions: list[str], states: Tensor | None = None) -> Tensor:
        """Routed inference with hard skips: normalised action chunk (B, H, D)."""
        encoded = self.vla.encode(images, instructions, states)
        _, execute = self.execute_mask(encoded)
        return self.vla.predict_chunk(run_backbone(self.vla, encoded, execute))
