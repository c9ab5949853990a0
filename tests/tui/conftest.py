import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tui_helpers

from tui_helpers import release_writer_locks, runs_dir  # noqa: E402,F401  (fixtures)
