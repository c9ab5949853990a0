"""Send only what changed: the cells of a line that differ from what is on screen.

Textual repaints a dirty region by writing every cell in it, whether or not the terminal
already shows it. Over SSH the bytes are the cost, so widgets that change a little and often
(the header's counters, a tile's value, a chart that grew by a column) compute which cells
differ between the old and the new lines and mark only that span of each line dirty.
"""

from __future__ import annotations

from rich.cells import get_character_cell_size
from rich.console import Console
from rich.segment import Segment
from rich.style import Style
from rich.text import Text

Cell = tuple[str, object]
Runs = list[tuple[str, object]]


def cells_of(runs: Runs) -> list[Cell]:
    """One (character, style) per terminal cell; a wide character's second cell is ('', style)."""
    out: list[Cell] = []
    for chars, style in runs:
        for c in chars:
            out.append((c, style))
            if get_character_cell_size(c) == 2:
                out.append(("", style))
    return out


def changed_span(old: list[Cell] | None, new: list[Cell]) -> tuple[int, int] | None:
    """[x0, x1) of the cells that differ (a shorter line counts as blank past its end)."""
    if old is None:
        return (0, max(1, len(new)))
    if old == new:
        return None
    n = max(len(old), len(new))
    blank: Cell = (" ", None)
    x0 = 0
    while x0 < n and (old[x0] if x0 < len(old) else blank) == (new[x0] if x0 < len(new) else blank):
        x0 += 1
    if x0 == n:
        return None
    x1 = n
    while x1 > x0 and (old[x1 - 1] if x1 - 1 < len(old) else blank) == (new[x1 - 1] if x1 - 1 < len(new) else blank):
        x1 -= 1
    # a wide character cut in two would be drawn as half of one: widen over it
    if x0 > 0 and x0 < len(new) and new[x0][0] == "":
        x0 -= 1
    return (x0, x1)


def changed_spans(old: list[Cell] | None, new: list[Cell], gap: int = 8) -> list[tuple[int, int]]:
    """The spans of cells that differ, split where `gap` or more cells in between are
    unchanged (a cursor move costs ~8 bytes; resending a cell costs 1 to 25)."""
    whole = changed_span(old, new)
    if whole is None or old is None:
        return [] if whole is None else [whole]
    x0, x1 = whole
    blank: Cell = (" ", None)
    spans: list[tuple[int, int]] = []
    start = x0
    same = 0
    for x in range(x0, x1):
        if (old[x] if x < len(old) else blank) == (new[x] if x < len(new) else blank) and (
            x + 1 >= len(new) or new[x + 1][0] != ""
        ):
            same += 1
        else:
            if same >= gap and x - same > start:
                spans.append((start, x - same))
                start = x
            same = 0
    spans.append((start, x1))
    return spans


def text_runs(text: Text, console: Console) -> Runs:
    """A one-line Rich Text as runs of (characters, Style)."""
    return [(seg.text, seg.style) for seg in text.render(console) if seg.text and seg.text != "\n"]


def styled(base: Style, style: object, cache: dict) -> Style:
    """`base` combined with a run's style (a style name, a Style, or None), cached."""
    key = (base, style)
    st = cache.get(key)
    if st is None:
        if len(cache) > 512:
            cache.clear()
        if style is None:
            st = base
        elif isinstance(style, Style):
            st = base + style
        else:
            st = base + Style.parse(str(style))
        cache[key] = st
    return st


def segments(runs: Runs, base: Style, cache: dict) -> list[Segment]:
    return [Segment(chars, styled(base, style, cache)) for chars, style in runs]
