"""The headless RLHF (PPO) trainer daemon: `rl/` the algorithm, `run/` a run's lifecycle,
`tools/` the profiler, report and fault injection, `verify/` the M1/M2/M3 checks, `cli.py` on top."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rlhf-kit")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
