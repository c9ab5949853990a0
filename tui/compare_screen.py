"""The run picker's `d`: the settings diff (tui/compare.py) of the run on screen and the
highlighted one, in a modal. The manifests are read by a reader thread."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Static

from .compare import diff_paths
from .follow import post, spawn


class DiffScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,d,q", "dismiss", "close")]
    DEFAULT_CSS = "DiffScreen { align: center middle; }"

    class Shown(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def __init__(self, a: Path, b: Path):
        super().__init__()
        self.a, self.b = a, b
        self.text = ""

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(Text("reading the two runs' settings…", "grey50"), id="diff-text")

    def on_mount(self) -> None:
        spawn(lambda: post(self, self.Shown(diff_paths(self.a, self.b))), name="diff")

    def on_diff_screen_shown(self, msg: Shown) -> None:
        self.text = msg.text
        self.query_one("#diff-text", Static).update(Text(msg.text + "\n\n(Esc: close)"))
