"""Frame rates: the monitor draws values and charts at separate, bounded rates.

A run can send thousands of records a second while a history loads; drawing on each one
would spend the CPU on frames nobody sees. Textual coalesces repaints, but not the work of
building what a widget shows (a chart frame costs ~10x a value frame), so each kind of frame
goes through a `Throttle`.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Throttle:
    """Calls `draw` at most `rate` times a second. The first request after a quiet spell draws
    on the next turn of the event loop; later ones within the interval become one draw at its end."""

    def __init__(self, node, rate: float, draw: Callable[[], None]):
        self.node = node  # a Textual MessagePump: its timers and call_later
        self.interval = 1.0 / rate
        self.draw = draw
        self.last = -1e9  # monotonic time of the last draw
        self._timer = None
        self._queued = 0  # generation of the request waiting in call_later (0: none)
        self._generation = 0

    @property
    def pending(self) -> bool:
        return self._timer is not None or self._queued != 0

    def request(self) -> None:
        if self.pending:
            return
        delay = self.last + self.interval - time.monotonic()
        if delay > 0.001:
            self._timer = self.node.set_timer(delay, self._fire)
        else:
            self.soon()

    def soon(self) -> None:
        """Draw on the next turn of the loop whatever the rate (a key changed the view, a run's
        first records): what else arrives before that turn is in the same draw."""
        if self._queued:
            return
        self.cancel()
        self._generation += 1
        self._queued = self._generation
        self.node.call_later(self._fire_queued, self._generation)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        self._queued = 0

    def _fire_queued(self, generation: int) -> None:
        if generation == self._queued:  # not dropped by now() or cancel() in the meantime
            self._fire()

    def _fire(self) -> None:
        self._timer = None
        self._queued = 0
        self.last = time.monotonic()
        self.draw()


CHARTS_PER_VALUE_FRAME = 5  # charts redraw at a fifth of the value rate
PANEL_INTERVAL_S = 5.0  # the profiler's whole-text panel at most this often


def rates(fps: float, chart_fps: float | None = None) -> tuple[float, float, float]:
    """One `--fps` governs every frame: (value frames/s, chart frames/s, seconds between
    profiler panel frames). Charts run at fps/5 (at least one frame every 5 s), never faster
    than the values; `chart_fps` overrides that (still capped by `fps`)."""
    fps = max(0.2, fps)
    charts = chart_fps if chart_fps is not None else fps / CHARTS_PER_VALUE_FRAME
    charts = min(fps, max(0.2, charts))
    return fps, charts, max(PANEL_INTERVAL_S, 1.0 / charts)
