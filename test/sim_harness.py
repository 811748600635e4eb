"""The Meta-World simulator in tests: a missing simulator skips a test, or fails it when
ACTDISTILL_REQUIRE_SIM=1 (`make test`, so CI), so a broken simulator install cannot pass as
skipped tests."""

from __future__ import annotations

import importlib.util
import os

import pytest

REQUIRE_SIM_VARIABLE = "ACTDISTILL_REQUIRE_SIM"
MISSING_REASON = "Meta-World simulator not installed (requirements-sim.txt)"


def simulator_available() -> bool:
    return importlib.util.find_spec("metaworld") is not None


def simulator_required() -> bool:
    return os.environ.get(REQUIRE_SIM_VARIABLE) == "1"


def require_simulator() -> None:
    """Return when Meta-World is importable; else skip (works at module level), or fail when
    ACTDISTILL_REQUIRE_SIM=1. Also sets the headless MuJoCo renderer before mujoco is imported."""
    if simulator_available():
        os.environ.setdefault("MUJOCO_GL", "egl")
        return
    if simulator_required():
        pytest.fail(f"{MISSING_REASON} ({REQUIRE_SIM_VARIABLE}=1: the simulator must be present)", pytrace=False)
    pytest.skip(MISSING_REASON, allow_module_level=True)
