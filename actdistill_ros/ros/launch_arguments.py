"""Launch-argument parsing shared by the launch files (plain Python, so it is tested without the
`launch` package)."""

from __future__ import annotations


def threshold_override(text: str) -> dict[str, float]:
    """``{"router.threshold": value}`` for a given ``threshold`` launch argument; ``{}`` when it is
    empty, so the policy's card ``default_threshold`` applies."""
    text = text.strip()
    if not text:
        return {}
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"launch argument threshold must be a number in [0, 1], got {text!r}")
    return {"router.threshold": value}
