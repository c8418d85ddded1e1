"""The one test clock for the product's injected clocks (``Clock`` in
policy/clock.py: a function returning Unix time): it moves only when the test
moves it. Twisted's ``task.Clock`` is the reactor's, for ``callLater``; this one
is for ``clock()`` calls."""

from __future__ import annotations


class ManualClock:
    """``clock()`` is ``clock.t``; set ``t`` or ``advance`` it."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds
