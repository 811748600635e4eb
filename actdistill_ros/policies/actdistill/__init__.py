"""ActDistill student: the teacher's own weights plus a router that skips backbone layers."""

from actdistill_ros.policies.actdistill.configuration_actdistill import RouterConfig
from actdistill_ros.policies.actdistill.modeling_actdistill import (LayerRouter, RoutedStudent, TrainRoutes,
                                                                   backbone_flops, num_kept_layers, run_backbone,
                                                                   top_k_mask)

__all__ = ["RouterConfig", "LayerRouter", "RoutedStudent", "TrainRoutes", "backbone_flops", "num_kept_layers",
           "run_backbone", "top_k_mask"]
