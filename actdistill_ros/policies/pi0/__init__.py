"""LeRobot pi0 and pi0.5 policies, loaded and run without lerobot (SigLIP from transformers, Gemma in-project)."""

from actdistill_ros.policies.pi0.configuration_pi0 import PI0Config, PI0ConfigError
from actdistill_ros.policies.pi0.modeling_pi0 import PI0Model
from actdistill_ros.policies.pi0.policy_pi0 import PI0Policy, is_pi0_dir

__all__ = ["PI0Config", "PI0ConfigError", "PI0Model", "PI0Policy", "is_pi0_dir"]
