"""ROS 2 layer: nodes, QoS profiles and environment utilities (the only place rclpy is imported)."""
