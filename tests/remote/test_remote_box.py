"""The remote box over ssh:// (tui/remote.py's loop, tui/system.py's RemoteBox): the same
nvidia-smi query and /proc files, read on the remote side over the run's own SSH session.
`rlhf-kit` is a host whose PATH is a small bin dir: the stand-in nvidia-smi (printing NVIDIA's
documented CSV) goes there; `rlhf-test` has no nvidia-smi at all."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tui"))
from tui_helpers import make_run, wait_for  # noqa: E402

from tui.app import MonitorApp  # noqa: E402
from tui.remote import RemoteSync, attach, parse_target  # noqa: E402
from tui.system import BoxSample  # noqa: E402

FAKE = Path(__file__).resolve().parents[1] / "tui" / "fake_gpu" / "nvidia-smi"


@pytest.fixture
def remote_env(sshd, tmp_path, monkeypatch):
    for k, v in sshd.ssh_env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    kit_bin = sshd.config.parent / "bin-kit"
    if not (kit_bin / "nvidia-smi").exists():
        shutil.copy(FAKE, kit_bin / "nvidia-smi")
    return dict(os.environ)


def _samples(sync: RemoteSync, n: int) -> tuple[list[BoxSample], threading.Event]:
    got: list[BoxSample] = []
    done = threading.Event()

    def on(s: BoxSample) -> None:
        got.append(s)
        if len(got) >= n:
            done.set()

    sync.box.on_sample = on
    return got, done


def test_remote_gpus_cpu_and_ram_over_the_same_session(remote_env, tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "r", 10)
    sync = RemoteSync(parse_target(f"ssh://rlhf-kit{runs}"), interval=0.2)
    got, done = _samples(sync, 2)
    try:
        sync.start()
        assert done.wait(15), f"{len(got)} box samples"
        assert sync.connects == 1  # no second connection for the box
    finally:
        sync.close()
    s = got[-1]
    assert s.source == "ssh nvidia-smi" and [g.index for g in s.gpus] == [0, 1]
    assert s.gpus[0].name == "NVIDIA A100-SXM4-80GB" and s.gpus[0].mem_total == 81920 * 2**20
    assert s.gpus[1].power is None and s.gpus[1].temp == 88
    assert s.cpu is not None and 0 <= s.cpu <= 100  # the second sample has an interval
    assert s.mem_total and 0 < s.mem_used < s.mem_total


def test_remote_without_nvidia_smi_says_so(remote_env, tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "r", 10)
    sync = RemoteSync(parse_target(f"ssh://rlhf-test{runs}"), interval=0.2)
    got, done = _samples(sync, 1)
    try:
        sync.start()
        assert done.wait(15)
    finally:
        sync.close()
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has an nvidia-smi: the remote side sees it")
    assert got[0].gpus == [] and got[0].gpu_note == "no GPU seen (no nvidia-smi on the remote PATH)"
    assert got[0].mem_total


@pytest.mark.asyncio
async def test_the_monitor_shows_the_remote_box(remote_env, tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "r", 10)
    sync = RemoteSync(parse_target(f"ssh://rlhf-kit{runs}"), interval=0.2)
    local = sync.start()
    app = MonitorApp(local, clock=sync.clock)
    attach(app, sync)
    try:
        async with app.run_test(size=(160, 48)) as pilot:
            await wait_for(pilot, lambda: app.box.last is not None and app.box.last.gpus, 15, "the remote box")
            await pilot.pause(0.1)
            assert app._local_box is None  # this box is not sampled: the remote one is
            text = app.w_box.plain
            assert "2x NVIDIA A100-SXM4-80GB" in text and "ssh nvidia-smi" in text
            assert app.w_box.border_title == "box on rlhf-kit"
            await pilot.press("g")
            assert not app.w_box.display
    finally:
        sync.close()
