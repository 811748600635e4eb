"""Hyperparameters of teacher training and ActDistill (METHOD.md). `config/distill.yaml` mirrors
these fields with a comment each; CLI flags override the YAML."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass
class TrainConfig:
    """Optimisation of one training stage."""

    steps: int = 2000
    batch_size: int = 32  # global batch, split over data-parallel processes
    lr: float = 3e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 100

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size <= 0 or self.lr <= 0 or self.grad_clip <= 0:
            raise ValueError(f"invalid training settings {self}")


@dataclass
class DistillConfig:
    # --- graph-informed heads ---
    graph_width: int = 128  # node / semantic-vector width (paper: 512 at model width 4096)
    graph_top_k: int = 8  # neighbours kept per node
    graph_heads: int = 4
    graph_dropout: float = 0.1
    # --- losses ---
    gamma: float = 2.0  # depth weights w_l = (l/(L-1))^gamma
    eta: float = 0.5  # relational (BxB cosine matrix) weight inside the semantic loss
    alpha: float = 1.0  # semantic stream weight
    beta: float = 1.0  # action stream (triple MSE) weight
    lambda_balance: float = 0.5  # variance across layers of the batch-mean gate
    lambda_budget: float = 4.0  # (executed fraction - target_keep)^2
    target_keep: float = 0.5  # rho: fraction of backbone layers the student should execute
    # --- gating ---
    router_lr_scale: float = 30.0  # the router is new (not from the teacher): it learns faster
    router_dropout: float = 0.1  # dropout on the router's pooled features
    threshold: float = 0.5  # tau used in training (hard masks) and written as the card default
    soft_gate_fraction: float = 0.2  # first part of stage 2 uses soft gates m = g, then straight-through
    # --- one student across budgets (keep routing; METHOD.md "Beyond the paper") ---
    # Each step draws k uniformly from round(lo*L)..round(hi*L), tells the router keep = k/L and trains
    # the top-k routes it picks; the card then defaults to keep routing at target_keep. None: the
    # paper's single-threshold stage 2 (unconditioned router, threshold routes, budget target_keep).
    keep_range: list[float] | None = dataclasses.field(default_factory=lambda: [0.25, 1.0])
    # With keep_range: this fraction of the hard-gate steps trains the threshold routes instead, at
    # the same drawn budget, so that threshold routing also runs routes it was trained on.
    threshold_route_fraction: float = 0.2
    # --- the static recipe (flow-matching teachers): "first" or "even" trains a student with a fixed
    # route of num_kept_layers(target_keep) routed layers (the first ones, or evenly spaced), same
    # steps and losses less the router's; None: the routed student.
    static_layers: str | None = None
    # With static_layers: a dropped VLM layer takes its paired expert layer with it (the published
    # static recipe; kv_mode skip_expert), and the number of kept pairs is the one whose chunk FLOPs
    # come nearest to the routed student's at target_keep (equal compute, not equal layer count).
    static_drop_expert: bool = False
    # --- stages ---
    probe: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(steps=300, lr=1e-3))
    distill: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(steps=600, lr=1e-4))
    teacher_targets: str = "cache"  # "cache": record teacher s_l, a_l per sample key once; "on_the_fly"
    freeze_vision: bool = False  # keep the patch embedding frozen in stage 2
    # --- bookkeeping ---
    seed: int = 0
    val_fraction: float = 0.1  # held-out episodes for the card's metrics
    checkpoint_every: int = 100  # steps; a killed run loses at most this much
    log_every: int = 10
    amp_bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    # Under torchrun, shard the student's parameters, gradients and AdamW state over processes
    # (FSDP) instead of replicating them (DDP): for students that do not fit one GPU.
    fsdp: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.probe, dict):
            self.probe = TrainConfig(**self.probe)
        if isinstance(self.distill, dict):
            self.distill = TrainConfig(**self.distill)
        if not 0.0 < self.target_keep <= 1.0:
            raise ValueError(f"target_keep must be in (0, 1], got {self.target_keep}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.keep_range is not None:
            if (not isinstance(self.keep_range, (list, tuple)) or len(self.keep_range) != 2
                    or not 0.0 < self.keep_range[0] <= self.keep_range[1] <= 1.0):
                raise ValueError(f"keep_range must be [low, high] with 0 < low <= high <= 1, or null, "
                                 f"got {self.keep_range!r}")
            self.keep_range = [float(v) for v in self.keep_range]
            if not self.keep_range[0] <= self.target_keep <= self.keep_range[1]:
                raise ValueError(f"target_keep {self.target_keep} (the card's default keep) must lie in "
                                 f"keep_range {self.keep_range}")
        if self.static_layers not in (None, "first", "even"):
            raise ValueError(f"static_layers must be 'first', 'even' or null, got {self.static_layers!r}")
        if self.static_drop_expert and self.static_layers is None:
            raise ValueError("static_drop_expert needs static_layers ('first' or 'even'): it is the static recipe's")
        if not 0.0 <= self.threshold_route_fraction <= 1.0:
            raise ValueError(f"threshold_route_fraction must be in [0, 1], got {self.threshold_route_fraction}")
        if not 0.0 <= self.soft_gate_fraction <= 1.0:
            raise ValueError(f"soft_gate_fraction must be in [0, 1], got {self.soft_gate_fraction}")
        if self.teacher_targets not in ("cache", "on_the_fly"):
            raise ValueError(f"teacher_targets must be 'cache' or 'on_the_fly', got {self.teacher_targets!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.checkpoint_every <= 0 or self.log_every <= 0:
            raise ValueError("checkpoint_every and log_every must be positive")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "distill config") -> "DistillConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; expected some of {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: dict | None = None) -> "DistillConfig":
        data: dict = {}
        if path is not None:
            loaded = yaml.safe_load(Path(path).read_text())
            if loaded is not None and not isinstance(loaded, dict):
                raise ValueError(f"{path}: expected a YAML mapping of distillation settings")
            data = loaded or {}
        for key, value in (overrides or {}).items():  # "distill.lr" style keys reach nested stages
            if value is None:
                continue
            head, _, tail = key.partition(".")
            if tail:
                data.setdefault(head, {})[tail] = value
            else:
                data[key] = value
        return cls.from_dict(data, source=str(path or "distill config"))
