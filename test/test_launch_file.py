"""launch/policy.launch.py, launch/sim_arm.launch.py and config/policy.yaml agree with what the node
really declares; the launch arguments' parsing (actdistill_ros/ros/launch_arguments.py).

`launch`/`launch_ros` are not installable here, so the launch files are read with `ast`, and what
they compute is computed by the plain functions of launch_arguments.py, tested here; the
declared parameters and their defaults come from a node started without a parameter file
(its /<node>/list_parameters, get_parameters and describe_parameters services).
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import subprocess
import sys
import textwrap

import pytest

from param_yaml import yaml_parameter_names, yaml_parameters
from ros_harness import POLICY_YAML, REPO_ROOT, RosSide, reserve_domain, start_policy_node, wait_until

LAUNCH_FILE = REPO_ROOT / "launch" / "policy.launch.py"
SIM_LAUNCH_FILE = REPO_ROOT / "launch" / "sim_arm.launch.py"
SHIPPED_STUDENT = REPO_ROOT / "weights" / "metaworld" / "student"
NODE = "policy_node"
# Declared parameters config/policy.yaml leaves out on purpose (the file says why in a comment):
# a value there would beat the default the node computes at start-up.
NOT_IN_YAML = {"router.threshold": "default_threshold", "router.keep_fraction": "default_keep_fraction"}


def _physical_policy(path):
    """A tiny untrained student whose card is in physical units (end-effector m/s, a gripper fraction), so
    the node starts on its own defaults: a card in normalized units needs an action.scale."""
    from actdistill_ros.policy import create_untrained_policy
    from actdistill_ros.weights import ActionSpace

    space = ActionSpace(kind="end_effector", names=["linear_x", "linear_y", "linear_z", "gripper"],
                        units=["m/s", "m/s", "m/s", "normalized"], low=[-1.0] * 4, high=[1.0] * 4, gripper_index=3)
    return create_untrained_policy(path, size="tiny", action_space=space)


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
    """The one node call: Node, or LifecycleNode for lifecycle:=true (``(LifecycleNode if ... else Node)(...)``)."""
    nodes = [n for n in ast.walk(launch_tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.IfExp)]
    assert len(nodes) == 1 and not _calls(launch_tree, "Node") and not _calls(launch_tree, "LifecycleNode")
    node = nodes[0]
    assert {node.func.body.id, node.func.orelse.id} == {"LifecycleNode", "Node"}
    return node


@pytest.fixture(scope="module")
def sim_tree() -> ast.Module:
    return ast.parse(SIM_LAUNCH_FILE.read_text(), filename=str(SIM_LAUNCH_FILE))


def _declared_defaults(tree: ast.AST) -> dict[str, str | None]:
    """{launch argument: default_value (None: required; the source text where it is computed)}."""
    def default(value: ast.expr) -> str:
        return ast.literal_eval(value) if isinstance(value, ast.Constant) else ast.unparse(value)

    return {ast.literal_eval(call.args[0]): next((default(k.value) for k in call.keywords if k.arg == "default_value"),
                                                 None)
            for call in _calls(tree, "DeclareLaunchArgument")}


def _used_arguments(tree: ast.AST) -> set[str]:
    """Launch arguments read as LaunchConfiguration("x") or through a ``value("x")`` helper."""
    return {ast.literal_eval(call.args[0]) for name in ("LaunchConfiguration", "value") for call in _calls(tree, name)
            if isinstance(call.args[0], ast.Constant)}


def _dict_assigned_to(tree: ast.AST, name: str) -> ast.Dict:
    (found,) = [n.value for n in ast.walk(tree) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict)
                and [getattr(t, "id", None) for t in n.targets] == [name]]
    return found


def _entry(d: ast.Dict, key: str) -> ast.expr:
    return next(v for k, v in zip(d.keys, d.values) if k is not None and ast.literal_eval(k) == key)


def _is_call(node: ast.expr, function: str, *arguments: str) -> bool:
    """``node`` is ``function(value("a"), ...)`` with those launch arguments (``value`` reads one)."""
    if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == function):
        return False
    read = [ast.literal_eval(a.args[0]) if isinstance(a, ast.Call) and getattr(a.func, "id", None) == "value"
            else ast.literal_eval(a) if isinstance(a, ast.Constant) else None for a in node.args]
    return all(argument in read for argument in arguments)


def _launch_parameter_names(tree: ast.AST) -> list[str]:
    """Keys of the parameter dict the launch file builds: dict literals and ``d["name"] = ...``."""
    names = [ast.literal_eval(key) for d in ast.walk(tree) if isinstance(d, ast.Dict) for key in d.keys]
    names += [ast.literal_eval(target.slice) for node in ast.walk(tree) if isinstance(node, ast.Assign)
              for target in node.targets if isinstance(target, ast.Subscript)]
    return names


@pytest.fixture(scope="module")
def node_answers(tmp_path_factory) -> dict[str, dict[str, object]]:
    """What a node started without a params file answers: "one_by_one", {name: default} of every
    parameter it declares, one GetParameters request per name; "all_at_once", one request for all
    of them (what `ros2 param dump` sends)."""
    tmp = tmp_path_factory.mktemp("launch")
    weights = _physical_policy(tmp / "w")
    domain = reserve_domain()
    ros = RosSide(domain)
    process = start_policy_node(weights, domain, tmp / "node", params_file=None)
    try:
        names = wait_until(lambda: _try_list(ros), timeout=60.0, interval=0.5)
        assert names, f"node did not answer list_parameters:\n{process.output()[-3000:]}"
        names = sorted(set(names) - {"use_sim_time", "start_type_description_service"})  # rclpy's own
        # One name per request as well: a parameter declared without a value makes GetParameters
        # answer nothing for the whole request.
        return {"one_by_one": {name: ros.get_parameters(NODE, [name]).get(name) for name in names},
                "all_at_once": ros.get_parameters(NODE, names)}
    finally:
        process.stop()
        ros.close()


@pytest.fixture(scope="module")
def node_defaults(node_answers) -> dict[str, object]:
    """{name: default} of every parameter the node declares."""
    return node_answers["one_by_one"]


@pytest.fixture(scope="module")
def declared_parameters(node_defaults) -> set[str]:
    return set(node_defaults)


def _try_list(ros: RosSide):
    try:
        return ros.list_parameters(NODE)
    except TimeoutError:
        return None


def test_launch_executable_is_a_console_script_for_either_node(launch_tree, policy_node_call):
    """lifecycle:=false starts policy_node, lifecycle:=true policy_lifecycle_node; both installed."""
    from actdistill_ros.ros.launch_arguments import policy_executable

    assert ast.literal_eval(_keyword(policy_node_call, "package")) == "actdistill_ros"
    assert getattr(_keyword(policy_node_call, "executable"), "id", None) == "executable"
    (executable,) = [n.value for n in ast.walk(launch_tree) if isinstance(n, ast.Assign)
                     and [getattr(t, "id", None) for t in n.targets] == ["executable"]]
    assert _is_call(executable, "policy_executable", "lifecycle")
    # The managed executable is started as a LifecycleNode (launch can then drive its transitions).
    assert ast.unparse(policy_node_call.func.test) == "executable == 'policy_lifecycle_node'"
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
    assert set(_declared_defaults(launch_tree)) == _used_arguments(launch_tree) == {
        "weights", "camera_topics", "camera_transports", "command_topic", "device", "threshold", "params_file",
        "enable_output", "lifecycle", "autostart"}


def test_safe_start_output_off_and_the_managed_node_unactivated_unless_asked(launch_tree):
    """A real arm: enable_output and autostart default to false; both are read with one-line errors."""
    from actdistill_ros.ros.launch_arguments import boolean_argument, lifecycle_autostart

    defaults = _declared_defaults(launch_tree)
    assert defaults["enable_output"] == defaults["autostart"] == defaults["lifecycle"] == "false"
    overrides = _dict_assigned_to(launch_tree, "overrides")
    assert _is_call(_entry(overrides, "enable_output"), "boolean_argument", "enable_output")
    assert boolean_argument("enable_output", defaults["enable_output"]) is False
    assert boolean_argument("enable_output", " True ") is True
    for bad in ("yes", "1", ""):
        with pytest.raises(ValueError, match=f"launch argument enable_output must be true or false, got {bad!r}"):
            boolean_argument("enable_output", bad)
    # autostart: only for the managed node; off by default.
    (autostart,) = [n.value for n in ast.walk(launch_tree) if isinstance(n, ast.Assign)
                    and [getattr(t, "id", None) for t in n.targets] == ["autostart"]]
    assert _is_call(autostart, "lifecycle_autostart", "lifecycle", "autostart")
    assert lifecycle_autostart(defaults["lifecycle"], defaults["autostart"]) is False
    assert lifecycle_autostart("true", defaults["autostart"]) is False
    assert lifecycle_autostart("true", "true") is True
    with pytest.raises(ValueError, match="autostart:=true needs lifecycle:=true"):
        lifecycle_autostart("false", "true")
    # Without autostart the launch returns the node alone: no transition is requested.
    early_return = [n for n in ast.walk(launch_tree) if isinstance(n, ast.If) and ast.unparse(n.test) == "not autostart"]
    assert len(early_return) == 1 and ast.unparse(early_return[0].body[0]) == "return [node]"


def test_autostart_configures_then_activates_once(launch_tree):
    """configure at launch, activate when configure has brought the node to inactive, once only: a later
    deactivate by hand (active -> inactive) must not be undone."""
    from lifecycle_msgs.msg import Transition

    transitions = [ast.unparse(_keyword(call, "transition_id")) for call in _calls(launch_tree, "ChangeState")]
    assert sorted(transitions) == ["Transition.TRANSITION_ACTIVATE", "Transition.TRANSITION_CONFIGURE"]
    assert Transition.TRANSITION_CONFIGURE != Transition.TRANSITION_ACTIVATE  # the names exist in lifecycle_msgs
    (handler,) = _calls(launch_tree, "OnStateTransition")
    assert ast.literal_eval(_keyword(handler, "start_state")) == "configuring"
    assert ast.literal_eval(_keyword(handler, "goal_state")) == "inactive"
    assert ast.literal_eval(_keyword(handler, "handle_once")) is True
    assert [ast.unparse(c) for c in _calls(handler, "ChangeState")] and \
        "TRANSITION_ACTIVATE" in ast.unparse(handler)  # the handler is what activates


def test_camera_transports_launch_argument(launch_tree):
    from actdistill_ros.ros.launch_arguments import camera_transports

    overrides = _dict_assigned_to(launch_tree, "overrides")
    entry = _entry(overrides, "camera.transports")
    assert _is_call(entry, "camera_transports", "camera_transports") and ast.unparse(entry.args[1]) == "cameras"
    assert _declared_defaults(launch_tree)["camera_transports"] == ""
    two = ["/cam/scene", "/cam/wrist"]
    assert camera_transports("", two) == ["raw"]  # one entry: the node applies it to every camera
    assert camera_transports("compressed", two) == ["compressed"]
    assert camera_transports("raw,compressed", two) == camera_transports("[raw, compressed]", two) == ["raw", "compressed"]
    for bad in ("raw,compressed,raw", "jpeg", "raw,theora"):
        with pytest.raises(ValueError, match="launch argument camera_transports: expected raw or compressed"):
            camera_transports(bad, two)


def test_every_launch_parameter_is_declared_by_the_node(launch_tree, policy_node_call, declared_parameters):
    from actdistill_ros.ros.launch_arguments import threshold_override

    # router.threshold comes from threshold_override (checked below) when the argument is given.
    passed = set(_launch_parameter_names(launch_tree)) | set(threshold_override("0.5"))
    assert {"weights_path", "router.threshold"} <= passed
    assert passed <= declared_parameters, passed - declared_parameters
    parameters = _keyword(policy_node_call, "parameters")
    assert any(getattr(element, "id", None) == "overrides" for element in parameters.elts)


def test_param_dump_answers_every_parameter(node_answers):
    """`ros2 param dump /policy_node` lists the parameters, then asks for all of them in ONE GetParameters
    request; a parameter declared without a value makes Jazzy answer that request with nothing
    (`ros__parameters: {}`). Every parameter must therefore have a value."""
    one_by_one, all_at_once = node_answers["one_by_one"], node_answers["all_at_once"]
    unset = sorted(name for name, value in one_by_one.items() if value is None)
    assert not unset, f"declared without a value: {unset}"
    assert len(one_by_one) > 20 and all_at_once == one_by_one
    assert all_at_once["enable_output"] is False  # safe start: the node's own default


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

    weights = _physical_policy(tmp_path / "w")
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
        assert value == default and type(value) is type(default), f"{name}: yaml {value!r}, node default {default!r}"


def _pair(a: str, b: str) -> bool:
    """Parameter names that differ in one word only (max_linear_velocity, max_angular_velocity)."""
    words_a, words_b = a.split("_"), b.split("_")
    return len(words_a) == len(words_b) and sum(x != y for x, y in zip(words_a, words_b)) == 1


def test_every_yaml_parameter_has_a_comment():
    """A comment directly above each parameter; a pair such as max_linear_/max_angular_velocity may share one."""
    lines = POLICY_YAML.read_text().splitlines()
    leaf = re.compile(r"^\s+([\w.]+):\s*\S")  # `key: value` (sections end with a bare colon)
    for index, line in enumerate(lines):
        if leaf.match(line) and not line.strip().startswith("#"):
            above = [i for i in range(index - 1, -1, -1) if lines[i].strip()][:2]
            documented = lines[above[0]].strip().startswith("#")
            shared = (not documented and leaf.match(lines[above[0]]) and len(above) == 2
                      and lines[above[1]].strip().startswith("#")
                      and _pair(leaf.match(lines[above[0]]).group(1), leaf.match(line).group(1)))
            assert documented or shared, f"config/policy.yaml line {index + 1} has no comment: {line}"
    assert _pair("max_linear_velocity", "max_angular_velocity") and not _pair("max_linear_velocity", "frame_id")


def test_lifecycle_transition_labels_are_what_autostart_matches(tmp_path):
    """The real managed node's configure transition is reported (TransitionEvent, what launch_ros turns into
    StateTransition events) as configuring -> inactive: the states the launch file's handler matches."""
    from lifecycle_msgs.msg import Transition, TransitionEvent
    from lifecycle_msgs.srv import ChangeState
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    weights = _physical_policy(tmp_path / "w")
    domain = reserve_domain()
    ros = RosSide(domain)
    events = ros.record(TransitionEvent, f"/{NODE}/transition_event", QoSProfile(
        depth=10, reliability=ReliabilityPolicy.RELIABLE))
    process = start_policy_node(weights, domain, tmp_path / "node", params_file=None,
                                module="actdistill_ros.ros.policy_lifecycle_node")
    try:
        request = ChangeState.Request(transition=Transition(id=Transition.TRANSITION_CONFIGURE))
        assert ros.call(ChangeState, f"/{NODE}/change_state", request, timeout=60.0).success, process.output()[-3000:]
        seen = events.wait_for(lambda e: e.goal_state.label == "inactive", timeout=10.0)
        assert seen, [(e.start_state.label, e.goal_state.label) for e in events.messages()]
        assert [(e.start_state.label, e.goal_state.label) for e in seen] == [("configuring", "inactive")]
    finally:
        process.stop()
        ros.close()


def test_sim_launch_enables_output_and_renders_at_the_cards_image_size(sim_tree, declared_parameters):
    """The simulated arm's launch commands from the start (policy.launch.py, for a real arm, does not), its
    cameras are raw Images, and the arm renders at the size the weights take unless told otherwise."""
    from actdistill_ros.ros.launch_arguments import card_image_size, image_size_argument
    from actdistill_ros.weights import load_card

    defaults = _declared_defaults(sim_tree)
    assert set(defaults) == _used_arguments(sim_tree)
    overrides = _dict_assigned_to(sim_tree, "overrides")
    assert ast.literal_eval(_entry(overrides, "enable_output")) is True
    assert ast.literal_eval(_entry(overrides, "camera.transports")) == ["raw"]
    passed = {ast.literal_eval(k) for k in overrides.keys}
    assert passed <= declared_parameters, passed - declared_parameters
    # policy.yaml, then the simulated arm's own policy parameters (its action.scale), then the overrides.
    (policy_node,) = [c for c in _calls(sim_tree, "Node") if ast.literal_eval(_keyword(c, "name")) == "policy_node"]
    assert [ast.unparse(e) for e in _keyword(policy_node, "parameters").elts] == [
        "LaunchConfiguration('policy_params_file')", "LaunchConfiguration('sim_policy_params_file')", "overrides"]
    assert defaults["sim_policy_params_file"].endswith("'sim_arm_policy.yaml')")
    image_size = [v for d in ast.walk(sim_tree) if isinstance(d, ast.Dict) for k, v in zip(d.keys, d.values)
                  if k is not None and ast.literal_eval(k) == "image_size"]
    assert len(image_size) == 1 and _is_call(image_size[0], "image_size_argument", "image_size")
    assert defaults["image_size"] == ""
    shipped = load_card(SHIPPED_STUDENT).image_size
    assert image_size_argument(defaults["image_size"], SHIPPED_STUDENT) == card_image_size(SHIPPED_STUDENT) == shipped
    assert shipped == 128
    assert image_size_argument(" 96 ", SHIPPED_STUDENT) == 96
    for bad in ("9.5", "-96", "8", "abc"):
        with pytest.raises(ValueError, match="launch argument image_size must be a whole number"):
            image_size_argument(bad, SHIPPED_STUDENT)


def test_launch_processes_import_no_torch():
    """What the launch files import from this package, and the card reads they do, in a fresh process:
    no torch (seconds and hundreds of MB in `ros2 launch` for reading three JSON fields)."""
    imports = sorted({ast.unparse(node) for path in (REPO_ROOT / "launch").glob("*.launch.py")
                      for node in ast.parse(path.read_text()).body
                      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("actdistill_ros")})
    assert len(imports) >= 3
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import json, sys, time
        started = time.perf_counter()
        {'; '.join(imports)}
        from actdistill_ros.ros.launch_arguments import camera_topics, card_image_size, card_dry_run_action_scale
        weights = {str(SHIPPED_STUDENT)!r}
        print(json.dumps({{"cameras": camera_topics("", weights), "image_size": card_image_size(weights),
                          "scale": card_dry_run_action_scale(weights), "torch": "torch" in sys.modules,
                          "seconds": time.perf_counter() - started}}))
    """)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["torch"] is False
    assert out["cameras"] == ["/camera/image_raw"] and out["image_size"] == 128
    assert out["scale"] == {"action.scale": [1.0] * 4}  # the shipped card's units are "normalized"
    print(f"launch-side imports and card reads: {out['seconds']:.2f} s")


def test_card_json_errors_name_the_weights(tmp_path):
    from actdistill_ros.ros.launch_arguments import camera_topics, read_card_json

    with pytest.raises(ValueError, match=r"launch argument weights '.*nowhere': no card.json at"):
        camera_topics("", str(tmp_path / "nowhere"))
    (tmp_path / "card.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a readable JSON model card"):
        read_card_json(tmp_path)
    (tmp_path / "card.json").write_text(json.dumps({"kind": "student"}))
    with pytest.raises(ValueError, match="has no vla_config and action_space"):
        read_card_json(tmp_path)
    # The .safetensors file of a weights directory names the same card.
    assert read_card_json(SHIPPED_STUDENT / "model.safetensors") == read_card_json(SHIPPED_STUDENT)


def test_replay_node_parameters_are_declared_by_the_node(declared_parameters, tmp_path):
    """rclpy ignores a parameter override the node does not declare, so a misspelt or retired name would
    silently do nothing: what replay_eval.launch.py and replay_eval's spawned nodes pass must be declared."""
    import numpy as np

    from actdistill_ros.data import TopicConfig, write_episode_bag
    from actdistill_ros.policy import create_untrained_policy
    from actdistill_ros.ros.launch_arguments import replay_node_parameters
    from actdistill_ros.ros.replay import cli as replay_cli
    from actdistill_ros.ros.replay.bag_inspection import inspect_bag
    from actdistill_ros.ros.replay.ros_side import SpawnedNode
    from actdistill_ros.weights import load_card

    launched = replay_node_parameters(str(SHIPPED_STUDENT), "cpu", ["/camera/image_raw"], ["raw"], "/instruction",
                                      "/joint_states")
    assert "action.scale" in launched  # the shipped card is in normalized units
    assert set(launched) <= declared_parameters, set(launched) - declared_parameters
    weights = create_untrained_policy(tmp_path / "w", size="tiny", student=True, state_dim=4)
    card = load_card(weights)
    rng = np.random.default_rng(0)
    bag = write_episode_bag(tmp_path / "bag", images=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
                            instruction="reach", states=rng.normal(size=(4, 4)), actions=rng.normal(size=(4, 4)),
                            topics=TopicConfig(), action_names=card.action_space.names)
    plan = inspect_bag(bag, TopicConfig(), [card])
    args = replay_cli.build_parser().parse_args([str(bag), "--weights", str(weights), "--threshold", "0.5"])
    spawned = SpawnedNode.parameters("student", weights, card, plan, {t: t for t in plan.topics()}, args)
    assert {"camera.transports", "topics.state", "router.keep_fraction", "enable_output"} <= set(spawned)
    assert spawned["enable_output"] is False and spawned["camera.transports"] == ["raw"]
    assert set(spawned) <= declared_parameters, set(spawned) - declared_parameters
