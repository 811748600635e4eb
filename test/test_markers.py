"""The marker lists in conftest.py name real modules and tests, and every module that starts a
policy node process is marked slow_ros: `make test-fast` cannot silently pick up a slow module or
lose track of a renamed one."""

import ast
import re
from pathlib import Path

import conftest

TEST_DIR = Path(__file__).resolve().parent


def _module(name: str) -> Path:
    return TEST_DIR / f"{name}.py"


def test_every_marked_module_and_test_exists():
    for name in sorted(conftest.SLOW_ROS_MODULES | conftest.SIM_MODULES):
        assert _module(name).is_file(), f"conftest.py marks {name}.py, which does not exist"
    for module, test in sorted(conftest.MULTIPROCESS_TESTS):
        tree = ast.parse(_module(module).read_text())
        tests = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert test in tests, f"conftest.py marks {module}.py::{test}, which does not exist"


def test_modules_that_start_node_processes_are_slow_ros():
    starts_a_node = re.compile(r"\b(start_policy_node|NodeProcess)\(")
    starting = {path.stem for path in TEST_DIR.glob("test_*.py") if starts_a_node.search(path.read_text())}
    assert starting, "the pattern must find the node tests"
    assert starting <= conftest.SLOW_ROS_MODULES, sorted(starting - conftest.SLOW_ROS_MODULES)
