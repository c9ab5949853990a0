"""Which layout suits the terminal: the monitor is usable from 60x18, good from 120x40.

    tiny    below MIN_W x MIN_H: one line saying how large to make the terminal
    narrow  under 120 columns: the side panels (profiler, checks, events) are hidden;
            `p` shows them in place of the charts
    short   under 36 rows: one row of three tiles (moving the selection pages through
            them), so that every tile keeps a chart and the detail chart its scale

The app sets the layout's classes on its screen when it mounts and on every resize;
monitor.tcss says what each class does.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.widgets import Static

MIN_W, MIN_H = 60, 18
NARROW_W = 120
SHORT_H = 36


@dataclass(frozen=True)
class Layout:
    tiny: bool
    narrow: bool
    short: bool

    @property
    def name(self) -> str:
        if self.tiny:
            return "tiny"
        return "+".join(n for n, on in (("narrow", self.narrow), ("short", self.short)) if on) or "full"


def layout_for(width: int, height: int) -> Layout:
    return Layout(width < MIN_W or height < MIN_H, width < NARROW_W, height < SHORT_H)


class TooSmall(Static):
    """Shown instead of everything else when the terminal is below the minimum."""

    def show(self, width: int, height: int) -> None:
        self.update(
            Text(
                f"rlhf-tui needs a terminal of at least {MIN_W}x{MIN_H}; this one is {width}x{height}. "
                "Make it larger (or the font smaller); q quits.",
                "bold",
            )
        )


def screen_classes(lay: Layout, panels_shown: bool | None, detail_shown: bool) -> dict[str, bool]:
    """The classes of the main screen (monitor.tcss): `panels_shown` None = as the size suits."""
    panels = panels_shown if panels_shown is not None else not lay.narrow
    return {
        "-tiny": lay.tiny,
        "-short": lay.short,
        "-no-panels": not panels,
        "-panels-only": panels and lay.narrow,
        "-no-detail": not detail_shown,
    }


def tiles_shown(n: int, selected: int, short: bool, cols: int) -> tuple[list[bool], str]:
    """Which of `n` tiles are shown, and the page note: a short terminal shows the row of the
    selected tile only."""
    page = selected // cols
    pages = (n + cols - 1) // cols
    shown = [not short or k // cols == page for k in range(n)]
    return shown, (f"tiles {page + 1}/{pages}: arrows page" if short else "")
