"""The policy node's parts, one file per concern: parameters, inputs, messages, diagnostics, and
the core that wires them to the model and the motion controller (actdistill_ros.control)."""
