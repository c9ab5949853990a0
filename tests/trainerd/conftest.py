"""Shared fixtures of the trainer tests: one real smoke run per session, run through the CLI."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from protocol.rundir import RunPaths


def trainerd(*args: str, timeout: float = 240, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `trainerd` CLI in a fresh interpreter (one thread, no SEED from the shell)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("SEED", None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "trainerd", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@dataclass
class SmokeRun:
    paths: RunPaths
    wall_s: float
    cpu_s: float  # user+sys of the trainer process: what the run costs on an idle machine
    proc: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def trainer_smoke_run(tmp_path_factory) -> SmokeRun:
    runs = tmp_path_factory.mktemp("smoke_runs")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = trainerd("start", "--smoke", "--foreground", "--runs-dir", str(runs), "--run-id", "smoke")
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return SmokeRun(RunPaths(runs / "smoke"), wall, cpu, proc)


@pytest.fixture(scope="session")
def trainerd_cli():
    """The `trainerd` runner above, for test modules (conftest is not importable by name)."""
    return trainerd
