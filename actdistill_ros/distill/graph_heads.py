"""Graph-informed per-layer heads (training only; METHOD.md, "Graph-informed head").

For one layer's hidden states: project tokens to a small width, connect each token to its top-k
most similar tokens, run two graph-attention layers, pool the nodes with attention into a
semantic vector s_l, and probe an action chunk a_l from it. These model how the action
prediction evolves with depth and supervise the student layer by layer; export drops them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TopKGraphAttention(nn.Module):
    """One GAT layer over the top-k graph, with the edge weights as a log-prior on attention.

    Computed densely with non-edges masked: token graphs are small (tens of nodes), and dense
    einsums are much faster on CPU than gathering k neighbours per node.
    """

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"graph width {width} must be divisible by {heads} heads")
        self.heads, self.head_width = heads, width // heads
        self.value = nn.Linear(width, width, bias=False)
        self.attend_self = nn.Parameter(torch.empty(heads, self.head_width))
        self.attend_neighbour = nn.Parameter(torch.empty(heads, self.head_width))
        nn.init.normal_(self.attend_self, std=0.1)
        nn.init.normal_(self.attend_neighbour, std=0.1)
        self.norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, nodes: Tensor, edge_log_prior: Tensor) -> Tensor:
        """nodes (B, N, d); edge_log_prior (B, N, N): log edge weight, -inf where no edge."""
        b, n, _ = nodes.shape
        values = self.value(nodes).view(b, n, self.heads, self.head_width)
        logits = ((values * self.attend_self).sum(-1).unsqueeze(2)  # (B, N, 1, heads): node i
                  + (values * self.attend_neighbour).sum(-1).unsqueeze(1))  # (B, 1, N, heads): neighbour j
        logits = F.leaky_relu(logits, 0.2) + edge_log_prior.unsqueeze(-1)
        alpha = self.dropout(torch.softmax(logits, dim=2))
        update = torch.einsum("bijh,bjhd->bihd", alpha, values).reshape(b, n, -1)
        return self.norm(nodes + self.dropout(F.elu(update)))


class GraphInformedHead(nn.Module):
    """Layer hidden states -> (semantic vector s_l, action-chunk probe a_l)."""

    def __init__(self, model_width: int, width: int, top_k: int, heads: int, dropout: float,
                 chunk_size: int, action_dim: int):
        super().__init__()
        self.top_k, self.chunk_size, self.action_dim = top_k, chunk_size, action_dim
        self.project = nn.Sequential(nn.LayerNorm(model_width), nn.Linear(model_width, width))
        self.edge_query = nn.Linear(width, width, bias=False)
        self.edge_key = nn.Linear(width, width, bias=False)
        self.gat = nn.ModuleList(TopKGraphAttention(width, heads, dropout) for _ in range(2))
        self.pool_score = nn.Linear(width, 1)
        self.semantic = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.probe = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, chunk_size * action_dim))

    def forward(self, hidden: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """hidden (B, N, W), valid (B, N) bool -> s (B, width), a (B, H, D) normalised."""
        nodes = self.project(hidden.float())
        d = nodes.shape[-1]
        # Edges: top-k by scaled dot product of two projections; softmax over the k kept, with the
        # 1/sqrt(d) scale and max subtraction that keep it finite (the research code overflowed).
        similarity = self.edge_query(nodes) @ self.edge_key(nodes).transpose(1, 2) / math.sqrt(d)
        similarity = similarity.masked_fill(~valid[:, None, :], float("-inf"))
        k = min(self.top_k, nodes.shape[1])
        top_values, neighbours = similarity.topk(k, dim=-1)
        top_values = top_values - top_values.amax(-1, keepdim=True)
        edge_weights = torch.softmax(top_values, dim=-1)  # padded neighbours (-inf) get weight 0
        edge_log_prior = torch.full_like(similarity, float("-inf")).scatter(
            -1, neighbours, edge_weights.clamp_min(1e-9).log())
        # With fewer valid tokens than k, top-k also picks padding: those edges must not exist.
        edge_log_prior = edge_log_prior.masked_fill(~valid[:, None, :], float("-inf"))
        for layer in self.gat:
            nodes = layer(nodes, edge_log_prior)
        scores = self.pool_score(nodes).squeeze(-1).masked_fill(~valid, float("-inf"))
        pooled = (torch.softmax(scores, dim=-1).unsqueeze(-1) * nodes).sum(1)
        semantic = self.semantic(pooled)
        action = self.probe(semantic).view(-1, self.chunk_size, self.action_dim)
        return semantic, action


class LayerHeads(nn.Module):
    """One :class:`GraphInformedHead` per backbone layer."""

    def __init__(self, num_layers: int, model_width: int, width: int, top_k: int, heads: int, dropout: float,
                 chunk_size: int, action_dim: int):
        super().__init__()
        self.heads = nn.ModuleList(
            GraphInformedHead(model_width, width, top_k, heads, dropout, chunk_size, action_dim)
            for _ in range(num_layers))

    def forward(self, hiddens: list[Tensor], valid: Tensor) -> tuple[Tensor, Tensor]:
        """Per-layer hidden states -> semantic vectors (L, B, width), action probes (L, B, H, D)."""
        outputs = [head(hidden, valid) for head, hidden in zip(self.heads, hiddens)]
        return torch.stack([s for s, _ in outputs]), torch.stack([a for _, a in outputs])
