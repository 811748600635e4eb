"""What the policy node may command, without ROS or torch.

One safety contract (``limits.ActionLimits``) owns every limit on the arm's commands, in physical
units per second; ``freshness`` judges each input by its header stamp; ``motion.MotionController``
applies both on every control tick. The policy does not clamp, and the ROS layer only turns the
controller's results into messages, so this package is the one place that says what the arm may do.
Every rule runs on an injectable clock and is unit-tested without DDS (test/test_control_*.py).
"""
