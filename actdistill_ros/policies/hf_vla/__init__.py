"""A VLA teacher around a Hugging Face image-text-to-text backbone (PaliGemma, Idefics3/SmolVLM,
Qwen2.5-VL and models with the same layout). transformers is imported only when a model is built."""

from actdistill_ros.policies.hf_vla.configuration_hf_vla import HFVLAConfig
from actdistill_ros.policies.hf_vla.modeling_hf_vla import HFVLA, UnsupportedBackbone

__all__ = ["HFVLAConfig", "HFVLA", "UnsupportedBackbone"]
