"""The box panel: each GPU (utilisation, memory, temperature, power) and the host (CPU, RAM),
each with a short sparkline of its last samples, coloured against thresholds.

The thresholds are the box alerts' own (protocol.alerts: gpu_underused, gpu_memory_near_full,
gpu_thermal_slowdown), so a colour and an alert never disagree; temperature uses the GPU's
slowdown temperature where NVML gives it, else TEMP_WARN / TEMP_CRIT.
"""

from __future__ import annotations

from rich.text import Text
from textual.strip import Strip

from protocol.alerts import DEFAULT_RULES, Rule
from protocol.text import safe_text

from ..glyphs import MODE, g
from ..system import BoxHistory, GpuSample
from .charts import StripWidget
from .lines import cells_of, text_runs

TEMP_WARN, TEMP_CRIT = 80.0, 87.0  # C, when the GPU's slowdown temperature is unknown (nvidia-smi)
STYLE = {"ok": "green", "warning": "yellow", "critical": "bold red", None: "grey50"}


def _rule(name: str) -> Rule | None:
    return next((r for r in DEFAULT_RULES if r.name == name), None)


def _threshold(name: str, default: float) -> float:
    r = _rule(name)
    return r.threshold if r is not None else default


UTIL_LOW = _threshold("gpu_underused", 40.0)  # %
MEM_FULL = 100.0 * _threshold("gpu_memory_near_full", 0.95)  # % of total
MEM_WARN = MEM_FULL - 10.0
TEMP_MARGIN = _threshold("gpu_thermal_slowdown", 1.0)  # C below slowdown that counts as reached


def util_level(v: float | None) -> str | None:
    return None if v is None else ("warning" if v < UTIL_LOW else "ok")


def mem_level(pct: float | None) -> str | None:
    if pct is None:
        return None
    return "critical" if pct > MEM_FULL else "warning" if pct > MEM_WARN else "ok"


def temp_level(v: float | None, slowdown: float | None = None) -> str | None:
    if v is None:
        return None
    crit = slowdown - TEMP_MARGIN if slowdown else TEMP_CRIT
    warn = slowdown - 8.0 if slowdown else TEMP_WARN
    return "critical" if v >= crit else "warning" if v >= warn else "ok"


def host_level(pct: float | None) -> str | None:
    if pct is None:
        return None
    return "critical" if pct > 97 else "warning" if pct > 90 else "ok"


def sparkline(values: list[float | None], width: int, lo: float, hi: float, level) -> Text:
    """The last `width` values, one cell each (right-aligned), each coloured by its own level."""
    glyphs = g("spark")
    t = Text()
    vals = values[-width:]
    t.append(" " * (width - len(vals)))
    span = hi - lo if hi > lo else 1.0
    for v in vals:
        if v is None:
            t.append(" ")
            continue
        k = min(len(glyphs) - 1, max(0, int((v - lo) / span * len(glyphs))))
        t.append(glyphs[k], STYLE[level(v)])
    return t


def _mark(level: str | None) -> str:
    """With NO_COLOR (or in ASCII) a level is also a symbol."""
    if MODE.color and not MODE.ascii:
        return ""
    return {"warning": g("warn"), "critical": g("crit")}.get(level or "", "")


def _gib(b: float | None) -> str:
    return g("dash") if b is None else f"{b / 2**30:.0f}" if b >= 100 * 2**30 else f"{b / 2**30:.1f}"


def _value(t: Text, text: str, level: str | None, width: int) -> None:
    text += _mark(level)
    t.append(text.rjust(width), STYLE[level] if level else "grey50")


class BoxPanel(StripWidget):
    """What `show(history, width)` is given: the last samples of the box (tui/system.py). Drawn
    with the Line API (charts.StripWidget): of each line only the cells that changed since the
    last sample go to the terminal (a sample every 2 s moves every sparkline by one cell)."""

    DEFAULT_CSS = "BoxPanel { height: auto; }"
    BORDER_TITLE = "box"
    BORDER_SUBTITLE = "g: hide"

    def __init__(self, **kw):
        super().__init__(**kw)
        self._rows: list[Text] = [Text("sampling the box" + g("ellipsis"), "grey50")]
        self._last: tuple[BoxHistory, str] | None = None

    @property
    def plain(self) -> str:
        """What the panel shows, as text (tests)."""
        return "\n".join(r.plain for r in self._rows)

    def get_content_height(self, container, viewport, width: int) -> int:
        return max(1, len(self._rows))

    def render_line(self, y: int) -> Strip:
        w = self.content_size.width
        base = self.visual_style.rich_style
        runs = text_runs(self._rows[y], self.app.console) if y < len(self._rows) else []
        self._shown[y] = cells_of(runs)
        return self._strip(runs, w, base)

    def on_resize(self) -> None:
        """The sparklines' width follows the panel's (shown at last, a resize, `p` on a narrow one)."""
        super().on_resize()
        if self._last is not None and self.display:
            self.show(self._last[0], self.content_size.width, self._last[1])

    def show(self, box: BoxHistory, width: int, where: str = "") -> None:
        self._last = (box, where)
        title = f"box {where}".strip()
        if self.border_title != title:
            self.border_title = title
        rows = self.text(box, width).split("\n")
        if len(rows) != len(self._rows):  # a GPU more or less: a new height
            self._rows = list(rows)
            self._forget_shown()
            self.refresh(layout=True)
            return
        self._rows = list(rows)
        for y, row in enumerate(rows):
            self._mark_changed(y, text_runs(row, self.app.console))

    @staticmethod
    def text(box: BoxHistory, width: int) -> Text:
        t = Text(no_wrap=True, overflow="ellipsis")
        s = box.last
        if s is None:
            t.append("sampling the box" + g("ellipsis"), "grey50")
            return t
        width = max(40, width)
        dash = g("dash")
        if s.gpus:
            fixed = 2 + 5 + 1 + 12 + 1 + 6 + 6  # index, util, mem, temp, power and spaces: 2 sparklines

            sw = max(3, (width - fixed) // 2)
            names: dict[str, int] = {}
            for gpu in s.gpus:
                names[gpu.name] = names.get(gpu.name, 0) + 1
            head = ", ".join(f"{n}x {safe_text(name, 40)}" for name, n in names.items())
            t.append(f"{head}", "bold")
            t.append(f"  ({s.source})\n" if s.source else "\n", "grey50")
            t.append(f"{'':2}{'util':>5} {'':{sw}}{'mem GiB':>12} {'':{sw}}{'temp':>6}{'power':>6}\n", "grey62")
            for k, gpu in enumerate(s.gpus):
                BoxPanel._gpu_line(t, box, gpu, sw)
                if k < len(s.gpus) - 1:
                    t.append("\n")
        else:
            t.append(safe_text(s.gpu_note or "no GPU seen", 300), "grey62")
        t.append("\n")
        sw = max(3, (width - 30) // 2)
        t.append("host ", "bold")
        cpu_l = host_level(s.cpu)
        _value(t, dash if s.cpu is None else f"cpu {s.cpu:.0f}%", cpu_l, 8)
        t.append(" ")
        t.append_text(sparkline(box.recent(("cpu",), sw), sw, 0, 100, host_level))
        ram = None if s.mem_used is None or not s.mem_total else 100 * s.mem_used / s.mem_total
        _value(t, f"ram {_gib(s.mem_used)}/{_gib(s.mem_total)}", host_level(ram), 15)
        t.append(" ")
        t.append_text(sparkline(box.recent(("ram",), sw), sw, 0, 100, host_level))
        return t

    @staticmethod
    def _gpu_line(t: Text, box: BoxHistory, gpu: GpuSample, sw: int) -> None:
        dash = g("dash")
        i = gpu.index
        t.append(f"{i:<2}"[:2], "bold")
        _value(t, dash if gpu.util is None else f"{gpu.util:.0f}%", util_level(gpu.util), 5)
        t.append(" ")
        t.append_text(sparkline(box.recent((i, "util"), sw), sw, 0, 100, util_level))
        pct = None if gpu.mem_used is None or not gpu.mem_total else 100 * gpu.mem_used / gpu.mem_total
        _value(t, f"{_gib(gpu.mem_used)}/{_gib(gpu.mem_total)}", mem_level(pct), 12)
        t.append(" ")
        t.append_text(sparkline(box.recent((i, "mem"), sw), sw, 0, 100, mem_level))
        deg = "C" if MODE.ascii else "°C"
        _value(t, dash if gpu.temp is None else f"{gpu.temp:.0f}{deg}", temp_level(gpu.temp, gpu.slowdown_temp), 6)
        capped = gpu.power is not None and gpu.power_limit and gpu.power >= 0.98 * gpu.power_limit
        _value(t, dash if gpu.power is None else f"{gpu.power:.0f}W", "warning" if capped else "ok", 6)
