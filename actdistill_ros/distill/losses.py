"""ActDistill losses (METHOD.md, "Losses"). Layers are indexed 0..L-1; all actions normalised."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def depth_weights(num_layers: int, gamma: float) -> Tensor:
    """w_l = (l / (L-1))^gamma, normalised to mean 1: deep layers dominate."""
    if num_layers == 1:
        return torch.ones(1)
    weights = (torch.arange(num_layers, dtype=torch.float32) / (num_layers - 1)) ** gamma
    return weights / weights.mean()


def masked_mse(prediction: Tensor, target: Tensor, chunk_valid: Tensor) -> Tensor:
    """Training MSE over (B, H, D) action chunks; steps padded past the episode end count as zero.

    Divided by the full B*H*D (not the number of real steps), so every sample weighs the same and
    the mean over data-parallel shards equals the mean over the global batch.
    """
    mask = chunk_valid.unsqueeze(-1).to(prediction.dtype)
    return ((prediction - target) ** 2 * mask).mean()


def valid_step_mse(prediction: Tensor, target: Tensor, chunk_valid: Tensor) -> tuple[float, float]:
    """(sum of squared errors over real chunk steps, number of real values): for held-out metrics."""
    mask = chunk_valid.unsqueeze(-1).to(prediction.dtype)
    return float(((prediction - target) ** 2 * mask).sum()), float(mask.sum()) * prediction.shape[-1]


def semantic_loss(student: Tensor, teacher: Tensor, eta: float) -> Tensor:
    """Per layer: mean_b (1 - cos(s^S, s^T)) + eta * MSE(C^S, C^T), C = BxB cosine matrix. -> (L,)"""
    align = (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean(-1)
    s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    structure = ((s @ s.transpose(1, 2) - t @ t.transpose(1, 2)) ** 2).mean((-1, -2))
    return align + eta * structure


def triple_action_loss(student: Tensor, teacher: Tensor, ground_truth: Tensor, chunk_valid: Tensor) -> Tensor:
    """Per layer: MSE(a^S_l, a*) + MSE(a^S_l, a^T_l) + MSE(a^S_l, stopgrad(a^S_{l-1})), a^S_{-1} = 0. -> (L,)"""
    previous = torch.cat([torch.zeros_like(student[:1]), student[:-1].detach()])
    return torch.stack([masked_mse(s, ground_truth, chunk_valid) + masked_mse(s, t, chunk_valid)
                        + masked_mse(s, p, chunk_valid) for s, t, p in zip(student, teacher, previous)])


def balance_loss(gates: Tensor) -> Tensor:
    """Variance across layers of the batch-mean gate: no layer may hog or starve."""
    return gates.mean(0).var(unbiased=False)


def budget_loss(gates: Tensor, target_keep: float) -> Tensor:
    """(mean gate - rho)^2: pushes the expected executed-layer fraction to the target."""
    return (gates.mean() - target_keep) ** 2
