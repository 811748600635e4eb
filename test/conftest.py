"""Test-session defaults: ROS traffic stays on loopback, logs go to a temp dir, CPU threads capped."""

import os
import tempfile

import torch

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_LOG_DIR", tempfile.mkdtemp(prefix="actdistill-test-roslog-"))
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one); scripts/gpu_check.sh runs them")
