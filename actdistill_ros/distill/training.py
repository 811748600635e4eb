"""The training loop shared by teacher training and both ActDistill stages.

Data-parallel (DDP, or FSDP for models that do not fit one device) when started under torchrun, resumable from atomic checkpoints, with a
progress bar and a JSONL log. What is trained and how its loss is computed is passed in.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from actdistill_ros.data.dataset import collate_samples
from actdistill_ros.distill.config import TrainConfig
from actdistill_ros.distill.runtime import (Checkpointer, DistContext, RunLog, batch_indices, lr_at, progress_bar,
                                            shard)

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, dict, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def wrap_parallel(module: nn.Module, ctx: DistContext, fsdp: bool = False, shard_units: Sequence[nn.Module] = (),
                  find_unused: bool = False) -> nn.Module:
    """DDP (replicas), or FSDP (``fsdp``: parameters, gradients and optimizer state sharded over
    processes, each of ``shard_units`` gathered only while it runs) when started under torchrun."""
    if not ctx.distributed:
        return module
    if fsdp:
        for unit in shard_units:
            fully_shard(unit)
        fully_shard(module)
        return module
    return DistributedDataParallel(module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                   find_unused_parameters=find_unused)


def full_state(model: nn.Module, modules: dict[str, nn.Module], fsdp: bool) -> dict[str, torch.Tensor]:
    """Unsharded ``{module name}.{parameter}`` state of ``modules`` (collective under FSDP, where
    ``model`` is the sharded root whose attributes are named as in ``modules``)."""
    if fsdp:
        state = get_model_state_dict(model, options=FULL_STATE)
        return {k: v for k, v in state.items() if k.split(".", 1)[0] in modules}
    return {f"{name}.{k}": v for name, module in modules.items() for k, v in module.state_dict().items()}


def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict:
    return get_optimizer_state_dict(model, optimizer, options=FULL_STATE) if fsdp else optimizer.state_dict()


def _load_state(model, modules, optimizer, model_state, optimizer_state, fsdp: bool) -> None:
    if fsdp:
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, model_state, options=options)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
        return
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)})
    optimizer.load_state_dict(optimizer_state)


def autocast(ctx: DistContext, enabled: bool):
    if enabled and ctx.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _mean_over_processes(values: dict[str, torch.Tensor], ctx: DistContext) -> dict[str, float]:
    names = sorted(values)
    stacked = torch.stack([values[n].detach().float().reshape(()) for n in names]).to(ctx.device)
    if ctx.distributed:
        dist.all_reduce(stacked)
        stacked /= ctx.world_size
    return dict(zip(names, stacked.tolist()))


def train_stage(*, stage: str, model: nn.Module, checkpoint_modules: dict[str, nn.Module],
                parameters: Sequence[nn.Parameter] | Sequence[dict], loss_fn: LossFn, dataset, config: TrainConfig,
                ctx: DistContext, out_dir: Path, run_log: RunLog, resume: bool, seed: int,
                checkpoint_every: int, log_every: int, amp_bf16: bool = True, fsdp: bool = False) -> None:
    """Train ``model`` (already wrapped by :func:`wrap_parallel`) for ``config.steps`` global steps.

    ``checkpoint_modules`` are the modules whose state a checkpoint holds (attributes of ``model``).
    ``parameters`` may be optimizer groups with an ``lr_scale`` (relative to ``config.lr``).
    """
    groups = [g if isinstance(g, dict) else {"params": [g]} for g in parameters]
    groups = [{**g, "lr_scale": g.get("lr_scale", 1.0)} for g in groups]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    all_parameters = [p for g in groups for p in g["params"]]
    checkpointer = Checkpointer(out_dir / "checkpoints", stage)
    start = 0
    if checkpointer.load_meta() is not None:
        if not resume:
            raise ValueError(f"{out_dir}: holds an unfinished '{stage}' run; pass --resume to continue it "
                             f"or choose a new --out")
        start, model_state, optimizer_state = checkpointer.restore()
        _load_state(model, checkpoint_modules, optimizer, model_state, optimizer_state, fsdp)
        if ctx.is_main:
            log.info("%s: resuming at step %d of %d", stage, start, config.steps)
    run_log.truncate_after(stage, start)
    model.train()
    bar = progress_bar(stage, config.steps, start, ctx.is_main)
    timed_from = min(start + 2, config.steps - 1)  # throughput excludes the first (warm-up) steps
    timer = time.perf_counter()
    for step in range(start, config.steps):
        if step == timed_from:
            timer = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = group["lr_scale"] * lr_at(step, config.lr, config.warmup_steps, config.steps)
        indices = shard(batch_indices(step, len(dataset), config.batch_size, seed), ctx)
        batch = to_device(collate_samples([dataset[int(i)] for i in indices]), ctx.device)
        with autocast(ctx, amp_bf16):
            loss, metrics = loss_fn(model, batch, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(all_parameters, config.grad_clip)
        if isinstance(grad_norm, DTensor):  # FSDP: the norm over all shards
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        done = step + 1
        if done % log_every == 0 or done == config.steps:
            values = _mean_over_processes({"loss": loss, "grad_norm": grad_norm, **metrics}, ctx)
            values["lr"] = optimizer.param_groups[0]["lr"]
            run_log.write(stage, done, values)
            bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k in ("loss", "task", "keep", "distill")},
                            refresh=False)
        if done % checkpoint_every == 0 or done == config.steps:
            model_state = full_state(model, checkpoint_modules, fsdp)  # collective under FSDP
            optimizer_state = _optimizer_state(model, optimizer, fsdp)
            if ctx.is_main:
                checkpointer.save(done, model_state, optimizer_state)
            if ctx.distributed:
                dist.barrier()
        bar.update(1)
    bar.close()
    timed_steps = config.steps - timed_from
    if timed_steps > 0:
        elapsed = time.perf_counter() - timer
        rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])  # KiB -> MiB
        if ctx.distributed:
            gathered = [torch.zeros(1) for _ in range(ctx.world_size)]
            dist.all_gather(gathered, rss)
            rss = torch.cat(gathered)
        run_log.write(stage, config.steps, {
            "samples_per_s": timed_steps * config.batch_size / elapsed, "processes": ctx.world_size,
            "peak_rss_mb_per_process": rss.max().item(), "peak_rss_mb_total": rss.sum().item()})
