"""LeRobot's pre-processor pipeline of a SmolVLA policy directory, without lerobot.

The steps SmolVLA's factory writes are reproduced (the generic ones are parsed by
policies/lerobot_processor.py, shared with pi0); any other step fails with one line naming it and
its file, because skipping a step would silently feed the model something else.

The tokenizer and the VLM's config.json (its sizes: heads, head_dim, widths) are not in the policy
directory: they come from ``--vlm-processor DIR`` or from the Hugging Face cache of the config's
``vlm_model_name``, offline. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Re-exported: the SmolVLA modules import the shared pieces from here.
from actdistill_ros.policies.lerobot_processor import (PASS_THROUGH_STEPS, POSTPROCESSOR_FILE,  # noqa: F401
                                                       PREPROCESSOR_FILE, TASK_KEY, Normalizer, Postprocessor,
                                                       ProcessorError, TokenizerSettings, check_device_step,
                                                       load_vlm_config_and_tokenizer, read_normalizer,
                                                       read_pipeline, read_postprocessor, read_tokenizer_step,
                                                       resolve_vlm_dir, step_name, unnormalize_actions)


@dataclass
class Preprocessor:
    """What LeRobot's SmolVLA preprocessor does to a raw batch, in order."""

    rename_map: dict[str, str] = field(default_factory=dict)
    add_batch_dim: bool = False
    newline: bool = False  # smolvla_new_line_processor: the task ends with "\n"
    tokenizer: TokenizerSettings | None = None
    normalizer: Normalizer | None = None
    order: list[str] = field(default_factory=list)  # registry names as saved


def read_preprocessor(directory: Path) -> Preprocessor:
    path = directory / PREPROCESSOR_FILE
    pre = Preprocessor()
    for index, step in enumerate(read_pipeline(path)):
        name = step_name(step, path, index)
        config = step.get("config") or {}
        pre.order.append(name)
        if name == "rename_observations_processor":
            rename = config.get("rename_map") or {}
            if not isinstance(rename, dict):
                raise ProcessorError(f"{path}: step {index} ({name}): rename_map must be an object")
            pre.rename_map = {str(k): str(v) for k, v in rename.items()}
        elif name == "to_batch_processor":
            pre.add_batch_dim = True
        elif name == "smolvla_new_line_processor":
            pre.newline = True
        elif name == "tokenizer_processor":
            pre.tokenizer = read_tokenizer_step(config, path, index, name)
        elif name == "normalizer_processor":
            pre.normalizer = read_normalizer(step, directory, path, index)
        elif name in PASS_THROUGH_STEPS:
            check_device_step(config, path, index, name)
        else:
            raise ProcessorError(f"{path}: step {index}: unsupported processor step {name!r}")
    if pre.tokenizer is None:
        raise ProcessorError(f"{path}: no tokenizer_processor step; SmolVLA needs the task tokenized")
    if ("smolvla_new_line_processor" in pre.order
            and pre.order.index("smolvla_new_line_processor") > pre.order.index("tokenizer_processor")):
        raise ProcessorError(f"{path}: smolvla_new_line_processor after tokenizer_processor is not supported")
    return pre
