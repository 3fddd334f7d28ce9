"""Process-wide debug switch for the runtime: extra checks that cost time on every message.

Off by default. ``MFO_DEBUG=1`` in the environment turns it on at import; tests turn it on
with :func:`set_debug`. Channels read it when they are opened, so a channel opened while
debug mode is off never pays for the check.
"""

from __future__ import annotations

import os

__all__ = ["debug_enabled", "set_debug"]

_TRUE = frozenset({"1", "true", "yes", "on"})

_enabled = os.environ.get("MFO_DEBUG", "").strip().lower() in _TRUE


def set_debug(enabled: bool) -> bool:
    """Turn runtime debug checks on or off for channels opened from now on.

    Args:
      enabled: ``True`` to check every message sent on a channel against the channel's
        declared type (a mismatch raises ``TypeError`` at the sender).

    Returns:
      The previous setting, so a test can restore it.
    """
    global _enabled
    previous = _enabled
    _enabled = bool(enabled)
    return previous


def debug_enabled() -> bool:
    """Whether debug checks are on (read by channels when they are opened)."""
    return _enabled
