"""Meta-World v3 simulation: task wrapper, scripted-expert demo collection, closed-loop evaluation.

Importing a submodule that renders sets ``MUJOCO_GL=egl`` unless the caller chose a backend.
"""
