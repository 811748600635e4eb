"""launch/policy.launch.py and config/policy.yaml agree with what the node really declares.

`launch`/`launch_ros` are not installable here, so the launch file is read with `ast`; the
declared parameters and their defaults come from a node started without a parameter file
(its /<node>/list_parameters, get_parameters and describe_parameters services).
"""

from __future__ import annotations

import ast
import importlib
import re

import pytest

from param_yaml import yaml_parameter_names, yaml_parameters
from ros_harness import POLICY_YAML, REPO_ROOT, RosSide, reserve_domain, start_policy_node, wait_until

LAUNCH_FILE = REPO_ROOT / "launch" / "policy.launch.py"
NODE = "policy_node"
# Declared parameters config/policy.yaml leaves out on purpose (the file says why in a comment):
# a value there would beat the default the node computes at start-up.
NOT_IN_YAML = {"router.threshold": "default_threshold", "router.keep_fraction": "default_keep_fraction"}
# Declared without a value by the node (the type of [] cannot be inferred); unset means [].
UNSET_MEANS_EMPTY = {"action.joint_names", "action.position_limits_low", "action.position_limits_high"}


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


def _launch_parameter_names(tree: ast.AST) -> list[str]:
    """Keys of the parameter dict the launch file builds: dict literals and ``d["name"] = ...``."""
    names = [ast.literal_eval(key) for d in ast.walk(tree) if isinstance(d, ast.Dict) for key in d.keys]
    names += [ast.literal_eval(target.slice) for node in ast.walk(tree) if isinstance(node, ast.Assign)
              for target in node.targets if isinstance(target, ast.Subscript)]
    return names


@pytest.fixture(scope="module")
def node_defaults(tmp_path_factory) -> dict[str, object]:
    """{name: default} of every parameter the node declares, from a node started without a params file."""
    from actdistill_ros.policy import create_untrained_policy

    tmp = tmp_path_factory.mktemp("launch")
    weights = create_untrained_policy(tmp / "w", size="tiny")
    domain = reserve_domain()
    ros = RosSide(domain)
    process = start_policy_node(weights, domain, tmp / "node", params_file=None)
    try:
        names = wait_until(lambda: _try_list(ros), timeout=60.0, interval=0.5)
        assert names, f"node did not answer list_parameters:\n{process.output()[-3000:]}"
        names = sorted(set(names) - {"use_sim_time", "start_type_description_service"})  # rclpy's own
        # One name per request: a parameter declared without a value makes GetParameters answer
        # nothing for the whole request.
        return {name: ros.get_parameters(NODE, [name]).get(name) for name in names}
    finally:
        process.stop()
        ros.close()


@pytest.fixture(scope="module")
def declared_parameters(node_defaults) -> set[str]:
    return set(node_defaults)


def _try_list(ros: RosSide):
    try:
        return ros.list_parameters(NODE)
    except TimeoutError:
        return None


def test_launch_executable_is_a_console_script_for_either_node(policy_node_call):
    """lifecycle:=false starts policy_node, lifecycle:=true policy_lifecycle_node; both installed."""
    from actdistill_ros.ros.launch_arguments import policy_executable

    assert ast.literal_eval(_keyword(policy_node_call, "package")) == "actdistill_ros"
    executable = _keyword(policy_node_call, "executable")
    assert isinstance(executable, ast.Call) and executable.func.id == "policy_executable"
    assert ast.literal_eval(executable.args[0].func.value.args[0]) == "lifecycle"
    setup = ast.parse((REPO_ROOT / "setup.py").read_text())
    scripts = next(ast.literal_eval(value) for d in ast.walk(setup) if isinstance(d, ast.Dict)
                   for key, value in zip(d.keys, d.values)
                   if isinstance(key, ast.Constant) and key.value == "console_scripts")
    entries = dict(re.fullmatch(r"\s*(\S+)\s*=\s*(\S+)\s*", entry).groups() for entry in scripts)
    assert (policy_executable("false"), policy_executable(" True ")) == ("policy_node", "policy_lifecycle_node")
    for name in ("policy_node", "policy_lifecycle_node"):
        module_name, function = entries[name].split(":")
        module = importlib.import_module(module_name)
        assert callable(getattr(module, function)) and module.NODE_NAME == "policy_node"
    with pytest.raises(ValueError, match="lifecycle"):
        policy_executable("yes")


def test_launch_arguments_are_declared_and_used(launch_tree, policy_node_call):
    declared = {ast.literal_eval(call.args[0]) for call in _calls(launch_tree, "DeclareLaunchArgument")}
    used = {ast.literal_eval(call.args[0]) for call in _calls(launch_tree, "LaunchConfiguration")}
    assert declared == used == {"weights", "camera_topics", "command_topic", "device", "threshold", "params_file",
                                "lifecycle"}


def test_every_launch_parameter_is_declared_by_the_node(launch_tree, policy_node_call, declared_parameters):
    from actdistill_ros.ros.launch_arguments import threshold_override

    # router.threshold comes from threshold_override (checked below) when the argument is given.
    passed = set(_launch_parameter_names(launch_tree)) | set(threshold_override("0.5"))
    assert {"weights_path", "router.threshold"} <= passed
    assert passed <= declared_parameters, passed - declared_parameters
    parameters = _keyword(policy_node_call, "parameters")
    assert any(getattr(element, "id", None) == "overrides" for element in parameters.elts)


def test_launch_sets_the_threshold_only_when_given(launch_tree):
    """An empty threshold argument must leave the card's default_threshold in force."""
    from actdistill_ros.ros.launch_arguments import threshold_override

    (argument,) = [call for call in _calls(launch_tree, "DeclareLaunchArgument")
                   if ast.literal_eval(call.args[0]) == "threshold"]
    assert ast.literal_eval(_keyword(argument, "default_value")) == ""
    assert _calls(launch_tree, "threshold_override"), "the launch file must set router.threshold via threshold_override"
    assert not [d for d in ast.walk(launch_tree) if isinstance(d, ast.Dict)
                and "router.threshold" in [ast.literal_eval(key) for key in d.keys]]
    assert threshold_override("") == {} and threshold_override("  ") == {}
    # A threshold asked for by name switches the card's keep routing off (keep would override it).
    assert threshold_override("0.7") == {"router.threshold": 0.7, "router.keep_fraction": 0.0}
    for bad in ("1.5", "-0.1", "abc", "nan"):
        with pytest.raises(ValueError, match="threshold"):
            threshold_override(bad)


def test_lifecycle_node_declares_the_same_parameters(tmp_path, declared_parameters):
    """policy_lifecycle_node: the same parameters once configured (the card's router.* come with the
    card), and weights_path writable while unconfigured."""
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState
    from rcl_interfaces.srv import DescribeParameters

    from actdistill_ros.policy import create_untrained_policy

    weights = create_untrained_policy(tmp_path / "w", size="tiny")
    domain = reserve_domain()
    ros = RosSide(domain)
    process = start_policy_node(weights, domain, tmp_path / "node", params_file=None,
                                module="actdistill_ros.ros.policy_lifecycle_node")
    try:
        names = wait_until(lambda: _try_list(ros), timeout=60.0, interval=0.5)
        assert names, process.output()[-3000:]
        own = {"use_sim_time", "start_type_description_service"}
        assert set(names) - own == declared_parameters - set(NOT_IN_YAML)
        descriptor, = ros.call(DescribeParameters, f"/{NODE}/describe_parameters",
                               DescribeParameters.Request(names=["weights_path"])).descriptors
        assert not descriptor.read_only
        request = ChangeState.Request(transition=Transition(id=Transition.TRANSITION_CONFIGURE))
        assert ros.call(ChangeState, f"/{NODE}/change_state", request, timeout=60.0).success
        assert set(ros.list_parameters(NODE)) - own == declared_parameters
    finally:
        process.stop()
        ros.close()


def test_yaml_lists_exactly_the_declared_parameters(declared_parameters):
    in_yaml = set(yaml_parameter_names(POLICY_YAML))
    assert in_yaml == declared_parameters - set(NOT_IN_YAML), (in_yaml ^ (declared_parameters - set(NOT_IN_YAML)))
    assert set(NOT_IN_YAML) <= declared_parameters
    comments = "\n".join(line for line in POLICY_YAML.read_text().splitlines() if line.strip().startswith("#"))
    for name, card_field in NOT_IN_YAML.items():  # documented where a user looks for it
        assert name in comments and card_field in comments


def test_yaml_values_equal_the_declared_defaults(node_defaults):
    """The file documents the defaults: a node without it behaves the same."""
    for name, value in yaml_parameters(POLICY_YAML).items():
        if name == "weights_path":  # required: the harness always passes it, so the node's value is not the default
            assert value == ""
            continue
        default = node_defaults[name]
        if default is None and name in UNSET_MEANS_EMPTY:
            default = []
        assert value == default and type(value) is type(default), f"{name}: yaml {value!r}, node default {default!r}"


def test_every_yaml_parameter_has_a_comment():
    lines = POLICY_YAML.read_text().splitlines()
    leaf = re.compile(r"^\s+[\w.]+:\s*\S")  # `key: value` (sections end with a bare colon)
    for index, line in enumerate(lines):
        if leaf.match(line) and not line.strip().startswith("#"):
            previous = next(lines[i] for i in range(index - 1, -1, -1) if lines[i].strip())
            assert previous.strip().startswith("#"), f"config/policy.yaml line {index + 1} has no comment: {line}"
