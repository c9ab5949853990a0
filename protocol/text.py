"""Text from a run directory made safe for a terminal.

Everything read from a run dir (a run id, a status, an event's message, a path, a log
line) may come from someone else's tarball. Printed raw, an ESC sequence in it can retitle
the terminal (OSC 2), clear the screen (CSI 2J), move the cursor or, on some terminals,
do worse; a bidi override can make text read differently from what it is. `safe_text`
shows such characters escaped instead of letting the terminal interpret them.
"""

from __future__ import annotations

import re

# C0 controls (all of them: a newline in a one-line field is a forgery waiting to happen),
# DEL, C1 controls (U+0080..U+009F: 8-bit CSI, OSC, ...), the bidi controls (ALM, LRM, RLM,
# LRE..RLO, LRI..PDI), the line/paragraph separators, and lone surrogates (a file name
# decoded with surrogateescape; printing one raises UnicodeEncodeError).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")
_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(ch: str) -> str:
    short = _SHORT.get(ch)
    if short is not None:
        return short
    cp = ord(ch)
    return f"\\x{cp:02x}" if cp <= 0xFF else f"\\u{cp:04x}"


def _escape_match(m: re.Match[str]) -> str:
    return _escape(m.group())


def _to_str(s: object) -> str:
    if isinstance(s, str):
        return s
    if isinstance(s, (bytes, bytearray, memoryview)):
        return bytes(s).decode("utf-8", "backslashreplace")
    try:
        return str(s)
    except Exception:  # noqa: BLE001 - a hostile object's __str__, or an int over the digit limit
        return f"<unprintable {type(s).__name__}>"


def safe_text(s: object, max_len: int | None = None) -> str:
    """`s` (anything: str, bytes, a number, None) as text a terminal shows but never obeys.

    Control characters (C0 including tab and newline, DEL, C1), bidi controls, U+2028/9 and
    lone surrogates are shown escaped (`\\x1b`, `\\n`, `\\u202e`); nothing else changes (a
    backslash stays as it is). Bytes are decoded as UTF-8, bad bytes shown as `\\xNN`.
    With `max_len`, the result is at most that many characters, ending in `…` when cut
    (an escape is never cut in half). Fast when there is nothing to escape.
    """
    text = _to_str(s)
    if _UNSAFE.search(text) is not None:
        if max_len is None:
            return _UNSAFE.sub(_escape_match, text)
        return _cut_escaped(text, max_len)
    if max_len is not None and len(text) > max_len:
        return text[: max(0, max_len - 1)] + "…" if max_len > 0 else ""
    return text


def _cut_escaped(text: str, max_len: int) -> str:
    if max_len <= 0:
        return ""
    pieces: list[tuple[str, bool]] = []  # (text, is an escape)
    pos = 0
    for m in _UNSAFE.finditer(text):
        pieces.append((text[pos : m.start()], False))
        pieces.append((_escape(m.group()), True))
        pos = m.end()
    pieces.append((text[pos:], False))
    if sum(len(p) for p, _ in pieces) <= max_len:
        return "".join(p for p, _ in pieces)
    budget = max_len - 1  # room for the ellipsis
    out: list[str] = []
    n = 0
    for p, is_escape in pieces:
        if n + len(p) <= budget:
            out.append(p)
            n += len(p)
            continue
        if not is_escape:  # plain text is cut anywhere; an escape is dropped whole
            out.append(p[: budget - n])
        break
    return "".join(out) + "…"
