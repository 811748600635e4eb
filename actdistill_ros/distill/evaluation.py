"""Held-out metrics written into the model cards."""

from __future__ import annotations

import torch

from actdistill_ros.data.dataset import collate_samples
from actdistill_ros.distill.losses import valid_step_mse
from actdistill_ros.distill.training import to_device
from actdistill_ros.policies.actdistill import RoutedStudent, backbone_flops, run_backbone
from actdistill_ros.policies.vla import ReferenceVLA


def _batches(dataset, batch_size: int = 64):
    for start in range(0, len(dataset), batch_size):
        yield collate_samples([dataset[i] for i in range(start, min(len(dataset), start + batch_size))])


@torch.no_grad()
def evaluate_routing(vla: ReferenceVLA, student: RoutedStudent | None, dataset, device) -> dict:
    """Action MSE, executed-layer fraction and per-layer usage at the student's threshold."""
    model = student or vla
    was_training = model.training
    model.eval()
    total_error, total_weight, usage, samples, flops = 0.0, 0.0, torch.zeros(vla.num_layers), 0, 0.0
    flops_by_depth = [backbone_flops(vla, k) for k in range(vla.num_layers + 1)]
    for batch in _batches(dataset):
        batch = to_device(batch, device)
        encoded = vla.encode(batch["image"], batch["instruction"], batch["state"] if vla.config.state_dim else None)
        execute = student.execute_mask(encoded)[1] if student else None
        predicted = vla.predict_chunk(run_backbone(vla, encoded, execute))
        error, count = valid_step_mse(predicted.float(), vla.normalize_actions(batch["actions"]), batch["chunk_valid"])
        total_error += error
        total_weight += count
        usage += (execute.float().sum(0).cpu() if execute is not None else len(batch["key"]))
        depths = execute.sum(1).tolist() if execute is not None else [vla.num_layers] * len(batch["key"])
        flops += sum(flops_by_depth[k] for k in depths)
        samples += len(batch["key"])
    model.train(was_training)
    layer_usage = (usage / max(samples, 1)).tolist()
    executed = sum(layer_usage) / vla.num_layers
    return {"action_mse": total_error / max(total_weight, 1.0), "executed_layer_fraction": executed,
            "backbone_flops_fraction": flops / max(samples * flops_by_depth[-1], 1.0), "layer_usage": layer_usage,
            "samples": samples}
