"""The result list of a `trainerd verify` check: named checks, each passed or not with a detail.

Each result is printed as it lands through `say` (the check decides where: under --json stdout
is kept for the one JSON object the monitor's verify buttons read).
"""

from __future__ import annotations

from collections.abc import Callable


class CheckList:
    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.items: list[dict] = []

    def add(self, name: str, passed: bool, detail: str) -> bool:
        self.items.append({"name": name, "passed": bool(passed), "detail": detail})
        self.say(f"{'ok  ' if passed else 'FAIL'} {name}: {detail}")
        return passed

    @property
    def passed(self) -> bool:
        """True only if there was at least one check and every one passed."""
        return bool(self.items) and all(c["passed"] for c in self.items)
