"""ROS 2 layer: nodes, QoS and environment helpers (the only place rclpy is imported)."""
