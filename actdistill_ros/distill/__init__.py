"""Offline training: teacher behaviour cloning and ActDistill stages 1 and 2 (torch only, no ROS)."""
