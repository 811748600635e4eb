"""Reading a ROS 2 parameter file (`/**: ros__parameters: ...`) into flat dotted names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def yaml_parameters(path: Path) -> dict[str, Any]:
    """{dotted parameter name: value} of the single node section in ``path``."""
    (section,) = yaml.safe_load(Path(path).read_text()).values()
    values: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}{key}.", inner)
        else:
            assert prefix[:-1] not in values, f"{path}: {prefix[:-1]} set twice"
            values[prefix[:-1]] = value
    walk("", section["ros__parameters"])
    return values


def yaml_parameter_names(path: Path) -> list[str]:
    return list(yaml_parameters(path))
