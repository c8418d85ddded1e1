"""The one clock type: seconds since the epoch, as ``time.time`` gives them.

Everything that keeps state over time (enrollment deadlines, lockouts, the
replay marker, repeat windows) takes one, so tests move time by hand.
"""

from __future__ import annotations

from collections.abc import Callable

Clock = Callable[[], float]
