"""Reference vision-language-action model: the teacher family trained and tested here."""

from actdistill_ros.policies.vla.configuration_vla import VLAConfig
from actdistill_ros.policies.vla.modeling_vla import ReferenceVLA

__all__ = ["VLAConfig", "ReferenceVLA"]
