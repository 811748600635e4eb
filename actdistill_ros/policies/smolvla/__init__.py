"""LeRobot SmolVLA policies, loaded and run without lerobot (transformers' SmolVLM/Idefics3 classes)."""

from actdistill_ros.policies.smolvla.configuration_smolvla import SmolVLAConfig, SmolVLAConfigError
from actdistill_ros.policies.smolvla.modeling_smolvla import SmolVLAModel, WeightsMismatch
from actdistill_ros.policies.smolvla.policy_smolvla import SmolVLAPolicy, is_smolvla_dir
from actdistill_ros.policies.smolvla.processor_smolvla import ProcessorError

__all__ = ["SmolVLAConfig", "SmolVLAConfigError", "SmolVLAModel", "SmolVLAPolicy", "WeightsMismatch",
           "ProcessorError", "is_smolvla_dir"]
