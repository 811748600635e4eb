"""launch/policy.launch.py and config/policy.yaml agree with what the node really declares.

`launch`/`launch_ros` are not installable here, so the launch file is read with `ast`; the
declared parameters come from a running node's /<node>/list_parameters service.
"""

from __future__ import annotations

import ast
import importlib
import re

import pytest
import yaml

from ros_harness import POLICY_YAML, REPO_ROOT, RosSide, reserve_domain, start_policy_node, wait_until

LAUNCH_FILE = REPO_ROOT / "launch" / "policy.launch.py"
NODE = "policy_node"


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and getattr(n.func, "id", getattr(n.func, "attr", None)) == name]


def _keyword(call: ast.Call, name: str) -> ast.expr:
    return next(k.value for k in call.keywords if k.arg == name)


@pytest.fixture(scope="module")
def launch_tree() -> ast.Module:
    return ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))


@pytest.fixture(scope="module")
def policy_node_call(launch_tree) -> ast.Call:
    nodes = _calls(launch_tree, "Node")
    assert len(nodes) == 1
    return nodes[0]


def _yaml_parameter_names() -> list[str]:
    document = yaml.safe_load(POLICY_YAML.read_text())
    (section,) = document.values()
    names = []

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}{key}.", inner)
        else:
            names.append(prefix[:-1])
    walk("", section["ros__parameters"])
    return names


def _launch_parameter_names(call: ast.Call) -> list[str]:
    parameters = _keyword(call, "parameters")
    dicts = [element for element in parameters.elts if isinstance(element, ast.Dict)]
    assert dicts, "the Node gets no parameter dict"
    return [ast.literal_eval(key) for d in dicts for key in d.keys]


@pytest.fixture(scope="module")
def declared_parameters(tmp_path_factory) -> set[str]:
    from actdistill_ros.policy import create_untrained_policy

    tmp = tmp_path_factory.mktemp("launch")
    weights = create_untrained_policy(tmp / "w", size="tiny")
    domain = reserve_domain()
    ros = RosSide(domain)
    process = start_policy_node(weights, domain, tmp / "node")
    try:
        names = wait_until(lambda: _try_list(ros), timeout=60.0, interval=0.5)
        assert names, f"node did not answer list_parameters:\n{process.output()[-3000:]}"
        return set(names) - {"use_sim_time", "start_type_description_service"}  # rclpy's own
    finally:
        process.stop()
        ros.close()


def _try_list(ros: RosSide):
    try:
        return ros.list_parameters(NODE)
    except TimeoutError:
        return None


def test_launch_executable_is_a_console_script(policy_node_call):
    assert ast.literal_eval(_keyword(policy_node_call, "package")) == "actdistill_ros"
    executable = ast.literal_eval(_keyword(policy_node_call, "executable"))
    setup = ast.parse((REPO_ROOT / "setup.py").read_text())
    scripts = next(ast.literal_eval(value) for d in ast.walk(setup) if isinstance(d, ast.Dict)
                   for key, value in zip(d.keys, d.values)
                   if isinstance(key, ast.Constant) and key.value == "console_scripts")
    entries = dict(re.fullmatch(r"\s*(\S+)\s*=\s*(\S+)\s*", entry).groups() for entry in scripts)
    assert executable in entries
    module_name, function = entries[executable].split(":")
    assert callable(getattr(importlib.import_module(module_name), function))


def test_launch_arguments_are_declared_and_used(launch_tree, policy_node_call):
    declared = {ast.literal_eval(call.args[0]) for call in _calls(launch_tree, "DeclareLaunchArgument")}
    used = {ast.literal_eval(call.args[0]) for call in _calls(launch_tree, "LaunchConfiguration")}
    assert declared == used == {"weights", "camera_topic", "command_topic", "device", "threshold", "params_file"}


def test_every_launch_parameter_is_declared_by_the_node(policy_node_call, declared_parameters):
    passed = set(_launch_parameter_names(policy_node_call))
    assert passed and passed <= declared_parameters, passed - declared_parameters


def test_yaml_lists_exactly_the_declared_parameters(declared_parameters):
    in_yaml = _yaml_parameter_names()
    assert len(in_yaml) == len(set(in_yaml))
    assert set(in_yaml) == declared_parameters, (set(in_yaml) ^ declared_parameters)


def test_every_yaml_parameter_has_a_comment():
    lines = POLICY_YAML.read_text().splitlines()
    leaf = re.compile(r"^\s+[\w.]+:\s*\S")  # `key: value` (sections end with a bare colon)
    for index, line in enumerate(lines):
        if leaf.match(line) and not line.strip().startswith("#"):
            previous = next(lines[i] for i in range(index - 1, -1, -1) if lines[i].strip())
            assert previous.strip().startswith("#"), f"config/policy.yaml line {index + 1} has no comment: {line}"
