"""Replay evaluation of rosbag2 demos and LeRobotDataset episodes (`actdistill replay-eval`,
`ros2 run actdistill_ros replay_eval`).

- ``bag_inspection``: what a bag holds, checked before anything starts, and its messages (no ROS).
- ``dataset_episode``: a LeRobotDataset v3 episode planned into the same shape, its messages made
  from its frames as a robot's drivers publish them (no ROS).
- ``ros_side``: the replay process's rclpy node (publishers, ActionChunk/RouterStats recording) and
  the policy_node subprocesses it spawns.
- ``player``: publishes a plan's messages at the recorded timing (or as fast as chunks come back).
- ``cli``: the command line and the run: check, replay each policy, write the report.
"""

import logging

log = logging.getLogger("actdistill_ros.replay_eval")  # one logger for the whole tool
