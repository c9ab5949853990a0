"""What the terminal can show: Unicode or plain ASCII, colour or not.

Chosen once at start (`configure`): ASCII when `--ascii` is given or the locale is not UTF-8
(`LANG=C` over SSH, a Linux console), so that nothing but ASCII reaches such a terminal,
borders included. `NO_COLOR` (https://no-color.org) turns colour off (Textual does that)
and here makes every state also readable as a symbol or a word.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

UNICODE = {
    "warn": "⚠",
    "crit": "⛔",
    "ok": "✔",
    "bad": "✖",
    "up": "▲",
    "down": "▼",
    "loading": "⟳",
    "ellipsis": "…",
    "dash": "—",
    "dot": "·",
    "hline": "╌",
    "cursor": "│",
    "range": "–",
    "spark": "▁▂▃▄▅▆▇█",
}
ASCII = {
    "warn": "!",
    "crit": "!!",
    "ok": "ok",
    "bad": "x",
    "up": "^",
    "down": "v",
    "loading": "~",
    "ellipsis": "...",
    "dash": "-",
    "dot": "|",
    "hline": "-",
    "cursor": "|",
    "range": "-",
    "spark": "_.-=+*#@",
}


class _Mode:
    ascii = False
    color = True
    g: Mapping[str, str] = UNICODE


MODE = _Mode()


def utf8_locale(env: Mapping[str, str] | None = None) -> bool:
    """Whether the locale says UTF-8: the first of LC_ALL, LC_CTYPE, LANG that is set decides
    (as setlocale does); none set counts as UTF-8 (most terminals today).

    Python itself turns a C locale into C.UTF-8 at start (PEP 538: it sets LC_CTYPE in the
    environment), so LC_CTYPE=C.UTF-8 with LANG unset, C or POSIX is read as what the user
    has: the C locale (LANG=C or POSIX)."""
    env = os.environ if env is None else env
    ctype = env.get("LC_CTYPE", "").lower().replace("-", "")
    if not env.get("LC_ALL") and ctype in ("c.utf8", "utf8") and env.get("LANG") in ("C", "POSIX"):
        return False  # LANG=C, coerced by Python
    for k in ("LC_ALL", "LC_CTYPE", "LANG"):
        v = env.get(k)
        if v:
            return "utf8" in v.lower().replace("-", "")
    return True


def configure(ascii: bool | None = None, env: Mapping[str, str] | None = None) -> _Mode:
    """Set the mode for the process: `ascii` None = from the locale."""
    env = os.environ if env is None else env
    MODE.ascii = (not utf8_locale(env)) if ascii is None else ascii
    MODE.color = "NO_COLOR" not in env or env.get("NO_COLOR", "") == ""
    MODE.g = ASCII if MODE.ascii else UNICODE
    return MODE


def g(name: str) -> str:
    return MODE.g[name]


_BOX = {
    **{c: "-" for c in "─━═╌╍┄┅┈┉╴╶╸╺▔▁"},
    **{c: "|" for c in "│┃║╎╏┆┇┊┋╵╷╹╻▏▕▎▍▌▋▊▉"},
    **{c: "+" for c in "╭╮╰╯┌┐└┘├┤┬┴┼┏┓┗┛┣┫┳┻╋╔╗╚╝╠╣╦╩╬"},
    **{c: "#" for c in "█▇▆▅▄▃▂▀▐░▒▓■"},
    "…": ".",
    "—": "-",
    "–": "-",
    "·": "|",
    "•": "*",
    "→": ">",
    "←": "<",
    "↑": "^",
    "↓": "v",
    "▲": "^",
    "▼": "v",
    "⚠": "!",
    "⛔": "!!",
    "✔": "+",
    "✖": "x",
    "⟳": "~",
    "▶": ">",
    "◀": "<",
    "\u00a0": " ",
}
_TABLE = {ord(k): v for k, v in _BOX.items()}


def ascii_line(text: str) -> str:
    """A line of terminal output as ASCII, cell for cell (widths are kept): box drawing and block
    characters to -|+#, braille dots to '.', anything else outside ASCII to '?'."""
    if text.isascii():
        return text
    out = text.translate(_TABLE)
    if out.isascii():
        return out
    return "".join(c if c.isascii() else ("." if "\u2800" <= c <= "\u28ff" else "?") for c in out)


to_ascii = ascii_line


def _make_filter():
    from textual.filter import LineFilter

    class AsciiFilter(LineFilter):
        """The last stage of every frame in ASCII mode: whatever a widget drew (borders,
        scroll bars, Textual's own footer), the terminal gets ASCII only, cell for cell."""

        def apply(self, segments, background):
            from rich.segment import Segment

            return [Segment(ascii_line(text), style, control) for text, style, control in segments]

    return AsciiFilter


AsciiFilter = _make_filter()
