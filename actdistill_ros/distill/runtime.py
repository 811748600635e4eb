"""Training-run plumbing shared by teacher training and distillation: data-parallel context,
a data order that is a pure function of the step (so resuming replays it exactly), atomic
resumable checkpoints in safetensors + JSON (nothing is pickled), and progress/logging.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from actdistill_ros.weights import atomic_write

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistContext:
    """Single process, or DDP under torchrun (gloo on CPU, NCCL on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        log.warning("device 'cuda' requested but CUDA is not available: training on CPU")
    if world_size == 1:
        return DistContext(device=torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return DistContext(rank=dist.get_rank(), world_size=world_size,
                       device=torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def batch_indices(step: int, num_samples: int, batch_size: int, seed: int) -> np.ndarray:
    """Global batch of sample indices for ``step``: consecutive slices of seeded per-epoch
    permutations. A pure function of its arguments, so a resumed run sees the same data."""
    start = step * batch_size
    indices = []
    while len(indices) < batch_size:
        epoch, offset = divmod(start + len(indices), num_samples)
        order = np.random.default_rng([seed, epoch]).permutation(num_samples)
        indices.extend(order[offset: offset + batch_size - len(indices)].tolist())
    return np.asarray(indices)


def shard(indices: np.ndarray, ctx: DistContext) -> np.ndarray:
    """This process's share of a global batch (the global batch must split evenly)."""
    if len(indices) % ctx.world_size:
        raise ValueError(f"batch size {len(indices)} does not split over {ctx.world_size} processes")
    return indices[ctx.rank:: ctx.world_size]


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up (at most a fifth of the run) then cosine decay to 10%."""
    warmup = min(warmup, total // 5)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, progress))))


# ---- checkpoints ---------------------------------------------------------------------------
def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict -> (tensors for safetensors, JSON-able rest). Parameters are keyed by
    index (plain optimizers) or by name (FSDP full optimizer state)."""
    tensors, scalars = {}, {}
    for param_id, slots in state["state"].items():
        for slot, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{param_id}\t{slot}"] = value
            else:
                scalars[f"{param_id}\t{slot}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {}

    def slot_of(name: str) -> tuple:
        param_id, slot = name.split("\t", 1)
        return (int(param_id) if param_id.isdigit() else param_id), slot

    for name, value in tensors.items():
        if name.startswith("optimizer."):
            param_id, slot = slot_of(name[len("optimizer."):])
            state.setdefault(param_id, {})[slot] = value
    for name, value in meta["scalars"].items():
        param_id, slot = slot_of(name)
        state.setdefault(param_id, {})[slot] = value
    return {"state": state, "param_groups": meta["param_groups"]}


class Checkpointer:
    """``<dir>/<stage>.json`` points at ``<dir>/<stage>-<step>.safetensors``; the pointer is
    written last and atomically, so a kill at any moment leaves the previous checkpoint valid."""

    def __init__(self, directory: Path, stage: str):
        self.directory, self.stage = Path(directory), stage
        self.pointer = self.directory / f"{stage}.json"

    def save(self, step: int, model_state: dict[str, torch.Tensor], optimizer_state: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model_state.items()}
        optim_tensors, optim_meta = _flatten_optimizer(optimizer_state)
        tensors.update({k: v.detach().cpu().contiguous().clone() for k, v in optim_tensors.items()})
        tensors["rng.torch"] = torch.get_rng_state()
        weights = self.directory / f"{self.stage}-{step:08d}.safetensors"
        atomic_write(weights, lambda p: save_file(tensors, str(p)))
        meta = {"step": step, "weights": weights.name, "optimizer": optim_meta}
        previous = self.load_meta()
        atomic_write(self.pointer, lambda p: p.write_text(json.dumps(meta)))
        if previous and previous["weights"] != weights.name:
            (self.directory / previous["weights"]).unlink(missing_ok=True)

    def load_meta(self) -> dict | None:
        if not self.pointer.is_file():
            return None
        return json.loads(self.pointer.read_text())

    def restore(self) -> tuple[int, dict[str, torch.Tensor], dict] | None:
        """(step, model state, optimizer state) of the latest checkpoint, with the torch RNG restored."""
        meta = self.load_meta()
        if meta is None:
            return None
        tensors = load_file(str(self.directory / meta["weights"]))
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        torch.set_rng_state(tensors["rng.torch"])
        return meta["step"], model_state, _unflatten_optimizer(tensors, meta["optimizer"])

    def clear(self) -> None:
        meta = self.load_meta()
        if meta:
            (self.directory / meta["weights"]).unlink(missing_ok=True)
        self.pointer.unlink(missing_ok=True)


# ---- progress and logs -----------------------------------------------------------------------
class RunLog:
    """JSONL log (+ TensorBoard events when tensorboard is installed) on the main process."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = Path(out_dir) / "train_log.jsonl"
        self.writer = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:
                pass

    def write(self, stage: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"stage": stage, "step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{stage}/{key}", value, step)

    def truncate_after(self, stage: str, step: int) -> None:
        """On resume, drop records the killed run wrote after its last checkpoint (at ``step``)."""
        if not (self.enabled and self.path.is_file()):
            return
        kept = [line for line in self.path.read_text().splitlines()
                if not (json.loads(line)["stage"] == stage and json.loads(line)["step"] > step)]
        atomic_write(self.path, lambda p: p.write_text("".join(line + "\n" for line in kept)))

    def records(self, stage: str | None = None) -> list[dict]:
        if not self.path.is_file():
            return []
        rows = [json.loads(line) for line in self.path.read_text().splitlines()]
        return [r for r in rows if stage is None or r["stage"] == stage]

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def progress_bar(stage: str, total: int, initial: int, enabled: bool) -> tqdm:
    return tqdm(total=total, initial=initial, desc=stage, unit="step", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, mininterval=1.0)
