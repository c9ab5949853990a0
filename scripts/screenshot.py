"""Save the monitor's main screen as SVG (docs/screenshot_main.svg) for a finished run.

python scripts/screenshot.py RUN_DIR [OUT.svg]
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from tui.app import MonitorApp


async def main(run: str, out: Path) -> None:
    app = MonitorApp(run, live=False)
    async with app.run_test(size=(160, 50)) as pilot:
        for _ in range(200):  # until the history is loaded, its alerts evaluated and drawn (10 s at most)
            if app.settled and app.model.history_done:
                break
            await pilot.pause(0.05)
        await pilot.pause(0.2)
        app.save_screenshot(filename=out.name, path=str(out.parent))
    print(out)


if __name__ == "__main__":
    run = sys.argv[1]
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/screenshot_main.svg").resolve()
    asyncio.run(main(run, out))
