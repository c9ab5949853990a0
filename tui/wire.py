"""What goes over the wire: Textual writes a dirty span from the left edge of the widget it is
in to the span's right end (`ChopsUpdate.render_segments` crops only on the right; its Rich
rendering path crops both). A chart that grew by one column at its right edge would resend
its whole row. `crop_both_ends` makes the terminal path crop on the left too, so what is
written is the changed cells (and their cursor move), nothing else.

Applied once, by the app; if Textual's internals are not what this expects, nothing is
changed (the monitor works as before, only with more bytes).
"""

from __future__ import annotations

_applied = False


def crop_both_ends() -> bool:
    """Patch `textual._compositor.ChopsUpdate.render_segments`; True if it is in place."""
    global _applied
    if _applied:
        return True
    try:
        from rich.control import Control
        from textual._compositor import ChopsUpdate
    except ImportError:
        return False
    if not all(hasattr(ChopsUpdate, a) for a in ("render_segments", "__init__")):
        return False

    def render_segments(self, console) -> str:
        sequences: list[str] = []
        append = sequences.append
        move_to = Control.move_to
        chops = self.chops
        chop_ends = self.chop_ends
        last_y = self.spans[-1][0]
        for y, x1, x2 in self.spans:
            line = chops[y]
            ends = chop_ends[y]
            for end, (x, strip) in zip(ends, line.items()):
                if strip is None or x > x2 or end <= x1:
                    continue
                left, right = max(x, x1), min(end, x2)
                if left >= right:
                    continue
                if left != x or right != end:
                    strip = strip.crop(left - x, right - x)
                append(move_to(left, y).segment.text)
                append(strip.render(console))
            if y != last_y:
                append("\n")
        return "".join(sequences)

    ChopsUpdate.render_segments = render_segments
    _applied = True
    return True
