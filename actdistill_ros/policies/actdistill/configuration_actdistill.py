"""Configuration of the ActDistill router (METHOD.md, "Router")."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class RouterConfig:
    # Projection width r of the visual / language pooling branches (the paper: 512 at width 4096).
    width: int = 128
    dropout: float = 0.1
    # Router threshold tau: layer l runs when its gate g_l >= tau. The run-time accuracy/compute knob.
    default_threshold: float = 0.5
    # Initial gate logit of every layer. A large value starts the student as the teacher
    # (every gate ~ sigmoid(3) = 0.95); the compute-budget loss then learns what to skip.
    init_gate_logit: float = 3.0
    # Condition the gates on the requested keep fraction (a budget input), so one student serves
    # the whole keep dial and its gate ranking may differ between budgets. Off in routers trained
    # for a single threshold (and in every card written before this option existed).
    budget_conditioned: bool = False
    # The budget a conditioned router is told in threshold routing: training calibrates its gates
    # so that thresholding at default_threshold executes about this fraction of the layers.
    threshold_keep: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.width, int) or self.width <= 0:
            raise ValueError(f"RouterConfig.width must be a positive integer, got {self.width!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"RouterConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.default_threshold <= 1.0:
            raise ValueError(f"RouterConfig.default_threshold must be in [0, 1], got {self.default_threshold!r}")
        if not 0.0 < self.threshold_keep <= 1.0:
            raise ValueError(f"RouterConfig.threshold_keep must be in (0, 1], got {self.threshold_keep!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RouterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown RouterConfig fields {unknown}")
        return cls(**data)
