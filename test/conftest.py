"""Test-session defaults: ROS traffic stays on loopback, logs go to a temp dir, CPU threads capped.

Markers by module or test name (pytest_collection_modifyitems), so that `make test-fast` can leave
out the slowest tests without their files naming a marker:
- slow_ros: the module starts policy/sim nodes, launch checks or rigs as processes over DDS;
- sim: the module (or a test marked so itself) runs the Meta-World simulator;
- multiprocess: a training run in several processes (DDP/FSDP) or killed with SIGKILL and resumed.
A module that needs the simulator and cannot import it skips, or fails with
ACTDISTILL_REQUIRE_SIM=1 (sim_harness.py), as `make test` sets it.
"""

import os
import tempfile
from pathlib import Path

import pytest
import torch

from sim_harness import MISSING_REASON, REQUIRE_SIM_VARIABLE, simulator_available, simulator_required

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_LOG_DIR", tempfile.mkdtemp(prefix="actdistill-test-roslog-"))
torch.set_num_threads(min(2, torch.get_num_threads()))

SLOW_ROS_MODULES = frozenset({
    "test_demo", "test_hf_end_to_end", "test_launch_file", "test_node_faults", "test_policy_lifecycle_node",
    "test_policy_node", "test_policy_node_modes", "test_replay_dataset", "test_replay_eval", "test_sim_arm_node",
    "test_pi0_end_to_end", "test_smolvla_end_to_end", "test_smolvla_serving", "test_soak",
})
SIM_MODULES = frozenset({"test_demo", "test_sim_arm_node", "test_sim_metaworld"})
MULTIPROCESS_TESTS = frozenset({
    ("test_distill", "test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_result"),
    ("test_distill", "test_two_processes_agree_with_one_process"),
    ("test_hf_vla", "test_a_teacher_run_killed_with_sigkill_resumes_to_the_uninterrupted_result"),
    ("test_smolvla_distill", "test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_result"),
    ("test_smolvla_train", "test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_result"),
})


def pytest_configure(config):
    config.addinivalue_line("markers",
                            "cuda: needs a CUDA device (skipped without one); scripts/gpu_check.sh runs them")
    config.addinivalue_line("markers", "slow_ros: starts ROS 2 nodes or rigs as processes (left out by make test-fast)")
    config.addinivalue_line("markers", "sim: runs the Meta-World simulator (left out by make test-fast)")
    config.addinivalue_line("markers", "multiprocess: trains in several processes or kills and resumes one "
                                       "(left out by make test-fast)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = Path(str(item.fspath)).stem
        if module in SLOW_ROS_MODULES:
            item.add_marker(pytest.mark.slow_ros)
        if module in SIM_MODULES:
            item.add_marker(pytest.mark.sim)
        if (module, getattr(item, "originalname", item.name)) in MULTIPROCESS_TESTS:
            item.add_marker(pytest.mark.multiprocess)


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """A simulator module that skipped itself at import because Meta-World is missing fails instead
    when ACTDISTILL_REQUIRE_SIM=1, whichever way the module spells its skip."""
    report = yield
    if (isinstance(collector, pytest.Module) and collector.path.stem in SIM_MODULES and report.skipped
            and simulator_required() and not simulator_available()):
        report.outcome = "failed"
        report.longrepr = (f"{collector.path.name}: {MISSING_REASON} "
                           f"({REQUIRE_SIM_VARIABLE}=1: the simulator must be present)")
    return report
