"""Launch-argument parsing shared by the launch files (plain Python, so it is tested without the
`launch` package)."""

from __future__ import annotations


def threshold_override(text: str) -> dict[str, float]:
    """The node parameters of a ``threshold`` launch argument: ``{}`` when it is empty (the card's
    routing applies); else that threshold with ``router.keep_fraction`` 0, since a threshold asked
    for by name means threshold routing (a keep fraction above 0 would override it)."""
    text = text.strip()
    if not text:
        return {}
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"launch argument threshold must be a number in [0, 1], got {text!r}")
    return {"router.threshold": value, "router.keep_fraction": 0.0}


def camera_topics(text: str, weights: str | None = None) -> list[str]:
    """The camera topics of a ``camera_topics`` launch argument, in the policy's order: topics separated
    by commas or spaces ("/scene,/wrist" or "[/scene, /wrist]"). Empty: the camera_names of the card
    of ``weights``, else the one default camera."""
    topics = text.strip().strip("[]").replace(",", " ").split()
    bad = [t for t in topics if not t.startswith("/")]
    if bad:
        raise ValueError(f"launch argument camera_topics: expected absolute topic names like /camera/image_raw, "
                         f"separated by commas, got {text!r}")
    if topics:
        return topics
    from actdistill_ros.data.config import DEFAULT_CAMERA_TOPIC
    from actdistill_ros.weights import load_card

    return (load_card(weights).camera_names if weights else []) or [DEFAULT_CAMERA_TOPIC]


def camera_topic_flags(cameras: list[str]) -> list[str]:
    """``--camera-topic`` once per camera, for a command line such as replay_eval's."""
    return [arg for camera in cameras for arg in ("--camera-topic", camera)]


def policy_executable(lifecycle: str) -> str:
    """The policy node's executable for a ``lifecycle`` launch argument: the managed node
    (policy_lifecycle_node) for true, the self-starting policy_node for false."""
    value = lifecycle.strip().lower()
    if value not in ("true", "false"):
        raise ValueError(f"launch argument lifecycle must be true or false, got {lifecycle!r}")
    return "policy_lifecycle_node" if value == "true" else "policy_node"
