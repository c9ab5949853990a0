"""Snapshots of the box panel (GPUs, host CPU and RAM) beside a run, from fixed samples: 160x48
with the side panels, 80x24 where the side panels are behind `p`, and a box without a GPU.

Update after an intended change with `pytest tests/tui/test_box_snapshot.py --snapshot-update`.
"""

from __future__ import annotations

import time

import pytest
from tui_helpers import T0, make_run

import tui.app
from tui.app import MonitorApp
from tui.system import NO_GPU, BoxSample, GpuSample

GIB = 1 << 30
N = 40


def _samples(gpus: int) -> list[BoxSample]:
    out = []
    for k in range(N):
        wave = (k * 7) % 40
        out.append(
            BoxSample(
                T0 + 2 * k,
                cpu=20.0 + wave,
                mem_used=(20 + k % 5) * GIB,
                mem_total=251 * GIB,
                gpus=[
                    GpuSample(
                        i,
                        "NVIDIA A100-SXM4-80GB",
                        util=[95.0 - wave, 18.0 + wave / 4][i % 2],
                        mem_used=[(60 + k / 2) * GIB, 20 * GIB][i % 2],
                        mem_total=80 * GIB,
                        temp=[70.0 + k / 4, 84.0][i % 2],
                        power=[390.0, 120.0][i % 2],
                        power_limit=400.0,
                    )
                    for i in range(gpus)
                ],
                gpu_note="" if gpus else NO_GPU,
                source="nvidia-smi" if gpus else "",
            )
        )
    return out


class _FixedBox:
    """Stands in for LocalBox: hands the app fixed samples at once."""

    samples: list[BoxSample] = []

    def __init__(self, on_sample, **kw):
        self.on_sample = on_sample

    def start(self):
        for s in self.samples:
            self.on_sample(s)
        return self

    def close(self) -> None:
        pass


@pytest.fixture
def box_env(monkeypatch, tmp_path):
    for k in ("LC_ALL", "LC_CTYPE", "NO_COLOR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("LANG", "C.UTF-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tui.app, "LocalBox", _FixedBox)
    return monkeypatch


def _app(tmp_path, gpus: int) -> MonitorApp:
    _FixedBox.samples = _samples(gpus)
    paths = make_run(tmp_path / "runs", "box-run", 200, seed=3)
    return MonitorApp(paths.root, clock=lambda: T0 + 200 * 0.5 + 12, live=False, box=True)


def _ready(app: MonitorApp, *keys: str):
    async def wait(pilot):
        deadline = time.monotonic() + 10
        while not (app.settled and app.box.samples == N):
            if time.monotonic() > deadline:
                raise AssertionError("never loaded")
            await pilot.pause(0.05)
        if keys:
            await pilot.press(*keys)
        await pilot.pause(0.3)

    return wait


def test_box_160x48(snap_compare, tmp_path, box_env):
    app = _app(tmp_path, 2)
    assert snap_compare(app, terminal_size=(160, 48), run_before=_ready(app))


def test_box_80x24(snap_compare, tmp_path, box_env):
    """Narrow: the side panels, the box first, in place of the charts (`p`)."""
    app = _app(tmp_path, 1)
    assert snap_compare(app, terminal_size=(80, 24), run_before=_ready(app, "p"))


def test_box_without_a_gpu_160x48(snap_compare, tmp_path, box_env):
    app = _app(tmp_path, 0)
    assert snap_compare(app, terminal_size=(160, 48), run_before=_ready(app))
