"""pip packaging for actdistill_ros.

`pip install .` needs no ROS: it installs the torch core and the `actdistill` CLI. The ROS 2
nodes additionally need rclpy and the message packages, from a ROS 2 Jazzy install on a robot
(colcon build, see package.xml/CMakeLists.txt) or from PyPI wheels (requirements-ros.txt).
"""

from setuptools import find_packages, setup

CORE_REQUIREMENTS = [
    "torch>=2.3",  # requirements.txt pins the tested version
    "numpy>=1.26,<3",
    "opencv-python-headless>=4.9",
    "pyyaml>=6.0",
    "safetensors>=0.4",
    "rosbags>=0.11",
    "tqdm>=4.66",
    "pyarrow>=15",  # LeRobotDataset v3 demonstrations: parquet tables
    "av>=15.1",  # and their mp4 frames (AV1, H.264, ...)
    "matplotlib>=3.8",
    # hf_vla teachers (PaliGemma, SmolVLM, Qwen2.5-VL, ...): requirements.txt pins the tested
    # 5.x release; loading such a weights directory needs it, so it is core, not an extra.
    "transformers>=5.23,<6",
]

EXTRAS = {
    # Nothing to pip install on a ROS 2 machine: rclpy and the message packages come with
    # ROS (apt). Without ROS, `pip install -r requirements-ros.txt` gives the Jazzy wheels.
    "ros": [],
    "sim": ["metaworld==3.1.1", "packaging"],
    "test": ["pytest"],
}

setup(
    name="actdistill_ros",
    version="0.1.0",
    description="ActDistill for ROS 2: distil a VLA teacher into a layer-skipping student and run it as a node",
    license="Apache-2.0",
    author="ActDistill ROS maintainers",
    author_email="maintainers@actdistill.dev",
    python_requires=">=3.10",
    packages=find_packages(include=["actdistill_ros", "actdistill_ros.*"]),
    include_package_data=False,  # only .py files: no weights, bags or build outputs
    install_requires=CORE_REQUIREMENTS,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "actdistill = actdistill_ros.cli:main",
            "policy_node = actdistill_ros.ros.policy_node:main",
            "policy_lifecycle_node = actdistill_ros.ros.policy_lifecycle_node:main",
            "sim_arm_node = actdistill_ros.ros.sim_arm_node:main",
            "replay_eval = actdistill_ros.ros.replay.cli:main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
    ],
)
