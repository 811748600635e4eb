"""Predicted action chunks -> one action per control tick (with optional temporal ensembling)."""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

import numpy as np


def is_finite_chunk(actions: np.ndarray) -> bool:
    """A chunk with any NaN or inf is dropped whole: the model's output cannot be trusted."""
    return bool(np.isfinite(actions).all())


class ChunkScheduler:
    """Hands out one action per control tick from the chunks predicted so far.

    A chunk added with ``start_tick`` s supplies its step k at tick s + k. Without ensembling the
    newest chunk is followed alone. With temporal ensembling (ACT, Zhao et al. 2023) every chunk
    that covers the tick contributes, weighted exp(-decay * i) with i = 0 for the oldest: a
    larger decay trusts earlier predictions more, 0 is a plain average. Each chunk may carry a
    ``source`` (what it was computed from) for ``drop_where``.
    """

    def __init__(self, temporal_ensemble: bool = False, decay: float = 0.01):
        self.temporal_ensemble = temporal_ensemble
        self.decay = float(decay)
        self._chunks: deque[tuple[int, np.ndarray, Any]] = deque()

    def add(self, actions: np.ndarray, start_tick: int, source: Any = None) -> None:
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim != 2 or actions.shape[0] == 0:
            raise ValueError(f"an action chunk must have shape (H>0, D), got {actions.shape}")
        if not self.temporal_ensemble:
            self._chunks.clear()
        self._chunks.append((int(start_tick), actions, source))

    def clear(self) -> None:
        self._chunks.clear()

    def drop_where(self, predicate: Callable[[Any], bool]) -> int:
        """Remove the chunks whose ``source`` satisfies ``predicate``; returns how many."""
        kept = deque(entry for entry in self._chunks if not predicate(entry[2]))
        dropped = len(self._chunks) - len(kept)
        self._chunks = kept
        return dropped

    def __len__(self) -> int:
        return len(self._chunks)

    def newest(self) -> np.ndarray:
        return self._chunks[-1][1]

    def newest_start(self) -> int:
        return self._chunks[-1][0]

    def replace_newest(self, actions: np.ndarray) -> None:
        """Swap the newest chunk's actions (e.g. after rate-limiting it as a whole trajectory)."""
        start, _, source = self._chunks[-1]
        self._chunks[-1] = (start, np.asarray(actions, dtype=np.float64), source)

    def action_at(self, tick: int) -> np.ndarray | None:
        """The action for ``tick``, or None when no chunk covers it (hold)."""
        while self._chunks and tick - self._chunks[0][0] >= len(self._chunks[0][1]):
            self._chunks.popleft()  # fully executed
        covering = [chunk[tick - start] for start, chunk, _ in self._chunks if 0 <= tick - start < len(chunk)]
        if not covering:
            return None
        if len(covering) == 1:
            return covering[0].copy()
        weights = np.exp(-self.decay * np.arange(len(covering)))
        return np.average(np.stack(covering), axis=0, weights=weights)
